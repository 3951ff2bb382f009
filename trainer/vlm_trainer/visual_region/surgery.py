"""Model surgery of a pruning: decoder layers removed from a transformers causal LM, and
the checkpoint state renamed to match.

The decoder layers kept stay in order, re-indexed 0..depth-K-1 (``model.layers.N``
contiguous; every submodule's ``layer_idx`` updated, so KV caches and per-layer attention
types line up); the transformers config gets ``num_hidden_layers = depth - K`` and every
per-layer list (``layer_types``, ``no_rope_layers``) filtered to the kept layers;
``mlp_only_layers``-style index lists are re-mapped. In a DCP state (model weights,
optimizer moments, param groups) every key / FQN of a removed layer is dropped and every
kept one renamed.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn

from ..model import find_layer_list

log = logging.getLogger(__name__)

PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # one entry per layer: filtered
LAYER_INDEX_LISTS = ("mlp_only_layers",)  # lists of layer indices: re-mapped


def _parent_and_attr(root: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for name, mod in root.named_modules():
        if mod is target:
            parent_name, _, attr = name.rpartition(".")
            return root.get_submodule(parent_name) if parent_name else root, attr
    raise ValueError("module not found")


def prune_llm_layers(llm: nn.Module, remove: Iterable[int]) -> list[int]:
    """Remove decoder layers of a transformers causal LM in place; returns the kept (old) indices."""
    config = llm.config
    depth = int(config.num_hidden_layers)
    layers = find_layer_list(llm, depth)
    remove = sorted(set(int(i) for i in remove))
    if any(not 0 <= i < depth for i in remove):
        raise ValueError(f"layer indices {remove} out of range for {depth} layers")
    kept = [i for i in range(depth) if i not in remove]
    if not kept:
        raise ValueError("cannot remove every layer")
    parent, attr = _parent_and_attr(llm, layers)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_i, layer in enumerate(new_layers):
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_i
    setattr(parent, attr, new_layers)
    new_index = {o: n for n, o in enumerate(kept)}
    for key, value in list(vars(config).items()):
        if not isinstance(value, (list, tuple)):
            continue
        if key in PER_LAYER_LISTS and len(value) == depth:
            setattr(config, key, [value[i] for i in kept])
        elif key in LAYER_INDEX_LISTS:
            setattr(config, key, [new_index[i] for i in value if i in new_index])
        elif len(value) == depth and depth > 1 and key not in ("architectures",):
            log.warning("config.%s has one entry per layer (%d) but is not known to be per-layer: left as is",
                        key, depth)
    config.num_hidden_layers = len(kept)
    return kept


def remap_fqns(tree: Any, prefix: str, kept: Sequence[int]) -> Any:
    """Rename/drop decoder-layer FQNs everywhere in a nested state (dict keys and string
    list items): ``<prefix>.<old>.`` -> ``<prefix>.<new>.``; removed layers' entries dropped."""
    new_index = {o: n for n, o in enumerate(kept)}
    rx = re.compile(rf"(^|\.){re.escape(prefix)}\.(\d+)(?=\.|$)")
    drop = object()

    def rename(s: str):
        m = rx.search(s)
        if not m:
            return s
        old = int(m.group(2))
        if old not in new_index:
            return drop
        return s[: m.start()] + f"{m.group(1)}{prefix}.{new_index[old]}" + s[m.end():]

    def walk(obj):
        if isinstance(obj, dict):
            out = {}
            for k, v in obj.items():
                nk = rename(k) if isinstance(k, str) else k
                if nk is drop:
                    continue
                out[nk] = walk(v)
            return out
        if isinstance(obj, list):
            out = []
            for v in obj:
                if isinstance(v, str):
                    nv = rename(v)
                    if nv is not drop:
                        out.append(nv)
                else:
                    out.append(walk(v))
            return out
        return obj

    return walk(tree)


def copy_other_files(src: Path, dst: Path, dcp_dirs: list[Path]) -> None:
    """Every file of the source checkpoint but the manifest and the DCP files."""
    dcp_set = {d.resolve() for d in dcp_dirs}
    for p in src.rglob("*"):
        if not p.is_file() or p.name == "COMMITTED":
            continue
        if p.parent.resolve() in dcp_set and (p.name == ".metadata" or p.suffix == ".distcp"):
            continue
        rel = p.relative_to(src)
        if rel.parts and rel.parts[0] in ("llm",):  # a previous pruning's export: rewritten below
            continue
        if rel.name in ("prune.json", "influence.json", "influence.png"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dst / rel)

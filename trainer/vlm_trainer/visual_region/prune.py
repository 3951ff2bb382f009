"""Visual-region pruning (arXiv 2412.12785): drop the least influential LLM layers OUTSIDE
the visual region, write a loadable pruned checkpoint, report what it cost.

Criterion (exact). Given block influence per decoder layer (`visual_region.influence`, BI = 1 -
mean cos(h_in, h_out)) measured on calibration data, and the visual region R:

1. candidates = every layer NOT in R (layers in R are never removed);
2. candidates are ranked by their BI on IMAGE-token positions, ascending (``criterion``
   ``image``, the default; ``text`` or ``all`` rank by those positions instead); when the
   calibration data has no image positions the image BI is undefined and ``all`` is used;
   ties are broken by the ``all`` BI, then by the higher layer index first;
3. the first K candidates are removed. K comes from ``--remove K`` or ``--keep-fraction F``
   (keep round(F x depth) layers); K must not exceed the candidates (depth - |R|).

The visual region R is the stage's ``trainable.llm`` selection (``visualRegion.fraction``
or explicit ``layers``), else a fraction of 0.25, always defined on the ORIGINAL depth and
mapped to the current indices (see `visual_region.region.region_on_original`); ``--visual-fraction``
/ ``--visual-layers`` override it.

The pruned model: the decoder layers kept, in order, re-indexed 0..depth-K-1
(``model.layers.N`` contiguous; every submodule's ``layer_idx`` updated, so KV caches and
per-layer attention types line up); the transformers config gets ``num_hidden_layers =
depth - K`` and every per-layer list (``layer_types``, ``no_rope_layers``) filtered to the
kept layers; ``mlp_only_layers``-style index lists are re-mapped. Visual-region remap: an
old index ``o`` of a kept layer becomes ``o - |{removed r : r < o}|``; as R is never
removed, R maps 1:1 (``prune.json``: ``visual_region_before`` -> ``visual_region``).

The pruned checkpoint (committed, ``final``) goes to ``<root>/<stage>-pruned/step-<N>/``
(N = the source checkpoint's step) and holds:

* the DCP files of the source with every tensor of a removed layer dropped and every
  key / FQN of a kept layer renamed (model weights, optimizer moments, param groups), the
  trainer state unchanged (data positions and schedule carry over);
* ``llm/``: the pruned LLM as ``save_pretrained`` writes it (config + safetensors) plus
  the tokenizer: ``AutoModelForCausalLM.from_pretrained(".../llm")`` loads it;
* ``prune.json`` (criterion, removed/kept layers, layer map, visual region before/after,
  parameter counts, validation loss by modality before and after), ``influence.json``,
  ``influence.png`` and ``trainer-config.yaml`` (the config the model was read with);
  every other file of the source checkpoint is copied as it is.

The manifest's ``extra`` carries ``llm_config`` (the pruned transformers config) and
``pruned`` (the lineage: original depth, kept layers as ORIGINAL indices, ...), which the
trainer uses to build later stages (:func:`prepare_stage_config`).

CLI: ``vlmpretrain prune --checkpoint URI (--remove K | --keep-fraction F) [--out URI]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import yaml
from torch import nn

from vlm_api import stage_policy
from vlm_api.schema import LayerSelection, TrainerConfig

from ..checkpoint import CONFIG_NAME, CheckpointCommitConflict, CheckpointRef, open_store, split_checkpoint_uri
from ..checkpoint.model_io import (
    LoadedModel,
    dcp_dirs,
    effective_model_spec,
    llm_config_dict,
    layers_prefix_of,
    load_checkpoint_model,
    pruned_lineage,
    pruned_stage_name,
    read_dcp_tree,
    resolve_checkpoint,
    write_dcp_tree,
)
from .region import region_for, region_on_original, stage_region_selection
from .influence import InfluenceReport, LayerInfluence, analyze, open_calibration_sources
from ..model import count_params, find_layer_list, token_losses

log = logging.getLogger(__name__)

PRUNE_FORMAT = "vlm-pruned/1"
CRITERIA = ("image", "text", "all")
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # one entry per layer: filtered
LAYER_INDEX_LISTS = ("mlp_only_layers",)  # lists of layer indices: re-mapped


# --------------------------------------------------------------------------- choosing


def layers_to_remove_count(depth: int, *, remove: int | None = None, keep_fraction: float | None = None) -> int:
    if (remove is None) == (keep_fraction is None):
        raise ValueError("give exactly one of remove or keep_fraction")
    if remove is not None:
        k = int(remove)
    else:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
        k = depth - max(1, math.floor(keep_fraction * depth + 0.5))
    if k < 0 or k >= depth:
        raise ValueError(f"cannot remove {k} of {depth} layers")
    return k


def choose_layers(influence: Sequence[LayerInfluence], k: int, visual_region: Iterable[int], *,
                  criterion: str = "image") -> list[int]:
    """The ``k`` layers to remove (sorted), per the module doc's criterion."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}")
    region = set(visual_region)
    candidates = [layer for layer in influence if layer.layer not in region]
    if k > len(candidates):
        raise ValueError(f"cannot remove {k} layers: only {len(candidates)} of {len(influence)} lie outside the "
                         f"visual region {sorted(region)}")
    if criterion == "image" and all(math.isnan(layer.image) for layer in candidates):
        log.warning("no image positions in the calibration data: ranking by the all-positions influence")
        criterion = "all"

    def key(layer: LayerInfluence):
        v = layer.get(criterion)
        return (math.inf if math.isnan(v) else v, layer.all if not math.isnan(layer.all) else math.inf, -layer.layer)

    return sorted(layer.layer for layer in sorted(candidates, key=key)[:k])


def remap_indices(indices: Iterable[int], removed: Iterable[int]) -> list[int]:
    """Old -> new index of kept layers: ``o - |{r in removed: r < o}|`` (removed ones dropped)."""
    removed = sorted(set(removed))
    out = []
    for o in indices:
        if o in removed:
            continue
        out.append(o - sum(1 for r in removed if r < o))
    return out


# --------------------------------------------------------------------------- pruning the model


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


# --------------------------------------------------------------------------- validation loss


@torch.no_grad()
def modality_losses(vlm, builder, sources, *, samples: int, micro_batch_size: int = 8) -> dict:
    """Mean next-token loss over the label tokens of the first ``samples`` decodable
    validation samples of each source, pooled per modality (as the trainer's evaluator)."""
    from ..data.loader import validation_set
    from ..data.sequences import collate

    was = vlm.training
    vlm.eval()
    device = next(vlm.parameters()).device
    by_source, tokens, pooled = {}, {}, {}
    try:
        for src in sources:
            items = validation_set(src, builder, samples)
            total = count = 0.0
            for i in range(0, len(items), micro_batch_size):
                batch = collate(items[i:i + micro_batch_size], builder.tok.pad_id).to(device)
                logits = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values,
                             n_image_positions=batch.n_image_tokens)
                total += float(token_losses(logits, batch.labels).double().sum())
                count += batch.n_label_tokens
            by_source[src.name] = total / count if count else math.nan
            tokens[src.name] = int(count)
            acc = pooled.setdefault(src.modality, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    finally:
        vlm.train(was)
    return {"by_modality": {m: (t / c if c else math.nan) for m, (t, c) in sorted(pooled.items())},
            "by_source": by_source, "tokens": tokens}


def validation_sources(cfg: TrainerConfig, vlm, endpoint_url: str | None) -> list:
    from ..data.loader import open_sources
    from ..data.mixture import MULTIMODAL

    names = [s.name for s in cfg.spec.data.sources if s.validation_uri and (vlm.vision is not None or s.modality not in MULTIMODAL)]
    return list(open_sources(cfg.spec.data, names, image=vlm.image_spec, seed=cfg.spec.seed, split="validation",
                             endpoint_url=endpoint_url).values())


def calibration_sources_from_config(cfg: TrainerConfig, vlm, endpoint_url: str | None) -> tuple[list, int | None]:
    """The stage's ``prune.calibration`` source (training shards, in shard order), else
    the first multimodal source of the stage's mixture, else the first of its sources."""
    from ..data.loader import open_sources
    from ..data.mixture import MULTIMODAL

    stage = cfg.stage_spec
    samples = None
    if stage.prune is not None:
        name, samples = stage.prune.calibration.source, stage.prune.calibration.samples
    else:
        modality = {s.name: s.modality for s in cfg.spec.data.sources}
        names = [n for n, f in stage.mixture.items() if f > 0]
        mm = [n for n in names if modality.get(n) in MULTIMODAL and vlm.vision is not None]
        name = (mm or names)[0]
    src = open_sources(cfg.spec.data, [name], image=vlm.image_spec, seed=cfg.spec.seed, endpoint_url=endpoint_url)[name]
    src.shuffle = False  # the first N samples in shard order: the same set every time
    return [src], samples


# --------------------------------------------------------------------------- the whole step


@dataclasses.dataclass
class PruneOutcome:
    ref: CheckpointRef
    report: dict  # what prune.json holds
    influence: InfluenceReport


def _json_num(x: float | None):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _copy_other_files(src: Path, dst: Path, dcp_dirs: list[Path]) -> None:
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


def prune_loaded(loaded: LoadedModel, *, remove: int | None = None, keep_fraction: float | None = None,
                 calibration: list | None = None, samples: int | None = None, criterion: str = "image",
                 visual_fraction: float | None = None, visual_layers: list[int] | None = None,
                 out_root: str | None = None, eval_samples: int | None = None, micro_batch_size: int = 8,
                 influence: InfluenceReport | None = None, log_fn: Callable[[str], None] = print) -> PruneOutcome:
    """Measure, choose, evaluate, prune, evaluate, write and commit (see module doc)."""
    t0 = time.perf_counter()
    vlm, cfg = loaded.vlm, loaded.cfg
    depth = len(vlm.decoder_layers())
    k = layers_to_remove_count(depth, remove=remove, keep_fraction=keep_fraction)
    region = region_for(loaded, fraction=visual_fraction, layers=visual_layers)
    stage = loaded.stage_spec
    # influence
    if influence is None:
        if calibration is None:
            calibration, stage_samples = calibration_sources_from_config(cfg, vlm, loaded.endpoint_url)
            samples = samples or stage_samples
        influence = analyze(vlm, loaded.builder, calibration, samples=samples or 64, visual_region=region,
                            micro_batch_size=micro_batch_size, checkpoint=loaded.uri)
    elif influence.depth != depth:
        raise ValueError(f"the influence report has {influence.depth} layers, the model {depth}")
    removed = choose_layers(influence.layers, k, region, criterion=criterion)
    log_fn(influence.table(removed))
    # validation before
    val_sources = validation_sources(cfg, vlm, loaded.endpoint_url)
    if eval_samples is None:
        eval_samples = (stage.eval_batches * stage.micro_batch_size) if stage is not None else 16
    before = modality_losses(vlm, loaded.builder, val_sources, samples=eval_samples,
                             micro_batch_size=micro_batch_size) if val_sources and eval_samples else None
    params_before = {"llm": count_params(vlm.llm), "total": count_params(vlm)}
    prefix = layers_prefix_of(vlm)
    kept = prune_llm_layers(vlm.llm, removed)
    new_region = remap_indices(region, removed)
    assert len(new_region) == len(region), "a visual-region layer was removed"
    params_after = {"llm": count_params(vlm.llm), "total": count_params(vlm)}
    after = modality_losses(vlm, loaded.builder, val_sources, samples=eval_samples,
                            micro_batch_size=micro_batch_size) if before is not None else None
    # lineage on the original depth
    prev = (loaded.lineage or {}).get("pruned") or {}
    original_depth = int(prev.get("original_depth", depth))
    kept_original_before = prev.get("kept_original") or list(range(depth))
    kept_original = [kept_original_before[i] for i in kept]
    fraction = _region_fraction(stage, visual_fraction, visual_layers)
    report = {
        "format": PRUNE_FORMAT,
        "source_checkpoint": loaded.uri,
        "source_stage": loaded.ref.stage,
        "source_step": loaded.ref.step,
        "criterion": criterion,
        "criterion_text": ("remove the K layers outside the visual region with the lowest block influence "
                           f"(1 - mean cos(h_in, h_out)) on {criterion} positions of the calibration data"),
        "calibration": {"sources": influence.sources, "samples_per_source": influence.samples,
                        **{k_: v for k_, v in influence.stats.items()}},
        "depth_before": depth,
        "depth_after": len(kept),
        "removed": removed,
        "kept": kept,
        "layer_map": {str(o): n for n, o in enumerate(kept)},
        "original_depth": original_depth,
        "kept_original": kept_original,
        "removed_original": sorted(set(range(original_depth)) - set(kept_original)),
        "visual_fraction": fraction,
        "visual_region_before": list(region),
        "visual_region": new_region,
        "params_before": params_before,
        "params_after": params_after,
        "val_sources": [src.name for src in val_sources],
        "eval_samples_per_source": eval_samples if val_sources else 0,
        "val_loss_before": before,
        "val_loss_after": after,
    }
    _print_summary(report, log_fn)
    # write + commit
    out_root = out_root or split_checkpoint_uri(loaded.uri)[0]
    store = open_store(out_root, endpoint_url=loaded.endpoint_url)
    out_stage = pruned_stage_name(loaded.ref.stage)
    with tempfile.TemporaryDirectory(prefix="vlm-prune-") as work:
        out = Path(work) / "ckpt"
        out.mkdir()
        dirs = dcp_dirs(loaded.local_dir)
        _copy_other_files(loaded.local_dir, out, dirs)
        # the config travels with the pruned checkpoint: analyze-layers/prune need no --config for it
        (out / CONFIG_NAME).write_text(yaml.safe_dump(loaded.cfg.dump(), sort_keys=False))
        model_keys = set(_model_state_keys(vlm))
        for d in dirs:
            rel = d.relative_to(loaded.local_dir)
            tree = remap_fqns(read_dcp_tree(d), prefix, kept)
            if isinstance(tree.get("model"), dict) and d == loaded.dcp_dir:
                got = set(tree["model"])
                if got != model_keys:
                    raise RuntimeError(f"pruned checkpoint keys differ from the pruned model's: "
                                       f"{sorted(got ^ model_keys)[:5]}")
            write_dcp_tree(tree, out / rel)
            del tree
        vlm.llm.save_pretrained(out / "llm")
        try:
            loaded.tok.tokenizer.save_pretrained(out / "llm")
        except Exception as exc:  # noqa: BLE001 - the export is a convenience
            log.warning("tokenizer not exported: %s", exc)
        (out / "prune.json").write_text(json.dumps(_clean(report), indent=2) + "\n")
        influence.save(out, removed=removed, title=f"Block influence of {loaded.ref.stage} step {loaded.ref.step}")
        extra = {**{k_: v for k_, v in loaded.ref.extra.items() if k_ not in ("pruned", "llm_config", "val_loss")},
                 "pruned": _clean({k_: v for k_, v in report.items() if k_ not in ("val_loss_before", "val_loss_after")}),
                 "llm_config": llm_config_dict(vlm.llm),
                 "val_loss": _clean({"before": before and before["by_modality"], "after": after and after["by_modality"]})}
        try:
            res = store.upload(out, out_stage, loaded.ref.step, world_size=int(loaded.ref.world_size or 1),
                               final=True, extra=extra)
            ref = res.ref
        except CheckpointCommitConflict:
            ref = next(r for r in store.committed(out_stage) if r.step == loaded.ref.step)
            log.warning("%s was already committed (by an earlier attempt): using it", ref.uri)
    log_fn(f"pruned checkpoint committed: {ref.uri} ({time.perf_counter() - t0:.1f}s)")
    return PruneOutcome(ref, report, influence)


def _region_fraction(stage, fraction: float | None, layers: list[int] | None) -> float | None:
    """The fraction the visual region was selected with (None for explicit layers)."""
    if layers is not None:
        return None
    if fraction is not None:
        return fraction
    stage_fraction, stage_layers = stage_region_selection(stage)
    if stage_layers is not None:
        return None
    return 0.25 if stage_fraction is None else stage_fraction


def _model_state_keys(vlm) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return list(get_model_state_dict(vlm))


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return _json_num(obj)
    return obj


def _print_summary(r: dict, log_fn) -> None:
    pb, pa = r["params_before"], r["params_after"]
    log_fn(f"removed layers {r['removed']} of {r['depth_before']} (criterion: lowest {r['criterion']}-position "
           f"influence outside the visual region); depth {r['depth_before']} -> {r['depth_after']}")
    log_fn(f"visual region {r['visual_region_before']} -> {r['visual_region']} (pruned model indices)")
    log_fn(f"parameters: LLM {pb['llm']:,} -> {pa['llm']:,} ({100 * (1 - pa['llm'] / pb['llm']):.1f}% fewer); "
           f"VLM {pb['total']:,} -> {pa['total']:,}")
    b, a = r["val_loss_before"], r["val_loss_after"]
    if b and a:
        log_fn(f"{'validation loss':<16} {'before':>9} {'after':>9} {'delta':>9}")
        for m in b["by_modality"]:
            x, y = b["by_modality"][m], a["by_modality"][m]
            log_fn(f"{m:<16} {x:9.4f} {y:9.4f} {y - x:+9.4f}")
    elif r.get("eval_samples_per_source") == 0 and r.get("val_sources"):
        log_fn("validation loss: skipped (0 evaluation samples)")
    else:
        log_fn("validation loss: no validation data (no source has validationUri)")


# --------------------------------------------------------------------------- stage integration


def final_checkpoint_ref(cfg: TrainerConfig, stage: str | None = None) -> CheckpointRef:
    store = open_store(cfg.spec.checkpoint.uri, endpoint_url=cfg.spec.checkpoint.endpoint or None)
    name = stage or cfg.stage
    spec_stage = cfg.spec.stages[cfg.spec.stage_index(name)]
    for ref in store.committed(name):
        if stage_policy.is_final(spec_stage, ref.step, ref.final):
            return ref
    raise FileNotFoundError(f"no committed final checkpoint of stage {name!r} in {store.uri}")


def run_prune_stage_step(config: TrainerConfig, final_ckpt_ref: CheckpointRef | str | None = None) -> CheckpointRef:
    """After a stage that declares ``prune``: measure influence on its calibration source,
    prune, evaluate, and commit ``<checkpoint.uri>/<stage>-pruned/step-<N>/`` (final).

    Idempotent: an existing committed pruned checkpoint of the same source step is
    returned as it is. ``final_ckpt_ref`` defaults to the stage's newest final checkpoint."""
    stage = config.stage_spec
    if stage.prune is None:
        raise ValueError(f"stage {stage.name!r} declares no prune")
    if final_ckpt_ref is None:
        final_ckpt_ref = final_checkpoint_ref(config)
    uri = final_ckpt_ref.uri if isinstance(final_ckpt_ref, CheckpointRef) else str(final_ckpt_ref)
    endpoint = config.spec.checkpoint.endpoint or None
    store_src, ref = resolve_checkpoint(uri, endpoint_url=endpoint)
    out_store = open_store(config.spec.checkpoint.uri, endpoint_url=endpoint)
    for existing in out_store.committed(pruned_stage_name(stage.name)):
        if existing.step == ref.step:
            log.info("stage %s: pruned checkpoint %s exists", stage.name, existing.uri)
            return existing
    loaded = load_checkpoint_model(uri, config=config, stage=stage.name, endpoint_url=endpoint,
                                   device="cuda" if torch.cuda.is_available() and os.environ.get("VLM_FORCE_CPU") != "1" else "cpu")
    try:
        outcome = prune_loaded(loaded, remove=stage.prune.remove_layers, samples=stage.prune.calibration.samples,
                               out_root=config.spec.checkpoint.uri, log_fn=log.info)
    finally:
        loaded.close()
    _progress_event(config, outcome)
    return outcome.ref


def _progress_event(config: TrainerConfig, outcome: PruneOutcome) -> None:
    """A ``prune`` event in ``$VLM_PROGRESS_FILE`` (the local runner's view), when set."""
    from ..progress import ProgressFile

    r = outcome.report
    pf = ProgressFile.from_env(run=config.run.name, stage=config.stage, enabled=True)
    try:
        pf.write("prune", uri=outcome.ref.uri, step=r["source_step"], removed=r["removed"], kept=r["kept"],
                 depth_before=r["depth_before"], depth_after=r["depth_after"], visual_region=r["visual_region"],
                 params_before=r["params_before"], params_after=r["params_after"],
                 val_loss_before=(r["val_loss_before"] or {}).get("by_modality"),
                 val_loss_after=(r["val_loss_after"] or {}).get("by_modality"))
    finally:
        pf.close()


def prepare_stage_config(cfg: TrainerConfig, *, rank: int = 0, wait_seconds: float | None = None) -> TrainerConfig:
    """The config a stage trains with when an earlier stage pruned the model.

    * ``spec.model.llm`` = the pruned LLM config (from the latest earlier pruning stage's
      pruned checkpoint), so the model is built with the pruned depth;
    * ``init_from`` = that pruned checkpoint when the PREVIOUS stage prunes;
    * every ``trainable.llm`` layer selection of this and later stages (``visualRegion``
      or ``layers``, defined on the original depth) -> explicit ``layers`` in the pruned
      model's indices (`ckpt_model.region_on_original`).

    When the previous stage prunes and its pruned checkpoint is missing (its job ended
    before the pruning step), rank 0 runs :func:`run_prune_stage_step` now and other ranks
    wait for the commit (``wait_seconds``, default ``$VLM_PRUNE_WAIT_SECONDS`` or 3600).
    Without pruning stages before this one, ``cfg`` is returned unchanged."""
    spec = cfg.spec
    i = spec.stage_index(cfg.stage)
    if not any(s.prune is not None for s in spec.stages[:i]):
        return cfg
    store = open_store(spec.checkpoint.uri, endpoint_url=spec.checkpoint.endpoint or None)
    prev = spec.stages[i - 1]
    pruned_ref = None
    if prev.prune is not None:
        pruned_ref = store.latest_committed(pruned_stage_name(prev.name))
        if pruned_ref is None:
            prev_cfg = cfg.model_copy(update={"stage": prev.name, "init_from": None, "max_steps": None})
            if rank == 0:
                log.info("stage %s prunes but has no pruned checkpoint yet: pruning now", prev.name)
                pruned_ref = run_prune_stage_step(prev_cfg, None)
            else:
                pruned_ref = _wait_for(store, pruned_stage_name(prev.name), wait_seconds)
    lineage = pruned_lineage(store, spec, i)
    lin = lineage.get("pruned") or {}
    model = effective_model_spec(spec.model, lineage["llm_config"])
    stages = list(spec.stages)
    for j in range(i, len(stages)):
        llm = stages[j].trainable.llm
        if isinstance(llm, LayerSelection):
            fraction = llm.visual_region.fraction if llm.visual_region is not None else None
            layers = region_on_original(fraction, llm.layers, original_depth=int(lin["original_depth"]),
                                        kept_original=lin["kept_original"])
            if not layers:
                raise ValueError(f"stage {stages[j].name!r}: every selected LLM layer was pruned")
            trainable = stages[j].trainable.model_copy(update={"llm": LayerSelection(layers=layers)})
            stages[j] = stages[j].model_copy(update={"trainable": trainable})
    new_spec = spec.model_copy(update={"model": model, "stages": stages})
    update: dict = {"spec": new_spec}
    if pruned_ref is not None:
        update["init_from"] = pruned_ref.uri
    log.info("stage %s continues from a pruned model: %d LLM layers (kept %s of %d)%s", cfg.stage,
             len(lin["kept_original"]), lin["kept_original"], lin["original_depth"],
             f", init from {pruned_ref.uri}" if pruned_ref is not None else "")
    return cfg.model_copy(update=update)


def _wait_for(store, stage_name: str, wait_seconds: float | None) -> CheckpointRef:
    limit = float(wait_seconds if wait_seconds is not None else os.environ.get("VLM_PRUNE_WAIT_SECONDS", "3600"))
    deadline = time.monotonic() + limit
    while True:
        ref = store.latest_committed(stage_name)
        if ref is not None:
            return ref
        if time.monotonic() > deadline:
            raise TimeoutError(f"no committed checkpoint under {store.uri}{stage_name}/ after {limit:.0f}s")
        time.sleep(5)


def after_stage(cfg: TrainerConfig, *, committed: bool, rank: int = 0) -> CheckpointRef | None:
    """Call once a stage's final checkpoint is committed (on global rank 0, ideally after
    the process group is gone): runs the pruning step when the stage declares ``prune``."""
    if cfg.stage_spec.prune is None or not committed or rank != 0:
        return None
    return run_prune_stage_step(cfg, None)


# --------------------------------------------------------------------------- CLI


def main(args: argparse.Namespace) -> int:
    """`vlmpretrain prune`."""
    from .influence import _parse_layers

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_checkpoint_model(args.checkpoint, config=args.config, stage=args.stage, endpoint_url=args.endpoint,
                                   device=args.device)
    try:
        influence = None
        if args.influence:
            influence = InfluenceReport.from_json(json.loads(Path(args.influence).read_text()))
        calibration = None
        if args.data and influence is None:
            calibration = open_calibration_sources(args.data, image_spec=loaded.vlm.image_spec,
                                                   endpoint_url=loaded.endpoint_url)
        outcome = prune_loaded(loaded, remove=args.remove, keep_fraction=args.keep_fraction, calibration=calibration,
                               samples=args.samples, criterion=args.criterion, visual_fraction=args.visual_fraction,
                               visual_layers=_parse_layers(args.visual_layers), out_root=args.out,
                               eval_samples=args.eval_samples, micro_batch_size=args.micro_batch_size,
                               influence=influence)
    finally:
        loaded.close()
    print(outcome.ref.uri)
    return 0


def _module_main(argv: list[str] | None = None) -> int:
    """``python -m vlm_trainer.visual_region.prune --config FILE [--checkpoint URI]``: the pruning step of
    the stage in a TrainerConfig (what a separate job would run)."""
    from ..train import load_config

    parser = argparse.ArgumentParser(prog="python -m vlm_trainer.visual_region.prune", description=_module_main.__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainerConfig YAML of the pruning stage")
    parser.add_argument("--checkpoint", default=None, help="source checkpoint (default: the stage's newest final one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ref = run_prune_stage_step(load_config(args.config), args.checkpoint)
    print(ref.uri)
    return 0


if __name__ == "__main__":
    sys.exit(_module_main())

"""A trained VLM from a committed checkpoint, outside the training loop (analysis, pruning,
grounding, export).

Checkpoint URIs (local path, ``file://`` or ``s3://``), in the layout of ``layout.py``:

* ``<root>/<stage>/step-000000120/``: that checkpoint (it must be committed);
* ``<root>/<stage>/``: the newest committed checkpoint of the stage.

A local checkpoint is read in place (after a shallow check against its manifest); an S3
one is downloaded and verified (sha256) into a temporary directory first.

The trainer config (model, tokenizer, data, stages) is the one the checkpoint carries
(``layout.CONFIG_NAME``, written by the trainer and by pruning), unless ``config`` (a
TrainerConfig YAML or a VLMPretrainRun manifest) overrides it.

Architecture after pruning. A stage that declares ``prune`` leaves a committed pruned
checkpoint under ``<root>/<stage>-pruned/``; its manifest's ``extra`` holds the pruned
LLM's transformers config (``llm_config``) and the lineage (``pruned``: kept layers as
indices of the original model, ...). Every later stage is built with that LLM config
(:func:`effective_model_spec`); the spec in the recipe keeps the original model.

The weights are the tensors under the DCP key ``model`` (``state.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vlm_api import stage_policy
from vlm_api.schema import API_VERSION, KIND, ModelSpec, TrainerConfig

from .backends import open_store
from .errors import CheckpointNotFound
from .layout import CONFIG_NAME, MANIFEST_NAME, CheckpointRef, split_checkpoint_uri
from .store import CheckpointStore

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- locating


def resolve_checkpoint(uri: str, *, endpoint_url: str | None = None) -> tuple[CheckpointStore, CheckpointRef]:
    """The store and the committed checkpoint a URI names (see module doc)."""
    root, stage, step = split_checkpoint_uri(uri)
    store = open_store(root, endpoint_url=endpoint_url)
    committed = store.committed(stage)
    if step is None:
        if not committed:
            raise CheckpointNotFound(f"{uri}: no committed checkpoint in stage {stage!r}")
        return store, committed[0]
    for ref in committed:
        if ref.step == step:
            return store, ref
    raise CheckpointNotFound(f"{uri}: not a committed checkpoint (no valid {MANIFEST_NAME} manifest)")


def local_path_of(ref: CheckpointRef) -> Path | None:
    """The directory of a checkpoint of a local store (None for S3)."""
    if ref.uri.startswith("s3://"):
        return None
    return Path(ref.uri[len("file://"):] if ref.uri.startswith("file://") else ref.uri)


def fetch(store: CheckpointStore, ref: CheckpointRef, workdir: str | os.PathLike) -> Path:
    """A local directory with the checkpoint's files: in place for a local store (shallow
    verification), else downloaded and sha256-verified under ``workdir``."""
    local = local_path_of(ref)
    if local is not None:
        problems = store.verify(ref, deep=False)
        if problems:
            raise CheckpointNotFound(f"{ref.uri}: {'; '.join(problems)}")
        return local
    dest = Path(workdir) / ref.stage / f"step-{ref.step}"
    if dest.exists():
        shutil.rmtree(dest)
    store.download(ref, dest)
    return dest


def dcp_dirs(root: Path) -> list[Path]:
    """Directories under ``root`` (itself included) holding a DCP ``.metadata`` file."""
    return sorted(p.parent for p in root.rglob(".metadata"))


# --------------------------------------------------------------------------- config


def read_config_file(path: str | os.PathLike, *, stage: str | None = None) -> TrainerConfig:
    """A TrainerConfig YAML/JSON, or a VLMPretrainRun manifest (the first stage, or ``stage``)."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    return config_from_doc(doc, stage=stage, where=str(path))


def config_from_doc(doc: Any, *, stage: str | None = None, where: str = "config") -> TrainerConfig:
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a mapping")
    if doc.get("kind") == KIND:
        spec = doc.get("spec") or {}
        name = (doc.get("metadata") or {}).get("name", "run")
        stages = [s.get("name") for s in spec.get("stages", [])]
        return TrainerConfig.model_validate({"apiVersion": API_VERSION, "kind": "TrainerConfig",
                                             "run": {"name": name}, "stage": stage or stages[0], "spec": spec})
    cfg = TrainerConfig.model_validate(doc)
    if stage and stage != cfg.stage and stage in [s.name for s in cfg.spec.stages]:
        cfg = cfg.model_copy(update={"stage": stage})
    return cfg


# --------------------------------------------------------------------------- architecture lineage


def pruned_lineage(store: CheckpointStore, spec, stage_index: int) -> dict | None:
    """The manifest ``extra`` of the pruned checkpoint that defines the architecture of
    stage ``stage_index``: that of the latest earlier stage declaring ``prune`` (None when
    no earlier stage prunes). Raises CheckpointNotFound when that stage's pruned checkpoint
    does not exist (yet)."""
    for j in range(stage_index - 1, -1, -1):
        if spec.stages[j].prune is not None:
            name = stage_policy.pruned_name(spec.stages[j].name)
            ref = store.latest_committed(name)
            if ref is None:
                raise CheckpointNotFound(f"stage {spec.stages[j].name!r} declares prune but {store.uri}{name}/ "
                                         "holds no committed pruned checkpoint")
            return ref.extra
    return None


def effective_model_spec(model: ModelSpec, llm_config: dict | None) -> ModelSpec:
    """``model`` with the LLM built from ``llm_config`` (a pruned architecture), the
    tokenizer unchanged (an implicit ``tokenizer.path = llm.path`` is made explicit)."""
    if not llm_config:
        return model
    tok = model.tokenizer
    if tok.builtin is None and tok.path is None:
        tok = tok.model_copy(update={"path": model.llm.path})
    llm = type(model.llm).model_validate({"config": dict(llm_config)})
    return model.model_copy(update={"llm": llm, "tokenizer": tok})


def llm_config_dict(llm) -> dict:
    """A transformers config as a dict AutoConfig.for_model accepts (model_type included)."""
    d = llm.config.to_dict()
    for k in ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype"):
        d.pop(k, None)
    return d


# --------------------------------------------------------------------------- weights


def read_dcp_model(vlm, dcp_dir: str | os.PathLike, *, key: str = "model") -> None:
    """Load the ``model`` tensors of a DCP checkpoint into ``vlm`` (single process, in place).

    Every parameter/buffer of ``vlm.state_dict()`` must be in the checkpoint, except the
    second name of a tied weight (loaded through the first)."""
    import torch.distributed.checkpoint as dcp

    from ..safe_load import SafeFileSystemReader, SafeLoadPlanner

    meta = SafeFileSystemReader(str(dcp_dir)).read_metadata()
    have = {k[len(key) + 1:] for k in meta.state_dict_metadata if k.startswith(key + ".")}
    target = vlm.state_dict()
    wanted = {name: t for name, t in target.items() if name in have}
    loaded_storages = {id(t.untyped_storage()) for t in wanted.values() if t.numel()}
    missing = [n for n in target if n not in have
               and not (target[n].numel() and id(target[n].untyped_storage()) in loaded_storages)]
    if missing:
        raise KeyError(f"{dcp_dir}: checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]} "
                       f"(the checkpoint has {len(have)}; architecture mismatch?)")
    extra = sorted(have - set(target))
    if extra:
        raise KeyError(f"{dcp_dir}: checkpoint has tensors this model lacks, e.g. {extra[:3]} (architecture mismatch?)")
    dcp.load({key: wanted}, storage_reader=SafeFileSystemReader(str(dcp_dir)), planner=SafeLoadPlanner(), no_dist=True)


def read_dcp_tree(dcp_dir: str | os.PathLike) -> dict:
    """Everything in a DCP checkpoint as a nested dict (model, optimizer, trainer state)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from ..safe_load import SafeEmptyStateDictLoadPlanner, SafeFileSystemReader

    tree: dict = {}
    _load_state_dict(tree, storage_reader=SafeFileSystemReader(str(dcp_dir)), planner=SafeEmptyStateDictLoadPlanner(),
                     no_dist=True)
    return tree


def write_dcp_tree(tree: dict, dcp_dir: str | os.PathLike) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(tree, checkpoint_id=str(dcp_dir), no_dist=True)


def layers_prefix_of(vlm) -> str:
    """The FQN of the LLM's decoder-layer ModuleList inside the VLM, e.g. ``llm.model.layers``."""
    layers = vlm.decoder_layers()
    for name, mod in vlm.named_modules():
        if mod is layers:
            return name
    raise ValueError("decoder layers not found in the VLM")


# --------------------------------------------------------------------------- the loaded model


@dataclasses.dataclass
class LoadedModel:
    vlm: Any
    tok: Any
    builder: Any
    cfg: TrainerConfig  # the config as stored (original architecture in spec.model)
    model_spec: ModelSpec  # what was built (the pruned LLM config after a pruning stage)
    store: CheckpointStore
    ref: CheckpointRef
    local_dir: Path
    dcp_dir: Path
    endpoint_url: str | None
    lineage: dict | None  # manifest extra of the pruned checkpoint this architecture comes from
    tmp: tempfile.TemporaryDirectory | None = None

    @property
    def uri(self) -> str:
        return self.ref.uri

    @property
    def stage_name(self) -> str:
        """The recipe stage this checkpoint belongs to (``x`` for ``x-pruned``: the schema
        reserves the suffix for pruning steps)."""
        return self.ref.stage.removesuffix(stage_policy.PRUNED_SUFFIX)

    @property
    def stage_spec(self):
        names = [s.name for s in self.cfg.spec.stages]
        return self.cfg.spec.stages[names.index(self.stage_name)] if self.stage_name in names else None

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def load_checkpoint_model(uri: str, *, config: str | TrainerConfig | None = None, stage: str | None = None,
                          endpoint_url: str | None = None, device: str = "cpu", seed: int | None = None) -> LoadedModel:
    """Build the VLM of a committed checkpoint and load its weights (see module doc)."""
    from ..data.sequences import SequenceBuilder
    from ..model import build_vlm
    from ..tokenizer import load_tokenizer

    cfg = config if isinstance(config, TrainerConfig) else None
    endpoint = endpoint_url or (cfg.spec.checkpoint.endpoint if cfg else None) or os.environ.get("AWS_ENDPOINT_URL") or None
    store, ref = resolve_checkpoint(uri, endpoint_url=endpoint)
    if cfg is None and isinstance(config, (str, os.PathLike)):
        cfg = read_config_file(config, stage=stage)
    if cfg is None and not ref.has_config:  # before downloading anything
        raise CheckpointNotFound(f"{ref.uri}: carries no {CONFIG_NAME} (written before checkpoints stored "
                                 "their config): pass --config FILE")
    tmp = None if local_path_of(ref) is not None else tempfile.TemporaryDirectory(prefix="vlm-ckpt-")
    local = fetch(store, ref, tmp.name if tmp else ".")
    if cfg is None:
        cfg = read_config_file(local / CONFIG_NAME)
    stage_name = (stage or ref.stage).removesuffix(stage_policy.PRUNED_SUFFIX)
    if stage_name in [s.name for s in cfg.spec.stages] and stage_name != cfg.stage:
        cfg = cfg.model_copy(update={"stage": stage_name})
    # The architecture: a pruned checkpoint says it; else the latest earlier pruning stage's.
    lineage = ref.extra if ref.extra.get("llm_config") else None
    if lineage is None and ref.stage in [s.name for s in cfg.spec.stages]:
        lineage = pruned_lineage(store, cfg.spec, cfg.spec.stage_index(ref.stage))
    model_spec = effective_model_spec(cfg.spec.model, (lineage or {}).get("llm_config"))
    dirs = dcp_dirs(local)
    if not dirs:
        raise CheckpointNotFound(f"{ref.uri}: no DCP checkpoint (.metadata) in it")
    if len(dirs) > 1:
        log.warning("%s: several DCP directories %s; using %s", ref.uri, dirs, dirs[0])
    tok = load_tokenizer(model_spec)
    vlm = build_vlm(model_spec, tok, seed=cfg.spec.seed if seed is None else seed)
    read_dcp_model(vlm, dirs[0])
    vlm.to(device)
    vlm.eval()
    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=cfg.spec.data.seq_length)
    log.info("loaded %s (%s, %d LLM layers)", ref.uri, cfg.stage, len(vlm.decoder_layers()))
    return LoadedModel(vlm, tok, builder, cfg, model_spec, store, ref, local, dirs[0], endpoint, lineage, tmp)

"""Restore: choose the checkpoint to start from, fetch what each node reads, load it.

Global rank 0 picks the newest committed checkpoint of the stage whose files are all
present at their manifest sizes (one listing, no download), else ``init_from`` (a
step-directory URI, or a stage prefix for its newest final one), else the previous stage's
final one; every rank loads with ``dcp.load`` (resharding to the current world size /
wrapper) through a reader that fetches, once per node and verified against the manifest's
sha256, only the files the rank's load plan reads: with FSDP a node downloads its ranks'
shard files plus rank 0's (which holds every replicated entry), not the whole checkpoint.
A file that fails verification on any node fails the load on every rank alike (DCP gathers
read errors), and all ranks go back to the next older candidate.

Same stage ("resume"): model, optimizer, trainer state, RNG (the RNG only at the same world
size; the trainer reseeds every step from (seed, step, rank) anyway). Another stage
("init"): model weights only; with ``continue_schedule`` also the optimizer moments of the
parameters present in both stages (others start fresh), and the trainer decides what else
carries over (the components' ``load_init_state_dict``, ``state.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

from torch.distributed.checkpoint.stateful import Stateful

import torch

from .. import safe_load
from .backends import open_step_uri, open_store
from .errors import CheckpointError, CheckpointVerifyError
from .layout import CheckpointRef, short, split_checkpoint_uri, step_dirname
from .state import MODEL_KEY, OPTIM_KEY, rng_key, set_rng_state, unpack
from .store import CheckpointStore

log = logging.getLogger(__name__)

METADATA = ".metadata"  # DCP's checkpoint metadata file (every rank reads it)


@dataclasses.dataclass
class Restored:
    ref: CheckpointRef
    mode: str  # "resume" (same stage) | "init" (another stage's final / init_from)
    step: int  # the checkpoint's step
    seconds: float
    world_size_changed: bool
    rng_restored: bool
    optimizer_loaded: bool
    missing_model_keys: list[str] = dataclasses.field(default_factory=list)
    fresh_optimizer_params: list[str] = dataclasses.field(default_factory=list)
    fetched_files: list[str] = dataclasses.field(default_factory=list)  # downloaded by this rank
    fetched_bytes: int = 0


class NodeFiles:
    """The files of one checkpoint in this node's download directory, fetched on demand.

    Each rank asks for the files its part of the load reads (DCP's plan names them); a file
    is downloaded and verified against the manifest once per node, under a per-file lock
    (the node's ranks are processes), and appears under its name only when complete. A file
    that fails verification sets ``corrupt`` (the restore then skips this checkpoint)."""

    def __init__(self, open_store: Callable[[], CheckpointStore], ref: CheckpointRef, local: Path):
        self._open_store = open_store
        self._store: Optional[CheckpointStore] = None
        self.ref = ref
        self.local = local
        self.fetched: list[str] = []  # by this rank
        self.bytes = 0
        self.corrupt = ""  # what failed verification, if anything did

    def ensure(self, names: list[str]) -> None:
        import fcntl

        for name in names:
            dest = self.local / name
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest.with_name(f".{dest.name}.lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if dest.exists():  # another rank of this node fetched it meanwhile
                    continue
                if self._store is None:
                    self._store = self._open_store()
                try:
                    self.bytes += self._store.download(self.ref, self.local, files=[name]).bytes
                except CheckpointVerifyError as e:
                    self.corrupt = "; ".join(e.problems)
                    raise
                self.fetched.append(name)


def fetching_reader(files: NodeFiles):
    """DCP's FileSystemReader over the node's download directory, fetching what it reads."""
    class FetchingReader(safe_load.SafeFileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            files.ensure([METADATA if rank is None else f"__{rank}{METADATA}"])
            return super().read_metadata(*args, **kwargs)

        def read_data(self, plan, planner):
            files.ensure(sorted({self.storage_data[item.storage_index].relative_path for item in plan.items}))
            return super().read_data(plan, planner)

    return FetchingReader(str(files.local))


def restore(mgr, states: dict[str, Stateful]) -> Optional[Restored]:
    """Load the checkpoint to start from (see module doc); None = fresh start. A checkpoint
    whose files fail verification on any node is skipped by every rank alike and the next
    older candidate is tried."""
    t0 = time.perf_counter()
    skip: list[str] = []  # URIs found corrupt by some node during this restore
    fetched_files: list[str] = []
    fetched_bytes = 0
    while True:
        choice: dict[str, Any] = {}
        if mgr.rank == 0:
            try:
                choice = choose(mgr, skip)
            except Exception as e:  # noqa: BLE001 - told to every rank below
                choice = {"error": short(e, 800)}
        choice = mgr.broadcast(choice)
        if choice.get("error"):
            mgr.metrics.failures.labels(phase="load").inc()
            raise CheckpointError(f"choosing a checkpoint in {mgr.store.uri} failed: {choice['error']}")
        if not choice:
            if mgr.rank == 0:
                log.info("no checkpoint to start from in %s: fresh start of stage %s", mgr.store.uri, mgr.stage)
            return None
        files = node_files(mgr, choice)
        ref = files.ref
        restored, failure = try_load(mgr, states, files, choice["mode"])
        fetched_files += files.fetched
        fetched_bytes += files.bytes
        if failure is None:
            break
        mgr.metrics.failures.labels(phase="load").inc()
        corrupt = [c for c in mgr.all_gather(files.corrupt) if c]
        if not corrupt:
            raise failure
        if mgr.rank == 0:
            log.warning("skipping %s: %s", ref.uri, "; ".join(sorted(set(corrupt))))
        skip.append(ref.uri)
    restored.seconds = time.perf_counter() - t0
    restored.fetched_files, restored.fetched_bytes = fetched_files, fetched_bytes
    return restored


def choose(mgr, skip: list[str]) -> dict:
    """Rank 0: pick the checkpoint (manifest, marker, every file present at its size: one
    listing; the bytes are verified by the nodes that fetch them), skipping ``skip``."""
    ref = mgr.store.resolve_resume(mgr.stage, skip=skip)
    source, mode = "store", "resume"
    if ref is None and mgr.init_from:
        root, stage, step = split_checkpoint_uri(mgr.init_from)
        store = mgr.store
        if root != mgr.store.uri:
            store, source = open_store(root, **mgr.settings.store_kwargs(root)), "init_from"
        if step is None:
            ref = store.resolve_final(stage, skip=skip)
            if ref is None:
                raise CheckpointError(f"init_from {mgr.init_from}: no valid final checkpoint of stage {stage}")
        else:
            ref = store.ref_from_uri(store.step_uri(stage, step))
            if not ref.committed:
                raise CheckpointError(f"init_from {mgr.init_from} is not a committed checkpoint")
            problems = ["failed verification on a node"] if ref.uri in skip else store.verify(ref, deep=False)
            if problems:
                raise CheckpointError(f"init_from {mgr.init_from}: {'; '.join(problems)}")
        mode = "init"
    elif ref is None and mgr.prev_stage:
        ref = mgr.store.resolve_resume(mgr.stage, prev_stage=mgr.prev_stage, skip=skip)
        mode = "init"
    if ref is None:
        return {}
    if ref.stage != mgr.stage:
        mode = "init"
    return {"stage": ref.stage, "step": ref.step, "uri": ref.uri, "manifest": ref.manifest, "mode": mode,
            "source": source}


def node_files(mgr, choice: dict) -> NodeFiles:
    ref = CheckpointRef(stage=choice["stage"], step=choice["step"], uri=choice["uri"], manifest=choice["manifest"])
    store = mgr.store if choice["source"] == "store" else None
    return NodeFiles(lambda: store if store is not None else open_step_uri(ref.uri, **mgr.settings.store_kwargs(ref.uri))[0],
                     ref, mgr.download_root() / ref.stage / step_dirname(ref.step))


def try_load(mgr, states: dict[str, Stateful], files: NodeFiles, mode: str
             ) -> tuple[Optional[Restored], Optional[BaseException]]:
    """One collective load attempt: (restored, None), or (None, the error) on every rank
    alike (DCP raises on all ranks when any rank's read fails)."""
    import torch.distributed.checkpoint as dcp

    ref = files.ref
    status = ""
    try:
        files.ensure([METADATA])  # here, not inside DCP: a failure stops every rank alike
    except Exception as e:  # noqa: BLE001
        status = f"{mgr.node}: {short(e)}"
    statuses = [s for s in mgr.all_gather(status) if s]
    try:
        if statuses:
            return None, CheckpointError(f"downloading {ref.uri} failed: {'; '.join(statuses)}")
        try:
            restored = load(mgr, states, files, mode)
        except (Exception, dcp.CheckpointException) as e:  # DCP's error is a BaseException
            return None, e
        fetched = mgr.all_gather((mgr.node, files.fetched, files.bytes))
        if mgr.rank == 0:
            per_node: dict[str, tuple[set, int]] = {}
            for node, names, nbytes in fetched:
                seen, total = per_node.get(node, (set(), 0))
                per_node[node] = (seen | set(names), total + nbytes)
            for node, (names, nbytes) in sorted(per_node.items()):
                if names:
                    log.info("node %s fetched %d of %d checkpoint files (%.1f of %.1f MB)", node, len(names),
                             len(ref.files), nbytes / 1e6, ref.total_bytes / 1e6)
        return restored, None
    finally:
        mgr.barrier()
        if mgr.is_node_leader:
            shutil.rmtree(mgr.download_root(), ignore_errors=True)
        mgr.barrier()  # nobody fetches into the directory while it is removed


def load(mgr, states: dict[str, Stateful], files: NodeFiles, mode: str) -> Restored:
    import torch.distributed.checkpoint as dcp

    ref = files.ref
    reader = fetching_reader(files)
    keys = set(reader.read_metadata().state_dict_metadata)
    model, optim = states[MODEL_KEY], states.get(OPTIM_KEY)
    msd = model.state_dict()
    present = [k for k in msd if f"{MODEL_KEY}.{k}" in keys]
    missing = sorted(set(msd) - set(present))
    if missing and mode == "resume":
        raise CheckpointError(f"{ref.uri}: model keys missing from the checkpoint: {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    if missing:
        log.warning("%s: %d model keys not in the checkpoint keep their initial values: %s", ref.uri,
                    len(missing), missing[:5])
    sd: dict[str, Any] = {MODEL_KEY: {k: msd[k] for k in present}}
    load_optim = optim is not None and any(k.startswith(f"{OPTIM_KEY}.") for k in keys) and (
        mode == "resume" or optim.continue_schedule)
    osd: dict[str, Any] = {}
    if load_optim:
        osd = optim.state_dict()
        if mode == "resume":
            want = {k: v for k, v in osd.items() if f"{OPTIM_KEY}.{k}" in keys}
            lost = sorted(set(osd) - set(want))
            if lost:
                raise CheckpointError(f"{ref.uri}: optimizer entries missing from the checkpoint: {lost[:5]}")
        else:  # moments of the parameters both stages train; this stage's hyper-parameters
            want = {k: v for k, v in osd.items() if k.startswith("state.") and f"{OPTIM_KEY}.{k}" in keys}
        sd[OPTIM_KEY] = want
    # the other components: their own stage's state; another stage's only where they take it
    others = {name: st for name, st in states.items() if name not in (MODEL_KEY, OPTIM_KEY) and name in keys
              and (mode == "resume" or hasattr(st, "load_init_state_dict"))}
    sd.update({name: b"" for name in others})
    same_world = ref.world_size == mgr.world_size
    rkey = rng_key(mgr.rank)
    if same_world and mode == "resume" and rkey in keys:
        sd[rkey] = b""
    dcp.load(sd, storage_reader=reader, planner=safe_load.SafeLoadPlanner(), process_group=mgr.pg,
             no_dist=not mgr.distributed)
    model.load_state_dict(sd[MODEL_KEY], strict=not missing)
    fresh: list[str] = []
    if load_optim:
        full = dict(osd)
        full.update(sd[OPTIM_KEY])
        optim.load_state_dict(full)
        if mode != "resume":
            fresh = reset_unloaded_moments(optim, set(sd[OPTIM_KEY]))
    for name, st in others.items():
        if mode == "resume":
            st.load_state_dict(unpack(sd[name]))
        else:
            st.load_init_state_dict(unpack(sd[name]))
    rng_restored = False
    if rkey in sd:
        set_rng_state(unpack(sd[rkey]))
        rng_restored = True
    return Restored(ref=ref, mode=mode, step=ref.step, seconds=0.0, world_size_changed=not same_world,
                    rng_restored=rng_restored, optimizer_loaded=load_optim, missing_model_keys=missing,
                    fresh_optimizer_params=fresh)


def reset_unloaded_moments(optim, loaded: set[str]) -> list[str]:
    """After a partial optimizer load: parameters without saved moments start fresh: zero
    moments and step 0, exactly a new AdamW's state before its first step (the state stays
    complete, so later checkpoints of this stage load strictly)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    fresh = []
    opt = optim.optimizer
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in optim.module.named_parameters():
        if id(p) not in params:
            continue
        fqns = _get_fqns(optim.module, name)
        if not any(k.startswith(f"state.{f}.") for f in fqns for k in loaded):
            state = opt.state.get(p)
            for key, value in list((state or {}).items()):
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)):
                    state[key] = type(value)(0)
            fresh.extend(sorted(fqns))
    return fresh

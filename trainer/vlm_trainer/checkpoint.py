"""Checkpoints of a training stage: DCP save (async) -> S3 upload -> COMMITTED manifest, and resume.

:class:`CheckpointManager` is the engine; :func:`build_checkpointer` adapts it to the
trainer's seam (``restore`` / ``after_step`` / ``finalize`` / ``close``, see
``vlm_trainer.train.Checkpointer``).

What a checkpoint holds (one ``torch.distributed.checkpoint`` save, keys of the saved
state dict; DCP writes ``.metadata`` + ``__<rank>_0.distcp`` per rank):

==================  =====================================================================
``model.<fqn>``     model parameters/buffers from ``get_state_dict`` (canonical FQNs: the
                    same under DDP, FSDP2 or no wrapper, so any of them loads any other,
                    at any world size; FSDP2 saves its shards, DDP one replicated copy)
``optim.state.<fqn>.<k>`` / ``optim.param_groups.<fqn>.<k>``
                    AdamW moments/step and group hyper-parameters, flattened per
                    parameter FQN (``flatten_optimizer_state_dict``), so a stage whose
                    trainable set differs loads the entries of the parameters it has
``trainer``         the trainer's small replicated state (``extra_state()``: step,
                    schedule, data positions = global sample counters per source and,
                    packed, the look-ahead buffer's samples and the token carry, token
                    counts, seed ...), pickled into one bytes blob
``rng_rank<r>``     RNG states of rank r (python ``random``, numpy, torch CPU, CUDA)
==================  =====================================================================

RNG on a world-size change: each rank restores ``rng_rank<rank>`` only when the
checkpoint was written by the same world size; otherwise the RNGs are left as the trainer
seeded them (the trainer reseeds every step from (seed, global step, rank) anyway, so its
numerics do not depend on this). Model, optimizer, schedule and data positions are global
and restored exactly at any world size.

Saving (every rank; ``save``):

1. wait for the previous save (at most one in flight), ``get_state_dict``, then copy the
   tensors into CPU buffers kept across saves (pinned on CUDA; one plain copy is all the
   training loop waits for: ~1% of a synchronous save in benchmarks/checkpoint.py);
2. ``dcp.async_save`` of that copy on a DEDICATED gloo group (the training group's
   collectives would interleave with the save's), each rank writing into its node's local
   directory ``<local>/staging/<stage>/step-<N>/`` (``<local>`` = ``$VLM_CKPT_LOCAL_DIR`` or
   ``<tmp>/vlm-ckpt/<run>``, then the node: ``$VLM_NODE_ID``, else ``node<GROUP_RANK>``
   under torchrun, else the host name);
3. a background thread per rank waits for the write, then every node's leader (its lowest
   rank) uploads its node's files with ``CheckpointStore.upload_files``; the ranks exchange
   the results (``all_gather_object`` on the save group); global rank 0 writes the
   ``COMMITTED`` manifest over all nodes' files (``CheckpointStore.commit``) and prunes to
   ``keep``; the outcome is broadcast, so every rank knows the newest committed step.

A failed write/upload/commit is logged and counted (``vlmtrain_checkpoint_failures_total``)
and training goes on; the next interval saves again. The final checkpoint of a stage is
synchronous (``finalize``) and retried; the trainer exits 0 only when it committed.

Interval: an integer = every N steps; a duration = the first step at which rank 0's clock
says the interval passed, agreed with a tiny all-reduce (MAX) every ``decide_every``
steps on a second gloo group, so all ranks save at the same step.

Resume (``restore``): global rank 0 picks the newest committed checkpoint of the stage whose
files are all present at their manifest sizes (one listing, no download), else ``init_from``
(a step-directory URI), else the previous stage's final one; every rank loads with
``dcp.load`` (resharding to the current world size / wrapper) through a reader that fetches,
once per node and verified against the manifest's sha256, only the files the rank's load
plan reads: with FSDP a node downloads its ranks' shard files plus rank 0's (which holds
every replicated entry, ``dedup_save_to_lowest_rank``), rank 0's node included, not the whole
checkpoint (64 nodes: ~2/64 of it each instead of all of it). A file that fails
verification on any node fails the load on every rank alike (DCP gathers read errors), and
all ranks go back to the next older candidate. Same stage: model,
optimizer, trainer state, RNG. Another stage ("init"): model weights only; with
``continueSchedule`` also the optimizer moments of the parameters present in both stages
(others start fresh) and the trainer decides what else carries over (``mode="init"``).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from . import safe_load
from .ckpt_store import (
    CheckpointCommitConflict,
    CheckpointRef,
    CheckpointStore,
    CheckpointVerifyError,
    RetrySettings,
    TransferSettings,
    open_step_uri,
    open_store,
    split_checkpoint_uri,
    step_dirname,
)

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BLOCKING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05) + DURATION_BUCKETS
FAILURE_PHASES = ("save", "upload", "commit", "prune", "load")
TRAINER_KEY = "trainer"


class CheckpointError(RuntimeError):
    """A checkpoint could not be restored, or the final one could not be committed."""


class WorkerGroupConflict(CheckpointError):
    """Another worker group committed a step this group is saving. torchrun's c10d rendezvous
    can drop a node whose heartbeats stall without telling it, and a replacement then forms a
    second group that trains the same stage; the dropped group stops here, before it writes
    over the other's files, so that torchrun restarts it into the current round."""


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass
class CheckpointSettings:
    uri: str
    interval: int | str = "30m"  # steps (int) or a duration string
    keep: int = 3
    endpoint: str = ""
    region: str = ""
    local_dir: Optional[str] = None  # node-local staging; default $VLM_CKPT_LOCAL_DIR or <tmp>/vlm-ckpt
    async_save: bool = True
    decide_every: int = 1  # steps between collective decisions of a time interval
    final_attempts: int = 3  # tries of the final (synchronous) checkpoint
    final_backoff_s: float = 2.0
    save_timeout_s: float = 1800.0  # collectives of saves/restores (uploads and downloads wait inside)
    ctl_timeout_s: float = 60.0  # the interval decision's all-reduce
    transfer: Optional[TransferSettings] = None
    retry: Optional[RetrySettings] = None

    @classmethod
    def from_spec(cls, ckpt, **overrides) -> "CheckpointSettings":
        """From ``vlm_api.schema.Checkpoint``."""
        kw = dict(uri=ckpt.uri, interval=ckpt.interval, keep=ckpt.keep, endpoint=ckpt.endpoint or "",
                  region=ckpt.region or "")
        kw.update(overrides)
        return cls(**kw)

    def parsed_interval(self) -> tuple[str, float]:
        from vlm_api.quantities import parse_interval

        return parse_interval(self.interval)

    def open_store(self) -> CheckpointStore:
        kw: dict[str, Any] = {}
        if self.uri.startswith("s3://"):
            kw["endpoint_url"] = self.endpoint or None
            if self.region:
                kw["region"] = self.region
        return open_store(self.uri, transfer=self.transfer, retry=self.retry, **kw)


# --------------------------------------------------------------------------- what is saved


@dataclasses.dataclass
class TrainState:
    """The parts of a trainer a checkpoint saves and restores.

    ``module``: the model as trained (DDP / FSDP2 / plain); ``optimizer`` (or None);
    ``extra_state()`` -> small picklable dict identical on all ranks (step, schedule, data
    positions ...); ``load_extra_state(state, mode=...)`` with mode ``resume`` | ``init``;
    ``continue_schedule``: a stage init also loads optimizer moments; ``manifest_extra()``
    -> small JSON-able dict recorded in the COMMITTED manifest.
    """

    module: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    extra_state: Optional[Callable[[], dict]] = None
    load_extra_state: Optional[Callable[..., None]] = None
    continue_schedule: bool = False
    manifest_extra: Optional[Callable[[], dict]] = None


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


@dataclasses.dataclass
class SaveOutcome:
    stage: str
    step: int
    ok: bool
    final: bool = False
    uri: str = ""
    time: str = ""
    phase: str = ""  # failing phase when not ok
    error: str = ""
    bytes: int = 0
    save_seconds: float = 0.0  # start of the save -> all files written (DCP)
    upload_seconds: float = 0.0  # slowest node's upload
    commit_seconds: float = 0.0
    blocking_seconds: float = 0.0  # how long training waited
    pruned: list[int] = dataclasses.field(default_factory=list)
    conflict: bool = False  # another worker group committed this step (WorkerGroupConflict)


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(blob: Any) -> Any:
    """A blob of :func:`_pack`: ``torch.load(weights_only=True)`` (safe_load: no code runs)."""
    if isinstance(blob, (bytes, bytearray, io.BytesIO)):
        return safe_load.load_blob(blob)
    return blob


def rng_state() -> dict:
    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        import numpy as np

        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


# --------------------------------------------------------------------------- metrics


class CheckpointMetrics:
    """The ``vlmtrain_checkpoint_*`` series on one registry (created once per registry)."""

    def __init__(self, reg):
        from prometheus_client import Counter, Gauge, Histogram

        self.last_step = Gauge("vlmtrain_checkpoint_last_step", "Step of the newest committed checkpoint.",
                               registry=reg)
        self.last_success = Gauge("vlmtrain_checkpoint_last_success_timestamp_seconds",
                                  "Unix time the newest checkpoint was committed.", registry=reg)
        self.interval = Gauge("vlmtrain_checkpoint_interval_seconds",
                              "Configured checkpoint interval in seconds (0 when it is given in steps).",
                              registry=reg)
        self.interval_steps = Gauge("vlmtrain_checkpoint_interval_steps",
                                    "Configured checkpoint interval in steps (0 when it is a duration).",
                                    registry=reg)
        self.save = Histogram("vlmtrain_checkpoint_save_duration_seconds",
                              "Start of a save until every rank's files are written (DCP).",
                              buckets=DURATION_BUCKETS, registry=reg)
        self.upload = Histogram("vlmtrain_checkpoint_upload_duration_seconds",
                                "Upload of a checkpoint's files (slowest node).", buckets=DURATION_BUCKETS,
                                registry=reg)
        self.commit = Histogram("vlmtrain_checkpoint_commit_duration_seconds",
                                "Writing the COMMITTED manifest.", buckets=DURATION_BUCKETS, registry=reg)
        self.load = Histogram("vlmtrain_checkpoint_load_duration_seconds",
                              "Restore: choose, download, verify and load a checkpoint.",
                              buckets=DURATION_BUCKETS, registry=reg)
        self.blocking = Histogram("vlmtrain_checkpoint_blocking_seconds",
                                  "Time training was blocked by a checkpoint save.", buckets=BLOCKING_BUCKETS,
                                  registry=reg)
        self.bytes = Gauge("vlmtrain_checkpoint_bytes", "Size of the newest committed checkpoint.", registry=reg)
        self.failures = Counter("vlmtrain_checkpoint_failures", "Checkpoint saves or restores that failed, by phase.",
                                ["phase"], registry=reg)
        self.in_flight = Gauge("vlmtrain_checkpoint_in_flight", "1 while a save is being written or uploaded.",
                               registry=reg)
        self.last_info = Gauge("vlmtrain_checkpoint_last_info", "The newest committed checkpoint (value 1).", ["uri"],
                               registry=reg)
        for phase in FAILURE_PHASES:
            self.failures.labels(phase=phase)

    _lock = threading.Lock()

    @classmethod
    def for_registry(cls, reg) -> "CheckpointMetrics":
        with cls._lock:
            m = getattr(reg, "_vlm_checkpoint_metrics", None)
            if m is None:
                m = cls(reg)
                reg._vlm_checkpoint_metrics = m
            return m

    def committed(self, step: int, uri: str, when: float, nbytes: int) -> None:
        self.last_step.set(step)
        self.last_success.set(when)
        if nbytes:
            self.bytes.set(nbytes)
        self.last_info.clear()
        self.last_info.labels(uri=uri).set(1)


def _default_registry():
    try:
        from .metrics import registry

        return registry()
    except Exception:  # noqa: BLE001 - the trainer's metrics module is optional here
        from prometheus_client import CollectorRegistry

        return CollectorRegistry(auto_describe=True)


def _iso_to_unix(s: str | None) -> float:
    if not s:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0


# --------------------------------------------------------------------------- the manager


@dataclasses.dataclass
class _Pending:
    stage: str
    step: int
    final: bool
    node_dir: Path
    t_start: float
    extra: dict
    future: Any = None  # DCP future (async) or None (sync, already written)
    error: Optional[BaseException] = None  # the synchronous write failed
    t_written: float = 0.0
    blocking: float = 0.0
    thread: Optional[threading.Thread] = None
    outcome: Optional[SaveOutcome] = None


class CheckpointManager:
    """Saves and restores one stage's checkpoints (see module doc). All ranks construct it
    (collectively: it creates process groups) and call every method in the same order."""

    def __init__(self, settings: CheckpointSettings, *, stage: str, prev_stage: Optional[str] = None,
                 init_from: Optional[str] = None, registry=None, progress=None,
                 store: Optional[CheckpointStore] = None, run_name: str = "run"):
        self.settings = settings
        self.stage = stage
        self.prev_stage = prev_stage
        self.init_from = init_from or None
        self.progress = progress
        self.store = store or settings.open_store()
        self.keep = max(1, int(settings.keep))
        self.metrics = CheckpointMetrics.for_registry(registry if registry is not None else _default_registry())
        self.kind, self.every = settings.parsed_interval()
        self.metrics.interval.set(self.every if self.kind == "seconds" else 0)
        self.metrics.interval_steps.set(self.every if self.kind == "steps" else 0)

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self._pg = self._ctl = None
        if self.distributed:
            # a gloo group for saves (DCP + our exchange), one for main-thread decisions
            self._pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=settings.save_timeout_s))
            self._ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=settings.ctl_timeout_s))

        # topology: which ranks share a node (and its local directory)
        self.node = os.environ.get("VLM_NODE_ID") or (
            f"node{os.environ['GROUP_RANK']}" if os.environ.get("GROUP_RANK") else socket.gethostname())
        nodes = self._all_gather(self.node)
        self.node_ranks = [r for r, n in enumerate(nodes) if n == self.node]
        self.is_node_leader = self.rank == min(self.node_ranks)
        self.num_nodes = len(set(nodes))
        root = settings.local_dir or os.environ.get("VLM_CKPT_LOCAL_DIR") or os.path.join(
            tempfile.gettempdir(), "vlm-ckpt", run_name)
        self.node_root = Path(root) / _safe(self.node)
        if self.is_node_leader:  # stale staging/downloads of an earlier attempt on this node
            shutil.rmtree(self.node_root, ignore_errors=True)
            self.node_root.mkdir(parents=True, exist_ok=True)
        self._barrier(self._pg)

        self._stager = None
        self._pending: Optional[_Pending] = None
        self._lock = threading.Lock()
        self.last_committed: Optional[CheckpointRef] = None  # newest committed of this stage (all ranks agree)
        self.last_final = False
        self.outcomes: list[SaveOutcome] = []
        self.conflict: Optional[SaveOutcome] = None  # set by a save that met another group's commit
        self._last_save_clock = time.monotonic()
        self._closed = False
        if self.rank == 0:
            log.info("checkpoints: %s, stage %s, interval %s %s, keep %d, %s saves, %d node(s), local %s",
                     self.store.uri, stage, self.every, self.kind, self.keep,
                     "async" if settings.async_save else "sync", self.num_nodes, self.node_root)

    # ------------------------------------------------------------------ collectives
    def _all_gather(self, obj, group=None) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group if group is not None else self._pg)
        return out

    def _broadcast(self, obj, group=None):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group if group is not None else self._pg)
        return box[0]

    def _all_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (main thread; the decision group)."""
        if not self.distributed:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._ctl)
        return bool(t.item())

    def _barrier(self, group) -> None:
        if self.distributed:
            dist.barrier(group=group)

    # ------------------------------------------------------------------ paths
    def _staging_dir(self, stage: str, step: int) -> Path:
        return self.node_root / "staging" / stage / step_dirname(step)

    def _download_root(self) -> Path:
        return self.node_root / "download"

    # ------------------------------------------------------------------ interval
    def due(self, step: int) -> bool:
        """Whether an interval checkpoint is due after ``step`` completed steps (collective
        for duration intervals: every rank must call it at every step)."""
        if step <= 0:
            return False
        if self.kind == "steps":
            return step % int(self.every) == 0
        if step % max(1, self.settings.decide_every):
            return False
        flag = 1 if time.monotonic() - self._last_save_clock >= self.every else 0
        if self.distributed:
            t = torch.tensor([flag], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._ctl)
            flag = int(t.item())
        return bool(flag)

    def check_conflict(self) -> None:
        """Raise WorkerGroupConflict once a save found this step committed by another group."""
        out = self.conflict
        if out is not None:
            raise WorkerGroupConflict(f"stage {out.stage} step {out.step} was committed by another worker group "
                                      f"({out.error}): this group left the rendezvous unnoticed and stops")

    def maybe_save(self, target: TrainState, step: int) -> bool:
        self.check_conflict()
        if self.due(step):
            self.save(target, step)
            return True
        return False

    # ------------------------------------------------------------------ save
    def _state_dict(self, target: TrainState) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        if target.optimizer is not None:
            msd, osd = get_state_dict(target.module, target.optimizer,
                                      options=StateDictOptions(flatten_optimizer_state_dict=True))
        else:
            msd, osd = get_model_state_dict(target.module), None
        sd: dict[str, Any] = {"model": msd}
        if osd is not None:
            sd["optim"] = osd
        if target.extra_state is not None:
            sd[TRAINER_KEY] = _pack(target.extra_state())
        sd[_rng_key(self.rank)] = _pack(rng_state())
        return sd

    def save(self, target: TrainState, step: int, *, final: bool = False, blocking: Optional[bool] = None
             ) -> Optional[SaveOutcome]:
        """Checkpoint the state after ``step`` steps. Asynchronous unless ``blocking`` (or
        async saves are off): then the outcome is returned once committed (or failed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

        blocking = (not self.settings.async_save) if blocking is None else blocking
        t0 = time.perf_counter()
        self.wait()  # at most one in flight
        self.check_conflict()
        self._last_save_clock = time.monotonic()
        node_dir = self._staging_dir(self.stage, step)
        p = _Pending(stage=self.stage, step=step, final=final, node_dir=node_dir, t_start=t0,
                     extra=self._manifest_extra(target))
        self.metrics.in_flight.set(1)
        sd = None
        try:
            node_dir.mkdir(parents=True, exist_ok=True)
            sd = self._state_dict(target)
            if not blocking:
                sd = self._stage(sd)  # a private CPU copy: training may change the originals now
        except Exception as e:  # noqa: BLE001 - counted; the exchange below keeps ranks in step
            log.warning("checkpoint %s step %d: preparing the state failed: %s", self.stage, step, _short(e))
            p.error = e
        # every rank starts DCP's collectives, or none does
        if not self._all_ok(p.error is None) and p.error is None:
            p.error = RuntimeError("another rank could not prepare its part of the checkpoint")
        if p.error is None:
            try:
                writer = FileSystemWriter(str(node_dir), single_file_per_rank=True, sync_files=False, overwrite=True)
                # Replicated entries (DDP weights, buffers, the trainer blob) all in rank 0's file, not
                # spread over every rank's: a restoring node then needs its own ranks' files + rank 0's.
                planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
                if blocking:
                    dcp.save(sd, storage_writer=writer, planner=planner, process_group=self._pg,
                             no_dist=not self.distributed)
                    p.t_written = time.perf_counter()
                else:
                    p.future = dcp.async_save(sd, storage_writer=writer, planner=planner, process_group=self._pg,
                                              async_stager=_AlreadyStaged(), no_dist=not self.distributed)
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint %s step %d: write failed: %s", self.stage, step, _short(e))
                p.error = e
        del sd
        if blocking or p.future is None:
            p.blocking = time.perf_counter() - t0  # the upload part is reported separately below
            out = self._complete(p)
            out.blocking_seconds = time.perf_counter() - t0
            self.metrics.blocking.observe(out.blocking_seconds)
            return out
        p.blocking = time.perf_counter() - t0
        self.metrics.blocking.observe(p.blocking)
        p.thread = threading.Thread(target=self._complete, args=(p,), name=f"ckpt-{step}", daemon=True)
        with self._lock:
            self._pending = p
        p.thread.start()
        return None

    def _stage(self, sd: dict) -> dict:
        """Copy the state dict's tensors into CPU buffers kept across saves (pinned on CUDA;
        DTensors stay DTensors around their copied local shards). A plain vectorised copy
        into memory that is already mapped: the whole of what an async save blocks for."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        cuda = torch.cuda.is_available() and any(
            torch.is_tensor(v) and v.device.type == "cuda" for part in sd.values() if isinstance(part, dict)
            for v in part.values())
        staged = None
        # CPU copies run on one thread: intra-op parallel copies of many tensors stall badly
        # when cores are oversubscribed (0.3 s instead of 2 ms for 25 MB on a busy 2-core box)
        threads = torch.get_num_threads()
        if not cuda and threads > 1:
            torch.set_num_threads(1)
        try:
            if self._stager is not None:
                try:
                    staged = _copy_state_dict(sd, self._stager, non_blocking=cuda, type_check=False)
                except Exception:  # noqa: BLE001 - the structure changed: new buffers
                    staged = None
            if staged is None:
                self._stager = _create_cpu_state_dict(sd, pin_memory=cuda)
                staged = _copy_state_dict(sd, self._stager, non_blocking=cuda, type_check=False)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        if cuda:
            torch.cuda.synchronize()
        return staged

    def _manifest_extra(self, target: TrainState) -> dict:
        extra = {"world_size": self.world_size, "nodes": self.num_nodes, "format": "dcp",
                 "torch": torch.__version__}
        if target.manifest_extra is not None:
            try:
                extra.update(target.manifest_extra())
            except Exception:  # noqa: BLE001
                log.debug("manifest_extra failed", exc_info=True)
        return extra

    def _complete(self, p: _Pending) -> SaveOutcome:
        """Wait for the write, upload this node's files, exchange, commit on rank 0."""
        out = SaveOutcome(stage=p.stage, step=p.step, ok=False, final=p.final)
        try:
            mine: dict[str, Any] = {"rank": self.rank, "error": "", "phase": "", "entries": None,
                                    "upload_s": 0.0, "bytes": 0}
            if p.error is not None:
                mine.update(error=_short(p.error), phase="save")
            elif p.future is not None:
                try:
                    p.future.result()
                    p.t_written = time.perf_counter()
                except Exception as e:  # noqa: BLE001
                    mine.update(error=_short(e), phase="save")
            if not mine["error"] and self.is_node_leader and self._taken(p):
                mine.update(error=f"step {p.step} is already committed", phase="commit", conflict=True)
            if not mine["error"] and self.is_node_leader:
                try:
                    entries, stats = self.store.upload_files(p.node_dir, p.stage, p.step)
                    mine.update(entries=entries, upload_s=stats.upload_seconds, bytes=stats.bytes)
                except Exception as e:  # noqa: BLE001
                    mine.update(error=_short(e), phase="upload")
            save_s = (p.t_written or time.perf_counter()) - p.t_start
            gathered = self._all_gather(mine)
            result: dict[str, Any] = {}
            if self.rank == 0:
                result = self._commit(p, gathered, save_s)
            try:
                result = self._broadcast(result)
            except Exception as e:  # noqa: BLE001 - a peer died after the exchange
                if not result:
                    raise
                # rank 0 knows what happened (e.g. committed) even if it cannot tell the others
                log.warning("checkpoint %s step %d: outcome not broadcast: %s", p.stage, p.step, _short(e))
            out = SaveOutcome(stage=p.stage, step=p.step, ok=result["ok"], final=p.final, uri=result.get("uri", ""),
                              time=result.get("time", ""), phase=result.get("phase", ""),
                              error=result.get("error", ""), bytes=result.get("bytes", 0),
                              save_seconds=result.get("save_s", save_s), upload_seconds=result.get("upload_s", 0.0),
                              commit_seconds=result.get("commit_s", 0.0), blocking_seconds=p.blocking,
                              pruned=result.get("pruned", []), conflict=bool(result.get("conflict")))
        except Exception as e:  # noqa: BLE001 - e.g. a peer died during the exchange
            out.phase, out.error = out.phase or "save", _short(e)
            log.warning("checkpoint %s step %d: %s", p.stage, p.step, out.error)
        finally:
            if self.is_node_leader:
                shutil.rmtree(p.node_dir, ignore_errors=True)
            self.metrics.in_flight.set(0)
        self._record(out)
        p.outcome = out
        return out

    def _commit(self, p: _Pending, gathered: list[dict], save_s: float) -> dict:
        """Global rank 0: all ranks reported; commit when nothing failed."""
        res: dict[str, Any] = {"ok": False, "save_s": save_s,
                               "upload_s": max((g["upload_s"] for g in gathered), default=0.0),
                               "bytes": sum(g["bytes"] for g in gathered)}
        errors = [g for g in gathered if g["error"]]
        if errors:
            first = min(errors, key=lambda g: FAILURE_PHASES.index(g["phase"]))
            res.update(phase=first["phase"], error=f"rank {first['rank']}: {first['error']}",
                       conflict=any(g.get("conflict") for g in errors))
            return res
        entries = [e for g in gathered if g["entries"] for e in g["entries"]]
        if not any(e["path"] == ".metadata" for e in entries):
            res.update(phase="upload", error="no .metadata among the uploaded files")
            return res
        tc = time.perf_counter()
        try:
            r = self.store.commit(p.stage, p.step, entries, world_size=self.world_size, final=p.final,
                                  extra=p.extra, check_listing=self.num_nodes > 1)
        except CheckpointCommitConflict as e:
            res.update(phase="commit", error=_short(e), conflict=True)
            return res
        except Exception as e:  # noqa: BLE001
            res.update(phase="commit", error=_short(e))
            return res
        res.update(ok=True, uri=r.ref.uri, time=r.ref.time or "", commit_s=time.perf_counter() - tc,
                   bytes=r.ref.total_bytes)
        try:
            pr = self.store.prune(p.stage, self.keep)
            res["pruned"] = pr.deleted + pr.garbage
        except Exception as e:  # noqa: BLE001 - retention failing does not undo the commit
            log.warning("retention of %s/%s failed: %s", self.store.uri, p.stage, _short(e))
            self.metrics.failures.labels(phase="prune").inc()
        return res

    def _taken(self, p: _Pending) -> bool:
        """Is this step already committed (by another worker group)? Checked before uploading,
        so a dropped group never writes over a committed checkpoint's files."""
        try:
            ref = self.store.ref_from_uri(self.store.step_uri(p.stage, p.step))
        except Exception:  # noqa: BLE001 - the commit's conditional write still guards
            return False
        return ref is not None and ref.committed

    def _record(self, out: SaveOutcome) -> None:
        m = self.metrics
        self.outcomes.append(out)
        if out.conflict:
            self.conflict = out
        if out.ok:
            self.last_committed = CheckpointRef(stage=out.stage, step=out.step, uri=out.uri,
                                                manifest={"final": out.final, "time": out.time})
            self.last_final = out.final
            m.save.observe(out.save_seconds)
            m.upload.observe(out.upload_seconds)
            m.commit.observe(out.commit_seconds)
            m.committed(out.step, out.uri, _iso_to_unix(out.time) or time.time(), out.bytes)
            if self.rank == 0:
                log.info("checkpoint %s step %d committed%s: %s (%d bytes; write %.2fs, upload %.2fs, commit %.3fs, "
                         "training blocked %.3fs)", out.stage, out.step, " (final)" if out.final else "", out.uri,
                         out.bytes, out.save_seconds, out.upload_seconds, out.commit_seconds, out.blocking_seconds)
                self._progress("checkpoint", step=out.step, uri=out.uri, final=out.final, bytes=out.bytes,
                               save_s=round(out.save_seconds, 3), upload_s=round(out.upload_seconds, 3),
                               commit_s=round(out.commit_seconds, 3), blocking_s=round(out.blocking_seconds, 4),
                               pruned=out.pruned)
        else:
            m.failures.labels(phase=out.phase if out.phase in FAILURE_PHASES else "save").inc()
            if self.rank == 0:
                log.error("checkpoint %s step %d FAILED (%s): %s; training goes on, the next save retries",
                          out.stage, out.step, out.phase, out.error)
                self._progress("checkpoint_failed", step=out.step, phase=out.phase, error=out.error)

    def _progress(self, event: str, **fields) -> None:
        if self.progress is not None:
            try:
                self.progress.write(event, **fields)
            except Exception:  # noqa: BLE001
                log.debug("progress write failed", exc_info=True)

    def wait(self) -> Optional[SaveOutcome]:
        """Wait for the save in flight (if any); its outcome."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return None
        if p.thread is not None:
            p.thread.join()
        return p.outcome

    @property
    def in_flight(self) -> bool:
        with self._lock:
            return self._pending is not None

    # ------------------------------------------------------------------ final
    def finalize(self, target: TrainState, step: int, *, final: bool = True) -> SaveOutcome:
        """The synchronous checkpoint at the end of the stage (``final``) or of this run
        (``final=False``: stopped before the stage's end). Retried; raises
        :class:`CheckpointError` when it could not be committed."""
        self.wait()
        last = self.last_committed
        if last is not None and last.stage == self.stage and last.step == step:
            if not final or self.last_final:
                return self.outcomes[-1] if self.outcomes and self.outcomes[-1].step == step else SaveOutcome(
                    self.stage, step, True, final=self.last_final, uri=last.uri)
            return self._mark_final(last)
        error = ""
        for attempt in range(1, max(1, self.settings.final_attempts) + 1):
            out = self.save(target, step, final=final, blocking=True)
            if out is not None and out.ok:
                return out
            error = f"{out.phase}: {out.error}" if out is not None else "unknown"
            if out is not None and out.conflict:
                self.check_conflict()
            if attempt < self.settings.final_attempts:
                time.sleep(self.settings.final_backoff_s * attempt)
        raise CheckpointError(f"{'final' if final else 'last'} checkpoint of {self.stage} step {step} "
                              f"not committed: {error}")

    def _mark_final(self, last: CheckpointRef) -> SaveOutcome:
        res: dict[str, Any] = {}
        if self.rank == 0:
            try:
                ref = self.store.mark_final(self.store.ref_from_uri(last.uri))
                res = {"ok": True, "uri": ref.uri, "time": ref.time, "bytes": ref.total_bytes}
            except Exception as e:  # noqa: BLE001
                res = {"ok": False, "error": _short(e)}
        res = self._broadcast(res)
        if not res["ok"]:
            self.metrics.failures.labels(phase="commit").inc()
            raise CheckpointError(f"marking {last.uri} final failed: {res['error']}")
        self.last_final = True
        out = SaveOutcome(self.stage, last.step, True, final=True, uri=res["uri"], time=res["time"] or "",
                          bytes=res["bytes"])
        self.outcomes.append(out)
        if self.rank == 0:
            log.info("checkpoint %s step %d marked final: %s", self.stage, last.step, res["uri"])
            self._progress("checkpoint", step=last.step, uri=res["uri"], final=True, bytes=res["bytes"])
        return out

    # ------------------------------------------------------------------ restore
    def restore(self, target: TrainState) -> Optional[Restored]:
        """Load the checkpoint to start from (see module doc); None = fresh start.

        A checkpoint whose files fail verification on any node (sha256, size, gone) is
        skipped by every rank alike and the next older candidate is tried."""
        t0 = time.perf_counter()
        skip: list[str] = []  # URIs found corrupt by some node during this restore
        fetched_files: list[str] = []
        fetched_bytes = 0
        while True:
            choice: dict[str, Any] = {}
            if self.rank == 0:
                try:
                    choice = self._choose(skip)
                except Exception as e:  # noqa: BLE001
                    choice = {"error": _short(e)}
            choice = self._broadcast(choice)
            if choice.get("error"):
                self.metrics.failures.labels(phase="load").inc()
                raise CheckpointError(f"choosing a checkpoint in {self.store.uri} failed: {choice['error']}")
            if not choice:
                if self.rank == 0:
                    log.info("no checkpoint to start from in %s: fresh start of stage %s", self.store.uri, self.stage)
                return None
            ref = CheckpointRef(stage=choice["stage"], step=choice["step"], uri=choice["uri"],
                                manifest=choice["manifest"])
            store = self.store if choice["source"] == "store" else None
            files = _NodeFiles(lambda: store if store is not None else open_step_uri(ref.uri, **self._store_kwargs())[0],
                               ref, self._download_root() / ref.stage / step_dirname(ref.step))
            restored, failure = self._try_load(target, files, ref, choice["mode"])
            fetched_files += files.fetched
            fetched_bytes += files.bytes
            if failure is None:
                break
            self.metrics.failures.labels(phase="load").inc()
            corrupt = [c for c in self._all_gather(files.corrupt) if c]
            if not corrupt:
                raise failure
            if self.rank == 0:
                log.warning("skipping %s: %s", ref.uri, "; ".join(sorted(set(corrupt))))
            skip.append(ref.uri)
        restored.seconds = time.perf_counter() - t0
        restored.fetched_files, restored.fetched_bytes = fetched_files, fetched_bytes
        self.metrics.load.observe(restored.seconds)
        if restored.mode == "resume":
            self.last_committed = ref
            self.last_final = ref.final
            self.metrics.committed(ref.step, ref.uri, _iso_to_unix(ref.time), ref.total_bytes)
        self._last_save_clock = time.monotonic()
        if self.rank == 0:
            log.info("%s from %s (step %d, written by %s rank(s), now %d) in %.2fs%s", restored.mode, ref.uri,
                     ref.step, ref.world_size, self.world_size, restored.seconds,
                     "" if restored.rng_restored else "; RNG states not restored (world size changed)"
                     if restored.world_size_changed else "")
            self._progress("restore", step=ref.step, uri=ref.uri, mode=restored.mode,
                           load_s=round(restored.seconds, 3), world_size=self.world_size,
                           checkpoint_world_size=ref.world_size)
        return restored

    def _try_load(self, target: TrainState, files: "_NodeFiles", ref: CheckpointRef, mode: str
                  ) -> tuple[Optional[Restored], Optional[BaseException]]:
        """One collective load attempt: (restored, None), or (None, the error) on every rank
        alike (DCP raises on all ranks when any rank's read fails)."""
        import torch.distributed.checkpoint as dcp

        status = ""
        try:
            files.ensure([METADATA])  # here, not inside DCP: a failure stops every rank alike
        except Exception as e:  # noqa: BLE001
            status = f"{self.node}: {_short(e)}"
        statuses = [s for s in self._all_gather(status) if s]
        try:
            if statuses:
                return None, CheckpointError(f"downloading {ref.uri} failed: {'; '.join(statuses)}")
            try:
                restored = self._load(target, files, ref, mode)
            except (Exception, dcp.CheckpointException) as e:  # DCP's error is a BaseException
                return None, e
            fetched = self._all_gather((self.node, files.fetched, files.bytes))
            if self.rank == 0:
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
            self._barrier(self._pg)
            if self.is_node_leader:
                shutil.rmtree(self._download_root(), ignore_errors=True)
            self._barrier(self._pg)  # nobody fetches into the directory while it is removed

    def _store_kwargs(self) -> dict:
        kw: dict[str, Any] = {"transfer": self.settings.transfer, "retry": self.settings.retry}
        if self.store.uri.startswith("s3://"):
            if self.settings.endpoint:
                kw["endpoint_url"] = self.settings.endpoint
            if self.settings.region:
                kw["region"] = self.settings.region
        return kw

    def _choose(self, skip: list[str]) -> dict:
        """Rank 0: pick the checkpoint (manifest, marker, every file present at its size: one
        listing; the bytes are verified by the nodes that fetch them), skipping ``skip``."""
        ref = self.store.resolve_resume(self.stage, skip=skip)
        source, mode = "store", "resume"
        if ref is None and self.init_from:
            # a step directory (that checkpoint), or a stage prefix (its newest final one)
            root, stage, step = split_checkpoint_uri(self.init_from)
            store = self.store
            if root != self.store.uri:
                store, source = open_store(root, **self._store_kwargs()), "init_from"
            if step is None:
                ref = store.resolve_final(stage, skip=skip)
                if ref is None:
                    raise CheckpointError(f"init_from {self.init_from}: no valid final checkpoint of stage {stage}")
            else:
                ref = store.ref_from_uri(store.step_uri(stage, step))
                if ref is None or not ref.committed:
                    raise CheckpointError(f"init_from {self.init_from} is not a committed checkpoint")
                problems = ["failed verification on a node"] if ref.uri in skip else store.verify(ref, deep=False)
                if problems:
                    raise CheckpointError(f"init_from {self.init_from}: {'; '.join(problems)}")
            mode = "init"
        elif ref is None and self.prev_stage:
            ref = self.store.resolve_resume(self.stage, prev_stage=self.prev_stage, skip=skip)
            mode = "init"
        if ref is None:
            return {}
        if ref.stage != self.stage:
            mode = "init"
        return {"stage": ref.stage, "step": ref.step, "uri": ref.uri, "manifest": ref.manifest, "mode": mode,
                "source": source}

    def _load(self, target: TrainState, files: _NodeFiles, ref: CheckpointRef, mode: str) -> Restored:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        reader = _fetching_reader(files)
        keys = set(reader.read_metadata().state_dict_metadata)
        msd = get_model_state_dict(target.module)
        present = [k for k in msd if f"model.{k}" in keys]
        missing = sorted(set(msd) - set(present))
        if missing and mode == "resume":
            raise CheckpointError(f"{ref.uri}: model keys missing from the checkpoint: {missing[:5]}"
                                  f"{' ...' if len(missing) > 5 else ''}")
        if missing:
            log.warning("%s: %d model keys not in the checkpoint keep their initial values: %s", ref.uri,
                        len(missing), missing[:5])
        sd: dict[str, Any] = {"model": {k: msd[k] for k in present}}
        opts = StateDictOptions(flatten_optimizer_state_dict=True)
        load_optim = target.optimizer is not None and any(k.startswith("optim.") for k in keys) and (
            mode == "resume" or target.continue_schedule)
        osd: dict[str, Any] = {}
        if load_optim:
            osd = get_optimizer_state_dict(target.module, target.optimizer, options=opts)
            if mode == "resume":
                want = {k: v for k, v in osd.items() if f"optim.{k}" in keys}
                lost = sorted(set(osd) - set(want))
                if lost:
                    raise CheckpointError(f"{ref.uri}: optimizer entries missing from the checkpoint: {lost[:5]}")
            else:  # moments of the parameters both stages train; this stage's hyper-parameters
                want = {k: v for k, v in osd.items() if k.startswith("state.") and f"optim.{k}" in keys}
            sd["optim"] = want
        if TRAINER_KEY in keys:
            sd[TRAINER_KEY] = b""
        same_world = ref.world_size == self.world_size
        rng_key = _rng_key(self.rank)
        if same_world and mode == "resume" and rng_key in keys:
            sd[rng_key] = b""
        dcp.load(sd, storage_reader=reader, planner=safe_load.SafeLoadPlanner(), process_group=self._pg,
                 no_dist=not self.distributed)
        set_model_state_dict(target.module, sd["model"], options=StateDictOptions(strict=not missing))
        fresh: list[str] = []
        if load_optim:
            full = dict(osd)
            full.update(sd["optim"])
            set_optimizer_state_dict(target.module, target.optimizer, full, options=opts)
            if mode != "resume":
                fresh = self._reset_unloaded_moments(target, set(sd["optim"]))
        if TRAINER_KEY in sd and target.load_extra_state is not None:
            target.load_extra_state(_unpack(sd[TRAINER_KEY]), mode=mode)
        rng_restored = False
        if rng_key in sd:
            set_rng_state(_unpack(sd[rng_key]))
            rng_restored = True
        return Restored(ref=ref, mode=mode, step=ref.step, seconds=0.0, world_size_changed=not same_world,
                        rng_restored=rng_restored, optimizer_loaded=load_optim, missing_model_keys=missing,
                        fresh_optimizer_params=fresh)

    @staticmethod
    def _reset_unloaded_moments(target: TrainState, loaded: set[str]) -> list[str]:
        """After a partial optimizer load: parameters without saved moments start fresh:
        zero moments and step 0, exactly a new AdamW's state before its first step (the
        state stays complete, so later checkpoints of this stage load strictly)."""
        from torch.distributed.checkpoint.state_dict import _get_fqns

        fresh = []
        opt = target.optimizer
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p in target.module.named_parameters():
            if id(p) not in params:
                continue
            fqns = _get_fqns(target.module, name)
            if not any(k.startswith(f"state.{f}.") for f in fqns for k in loaded):
                state = opt.state.get(p)
                for key, value in list((state or {}).items()):
                    if torch.is_tensor(value):
                        value.zero_()
                    elif isinstance(value, (int, float)):
                        state[key] = type(value)(0)
                fresh.extend(sorted(fqns))
        return fresh

    # ------------------------------------------------------------------ shutdown
    def close(self, *, wait: bool = True) -> None:
        """Finish (``wait``) or abandon the save in flight and release resources."""
        if self._closed:
            return
        self._closed = True
        if wait:
            self.wait()
        elif self.in_flight:
            log.warning("abandoning the checkpoint save in flight")
        self._stager = None


class _AlreadyStaged:
    """DCP ``AsyncStager`` for a state dict that :meth:`CheckpointManager._stage` copied."""

    should_synchronize_after_execute = False
    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


METADATA = ".metadata"  # DCP's checkpoint metadata file (every rank reads it)


class _NodeFiles:
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


def _fetching_reader(files: _NodeFiles):
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


def _short(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 800 else s[:800] + "..."


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "node"


# --------------------------------------------------------------------------- trainer seam


class TrainerCheckpointer:
    """``vlm_trainer.train.Checkpointer`` over a :class:`CheckpointManager`."""

    def __init__(self, trainer, *, settings: Optional[CheckpointSettings] = None, store=None):
        cfg = trainer.cfg
        spec = cfg.spec
        idx = spec.stage_index(cfg.stage)
        self.settings = settings or CheckpointSettings.from_spec(
            spec.checkpoint, ctl_timeout_s=float(spec.elastic.process_group_timeout))
        self.manager = CheckpointManager(
            self.settings, stage=cfg.stage, prev_stage=spec.stages[idx - 1].name if idx > 0 else None,
            init_from=cfg.init_from, registry=trainer.metrics.registry, progress=trainer.progress_file,
            store=store, run_name=f"{cfg.run.namespace}-{cfg.run.name}")
        self.restored: Optional[Restored] = None
        self.committed: Optional[SaveOutcome] = None  # what finalize committed (or found committed)

    @staticmethod
    def target(trainer) -> TrainState:
        return TrainState(
            module=trainer.par.module, optimizer=trainer.optimizer, extra_state=trainer.extra_state,
            load_extra_state=trainer.load_extra_state,
            continue_schedule=bool(trainer.stage.optimizer.continue_schedule),
            manifest_extra=lambda: {"strategy": trainer.par.strategy, "total_steps": trainer.total_steps,
                                    "tokens": trainer.progress.tokens, "run": trainer.cfg.run.name})

    def restore(self, trainer) -> None:
        self.restored = self.manager.restore(self.target(trainer))

    def after_step(self, trainer, step: int) -> None:
        if step >= trainer.stop_at:  # finalize writes this one
            return
        self.manager.maybe_save(self.target(trainer), step)

    def finalize(self, trainer) -> bool:
        step = trainer.progress.step
        try:
            self.committed = self.manager.finalize(self.target(trainer), step, final=step >= trainer.total_steps)
            return True
        except CheckpointError as e:
            log.error("%s", e)
            return False

    def committed_checkpoint(self) -> Optional[dict]:
        """{"step", "uri", "final"} of the checkpoint :meth:`finalize` committed: a new save, the
        same step marked final, or the final checkpoint this process resumed (a node that
        joins after the stage ended trains nothing and finds it committed). None before."""
        out = self.committed
        if out is None or not out.ok or not out.uri:
            return None
        return {"step": out.step, "uri": out.uri, "final": out.final}

    def on_stop(self, trainer) -> bool:
        """A signal stopped the run at a step boundary (suspend, preemption, scale-in):
        checkpoint this step synchronously so the restart loses nothing."""
        return self.save_now(trainer)

    def save_now(self, trainer) -> bool:
        """A synchronous (non-final) checkpoint of the current step."""
        try:
            self.manager.finalize(self.target(trainer), trainer.progress.step, final=False)
            return True
        except CheckpointError as e:
            log.error("%s", e)
            return False

    def close(self) -> None:
        self.manager.close(wait=False)


def build_checkpointer(trainer) -> TrainerCheckpointer:
    return TrainerCheckpointer(trainer)


__all__ = [
    "CheckpointManager", "CheckpointSettings", "TrainState", "Restored", "SaveOutcome", "CheckpointError",
    "CheckpointMetrics", "TrainerCheckpointer", "build_checkpointer", "rng_state", "set_rng_state",
]

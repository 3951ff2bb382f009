"""Checkpoints of a training stage: DCP save (async) -> upload -> COMMITTED manifest, and resume.

Saving (every rank; :meth:`CheckpointManager.save`):

1. wait for the previous save (at most one in flight), take the state dict (``state.py``),
   then copy the tensors into CPU buffers kept across saves (one plain copy is all the
   training loop waits for: ~1% of a synchronous save in benchmarks/checkpoint.py);
2. ``dcp.async_save`` of that copy on a DEDICATED gloo group (the training group's
   collectives would interleave with the save's), each rank writing into its node's local
   directory ``<local>/<node>/staging/<stage>/step-<N>/`` (``<local>`` =
   ``$VLM_CKPT_LOCAL_DIR`` or ``<tmp>/vlm-ckpt/<run>``; the node: ``$VLM_NODE_ID``, else
   ``node<GROUP_RANK>`` under torchrun, else the host name);
3. a background thread per rank waits for the write, then every node's leader (its lowest
   rank) uploads its node's files (global rank 0 adds the trainer config, ``layout.CONFIG_NAME``);
   the ranks exchange the results (``all_gather_object`` on the save group); global rank 0
   writes the ``COMMITTED`` manifest over all nodes' files and prunes to ``keep``; the
   outcome is broadcast, so every rank knows the newest committed step.

A failed write/upload/commit is logged and counted (``vlmtrain_checkpoint_failures_total``)
and training goes on; the next interval saves again. The final checkpoint of a stage is
synchronous (:meth:`CheckpointManager.finalize`) and retried.

Interval: an integer = every N steps; a duration = the first step at which rank 0's clock
says the interval passed, agreed with a tiny all-reduce (MAX) every ``decide_every``
steps on a second gloo group, so all ranks save at the same step. Restore: ``restore.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from . import restore as restore_io
from .backends import open_store
from .errors import CheckpointCommitConflict, CheckpointError, WorkerGroupConflict
from .layout import CONFIG_NAME, CheckpointRef, short, step_dirname
from .metrics import FAILURE_PHASES, CheckpointMetrics, iso_to_unix
from .restore import Restored
from .state import AlreadyStaged, Stager, state_dict
from .settings import CheckpointSettings, SaveOutcome
from .store import CheckpointStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Pending:
    stage: str
    step: int
    final: bool
    node_dir: Path
    t_start: float
    extra: dict
    config_yaml: Optional[str] = None
    future: Any = None  # DCP future (async) or None (sync, already written)
    error: Optional[BaseException] = None  # the synchronous write failed
    t_written: float = 0.0
    blocking: float = 0.0
    thread: Optional[threading.Thread] = None
    outcome: Optional[SaveOutcome] = None


def _default_registry():
    from ..metrics import registry

    return registry()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "node"


class CheckpointManager:
    """Saves and restores one stage's checkpoints of ``states`` (DCP ``Stateful`` components by
    name, ``state.py``) with ``config_yaml`` beside the manifest and ``describe()`` in its
    ``extra``. All ranks construct it (collectively) and call every method in the same order."""

    def __init__(self, settings: CheckpointSettings, states: dict[str, Stateful], *, stage: str,
                 prev_stage: Optional[str] = None, init_from: Optional[str] = None, registry=None, progress=None,
                 store: Optional[CheckpointStore] = None, run_name: str = "run", config_yaml: Optional[str] = None,
                 describe: Optional[Callable[[], dict]] = None):
        from vlm_api.quantities import parse_interval

        self.settings, self.states, self.config_yaml, self.describe = settings, states, config_yaml, describe
        self.stage, self.prev_stage = stage, prev_stage
        self.init_from = init_from or None
        self.progress = progress
        self.store = store or open_store(settings.uri, **settings.store_kwargs(settings.uri))
        self.keep = max(1, int(settings.keep))
        self.metrics = CheckpointMetrics.for_registry(registry if registry is not None else _default_registry())
        self.kind, self.every = parse_interval(settings.interval)
        self.metrics.interval.set(self.every if self.kind == "seconds" else 0)
        self.metrics.interval_steps.set(self.every if self.kind == "steps" else 0)

        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.pg = self._ctl = None
        if self.distributed:
            # a gloo group for saves (DCP + our exchange), one for main-thread decisions
            self.pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=settings.save_timeout_s))
            self._ctl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=settings.ctl_timeout_s))

        # topology: which ranks share a node (and its local directory)
        self.node = os.environ.get("VLM_NODE_ID") or (
            f"node{os.environ['GROUP_RANK']}" if os.environ.get("GROUP_RANK") else socket.gethostname())
        nodes = self.all_gather(self.node)
        self.node_ranks = [r for r, n in enumerate(nodes) if n == self.node]
        self.is_node_leader = self.rank == min(self.node_ranks)
        self.num_nodes = len(set(nodes))
        root = settings.local_dir or os.environ.get("VLM_CKPT_LOCAL_DIR") or os.path.join(
            tempfile.gettempdir(), "vlm-ckpt", run_name)
        self.node_root = Path(root) / _safe(self.node)
        if self.is_node_leader:  # stale staging/downloads of an earlier attempt on this node
            shutil.rmtree(self.node_root, ignore_errors=True)
            self.node_root.mkdir(parents=True, exist_ok=True)
        self.barrier()

        self._stager = Stager()
        self._pending: Optional[_Pending] = None
        self._lock = threading.Lock()
        self.last_committed: Optional[CheckpointRef] = None  # newest committed of this stage (all ranks agree)
        self.last_final = False
        self.outcomes: list[SaveOutcome] = []
        self.restored: Optional[Restored] = None  # what restore loaded (None: a fresh start)
        self.conflict: Optional[SaveOutcome] = None  # set by a save that met another group's commit
        self._last_save_clock = time.monotonic()
        self._closed = False
        if self.rank == 0:
            log.info("checkpoints: %s, stage %s, interval %s %s, keep %d, %s saves, %d node(s), local %s",
                     self.store.uri, stage, self.every, self.kind, self.keep,
                     "async" if settings.async_save else "sync", self.num_nodes, self.node_root)

    # ------------------------------------------------------------------ collectives
    def all_gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.pg)

    def _all_ok(self, ok: bool) -> bool:
        """True when ``ok`` on every rank (main thread; the decision group)."""
        if not self.distributed:
            return ok
        t = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._ctl)
        return bool(t.item())

    def download_root(self) -> Path:
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

    def after_step(self, step: int) -> None:
        """After every optimizer step (``step`` completed): save when due."""
        self.check_conflict()
        if self.due(step):
            self.save(step)

    # ------------------------------------------------------------------ save
    def save(self, step: int, *, final: bool = False, blocking: Optional[bool] = None
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
        node_dir = self.node_root / "staging" / self.stage / step_dirname(step)
        p = _Pending(stage=self.stage, step=step, final=final, node_dir=node_dir, t_start=t0,
                     extra=self._manifest_extra(), config_yaml=self.config_yaml)
        self.metrics.in_flight.set(1)
        sd = None
        try:
            node_dir.mkdir(parents=True, exist_ok=True)
            sd = state_dict(self.states, self.rank)
            if not blocking:
                sd = self._stager.stage(sd)  # a private CPU copy: training may change the originals now
        except Exception as e:  # noqa: BLE001 - counted; the exchange below keeps ranks in step
            log.warning("checkpoint %s step %d: preparing the state failed: %s", self.stage, step, short(e))
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
                    dcp.save(sd, storage_writer=writer, planner=planner, process_group=self.pg,
                             no_dist=not self.distributed)
                    p.t_written = time.perf_counter()
                else:
                    p.future = dcp.async_save(sd, storage_writer=writer, planner=planner, process_group=self.pg,
                                              async_stager=AlreadyStaged(), no_dist=not self.distributed)
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint %s step %d: write failed: %s", self.stage, step, short(e))
                p.error = e
        del sd
        p.blocking = time.perf_counter() - t0
        if blocking or p.future is None:
            out = self._complete(p)
            out.blocking_seconds = time.perf_counter() - t0
            self.metrics.blocking.observe(out.blocking_seconds)
            return out
        self.metrics.blocking.observe(p.blocking)
        p.thread = threading.Thread(target=self._complete, args=(p,), name=f"ckpt-{step}", daemon=True)
        with self._lock:
            self._pending = p
        p.thread.start()
        return None

    def _manifest_extra(self) -> dict:
        extra = {"world_size": self.world_size, "nodes": self.num_nodes, "format": "dcp", "torch": torch.__version__}
        if self.describe is not None:
            extra.update(self.describe())
        return extra

    def _complete(self, p: _Pending) -> SaveOutcome:
        """Wait for the write, upload this node's files, exchange, commit on rank 0."""
        out = SaveOutcome(stage=p.stage, step=p.step, ok=False, final=p.final)
        try:
            mine: dict[str, Any] = {"rank": self.rank, "error": "", "phase": "", "entries": None,
                                    "upload_s": 0.0, "bytes": 0}
            if p.error is not None:
                mine.update(error=short(p.error, 800), phase="save")
            elif p.future is not None:
                try:
                    p.future.result()
                    p.t_written = time.perf_counter()
                except Exception as e:  # noqa: BLE001
                    mine.update(error=short(e, 800), phase="save")
            if not mine["error"] and self.is_node_leader and self._taken(p):
                mine.update(error=f"step {p.step} is already committed", phase="commit", conflict=True)
            if not mine["error"] and self.is_node_leader:
                try:
                    if self.rank == 0 and p.config_yaml:
                        (p.node_dir / CONFIG_NAME).write_text(p.config_yaml, encoding="utf-8")
                    entries, stats = self.store.upload_files(p.node_dir, p.stage, p.step)
                    mine.update(entries=entries, upload_s=stats.upload_seconds, bytes=stats.bytes)
                except Exception as e:  # noqa: BLE001
                    mine.update(error=short(e, 800), phase="upload")
            save_s = (p.t_written or time.perf_counter()) - p.t_start
            gathered = self.all_gather(mine)
            result: dict[str, Any] = {}
            if self.rank == 0:
                result = self._commit(p, gathered, save_s)
            try:
                result = self.broadcast(result)
            except Exception as e:  # noqa: BLE001 - a peer died after the exchange
                if not result:
                    raise
                # rank 0 knows what happened (e.g. committed) even if it cannot tell the others
                log.warning("checkpoint %s step %d: outcome not broadcast: %s", p.stage, p.step, short(e))
            out = SaveOutcome(stage=p.stage, step=p.step, ok=result["ok"], final=p.final, uri=result.get("uri", ""),
                              time=result.get("time", ""), phase=result.get("phase", ""),
                              error=result.get("error", ""), bytes=result.get("bytes", 0),
                              save_seconds=result.get("save_s", save_s), upload_seconds=result.get("upload_s", 0.0),
                              commit_seconds=result.get("commit_s", 0.0), blocking_seconds=p.blocking,
                              pruned=result.get("pruned", []), conflict=bool(result.get("conflict")))
        except Exception as e:  # noqa: BLE001 - e.g. a peer died during the exchange
            out.phase, out.error = out.phase or "save", short(e, 800)
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
        if not any(e["path"] == restore_io.METADATA for e in entries):
            res.update(phase="upload", error="no .metadata among the uploaded files")
            return res
        tc = time.perf_counter()
        try:
            r = self.store.commit(p.stage, p.step, entries, world_size=self.world_size, final=p.final,
                                  extra=p.extra, check_listing=self.num_nodes > 1)
        except CheckpointCommitConflict as e:
            res.update(phase="commit", error=short(e, 800), conflict=True)
            return res
        except Exception as e:  # noqa: BLE001
            res.update(phase="commit", error=short(e, 800))
            return res
        res.update(ok=True, uri=r.ref.uri, time=r.ref.time or "", commit_s=time.perf_counter() - tc,
                   bytes=r.ref.total_bytes)
        try:
            pr = self.store.prune(p.stage, self.keep)
            res["pruned"] = pr.deleted + pr.garbage
        except Exception as e:  # noqa: BLE001 - retention failing does not undo the commit
            log.warning("retention of %s/%s failed: %s", self.store.uri, p.stage, short(e))
            self.metrics.failures.labels(phase="prune").inc()
        return res

    def _taken(self, p: _Pending) -> bool:
        """Is this step already committed (by another worker group)? Checked before uploading,
        so a dropped group never writes over a committed checkpoint's files."""
        try:
            return self.store.ref_from_uri(self.store.step_uri(p.stage, p.step)).committed
        except Exception:  # noqa: BLE001 - the commit's conditional write still guards
            return False

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
            m.committed(out.step, out.uri, iso_to_unix(out.time) or time.time(), out.bytes)
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
            except (OSError, ValueError):  # a full disk, or closed by a trainer that did not wait
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
    def finalize(self, step: int, *, final: bool = True) -> SaveOutcome:
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
            out = self.save(step, final=final, blocking=True)
            if out.ok:
                return out
            error = f"{out.phase}: {out.error}"
            if out.conflict:
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
                res = {"ok": False, "error": short(e, 800)}
        res = self.broadcast(res)
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
    def restore(self) -> Optional[Restored]:
        """Load the checkpoint to start from (``restore.py``); None = fresh start."""
        restored = self.restored = restore_io.restore(self, self.states)
        if restored is None:
            return None
        ref = restored.ref
        self.metrics.load.observe(restored.seconds)
        if restored.mode == "resume":
            self.last_committed = ref
            self.last_final = ref.final
            self.metrics.committed(ref.step, ref.uri, iso_to_unix(ref.time), ref.total_bytes)
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

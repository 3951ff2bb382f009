"""`vlmpretrain local FILE`: run a VLMPretrainRun's stages on this machine.

The same path a cluster takes, minus Kubernetes: the manifest is validated, each stage's
`TrainerConfig` is rendered by `vlm_api.render.build_trainer_config` (what the operator
puts in the stage's ConfigMap), and the stage's launch description is
`vlm_api.launch.describe`'s (what the PyTorchJob renderer turns into a container):
``torchrun -m vlm_trainer --config FILE`` with the rendezvous in ``PET_*`` variables. Only
what is local changes: the rendezvous endpoint (``localhost:<free port>``), the config
path, the node range (``--nnodes``), processes per node (``--nproc``) and a few
environment variables (progress file, metrics port, per-rank log tee, thread count). The
description runs as a torchx AppDef (appdef.py) on torchx's ``local_cwd`` scheduler: one
torchrun agent per replica, each in its own session, all logs under ``<run-dir>/logs/``.

Stages run in order; stage k > 0 is initialised from stage k-1's final checkpoint
(``stage_policy.init_from``). A stage is done when its final checkpoint is confirmed, not
when every replica exits 0 (vlm_api/stage_policy.py): each replica gets a termination-log file,
``<run-dir>/<stage>/termination-<replica>.json`` (``$VLM_TERMINATION_LOG``), where the
trainer's global rank 0 writes ``stage_policy.confirmation`` once the stage's final
checkpoint is committed. After the replicas end, the stage is completed when a replica
confirmed it (``stage_policy.confirmed_final``) or the store holds its committed final
checkpoint (``stage_policy.is_final``), whatever the exit codes: a lost replica (a killed
agent) exits non-zero while the survivors finish the stage. It failed only when nothing
confirms it. Re-running the same command resumes: a stage whose final checkpoint is
committed is skipped, and a stage with committed checkpoints of its own resumes from the
newest (the trainer's checkpointer decides that; the runner only passes ``init_from``).
``--max-steps N`` caps the stage at step N (an absolute step of the stage, a resumable
prefix: the LR schedule is the whole stage's). A stage that the cap cuts short has no final
checkpoint, so later stages do not start (they would train on a prefix of their
initialisation): the run stops there ("capped", once a checkpoint at step N is committed,
also when a replica was lost), and the same command without ``--max-steps`` continues the
stage from step N.

Ctrl-C: the first SIGINT (or SIGTERM) sends SIGTERM to the torchrun agents, which pass it
to their workers; the trainer stops at the next step boundary. After a grace period, or
at a second Ctrl-C, everything left is SIGKILLed. torchrun's workers run in their own
sessions, so the runner records every descendant's pid (and start time) while it runs and
kills the ones still alive by pid at the end; it also makes itself a child subreaper, so
workers orphaned by a dead agent are still its descendants. A checkpoint counts only with
its ``COMMITTED`` manifest, which the store writes last; after an interrupt the runner
deletes the stage's uncommitted step directories (once no trainer process is alive), so
nothing half-written is left that looks like a checkpoint.

This module does not import torch: the runner starts in well under a second.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Callable
from urllib.parse import urlparse

import yaml

from vlm_api import launch, render, schema, stage_policy
from vlm_api.quantities import expand_braces
from vlm_api.validate import load_documents, validate_text

from . import appdef as local_app
from .view import StageState, StageView, ProgressTail, state_from_file, summary_dict, summary_table

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
STOP_GRACE_S = float(os.environ.get("VLM_LOCAL_STOP_GRACE_S", "60"))
LOCAL_MAX_RESTARTS = 3


class LocalRunError(RuntimeError):
    """A problem the user can fix (bad file, missing data, missing checkpoint)."""


# --------------------------------------------------------------------------- options


@dataclasses.dataclass
class LocalOptions:
    file: str
    nproc: int | None = None
    nnodes: tuple[int, int] | None = None
    checkpoint_dir: str | None = None
    max_steps: int | None = None
    metrics_port: int | None = None
    stage: str | None = None
    run_dir: str | None = None
    progress: str = "auto"  # auto | bar | plain
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # extra worker env (tests, tuning)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LocalOptions":
        return cls(file=args.file, nproc=args.nproc, nnodes=parse_nnodes(args.nnodes) if args.nnodes else None,
                   checkpoint_dir=args.checkpoint_dir, max_steps=args.max_steps, metrics_port=args.metrics_port,
                   stage=args.stage, run_dir=args.run_dir, progress=getattr(args, "progress", "auto") or "auto")


def parse_nnodes(value: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1:2' -> (1, 2)."""
    try:
        lo, _, hi = value.partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise LocalRunError(f"--nnodes {value!r}: expected N or MIN:MAX") from None
    if not 1 <= lo_i <= hi_i:
        raise LocalRunError(f"--nnodes {value!r}: need 1 <= MIN <= MAX")
    return lo_i, hi_i


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `local` options (argparse only; cli.py keeps its own copy of this block)."""
    p.add_argument("file", metavar="FILE", help="VLMPretrainRun manifest (e.g. examples/demo.yaml)")
    p.add_argument("--nproc", type=int, help="worker processes per node (default: 1 on CPU, gpusPerNode with GPUs)")
    p.add_argument("--nnodes", metavar="MIN:MAX", help="torchrun agents on localhost, as an elastic range (default: 1)")
    p.add_argument("--checkpoint-dir", help="use this directory instead of spec.checkpoint.uri")
    p.add_argument("--max-steps", type=int, help="stop every stage after this many steps (a resumable prefix)")
    p.add_argument("--metrics-port", type=int, help="rank 0's Prometheus port (default: spec.metrics.port, else a free one)")
    p.add_argument("--stage", help="run only this stage (initialised from the previous stage's final checkpoint)")
    p.add_argument("--run-dir", help="configs, progress files, logs and summary (default: runs/<name>)")
    p.add_argument("--progress", choices=["auto", "bar", "plain"], default="auto",
                   help="progress bar (terminal) or plain log lines (default: auto)")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def local_checkpoint_uri(uri: str, base: Path) -> str:
    """A checkpoint URI the trainer can use from any working directory.

    ``s3://...`` is returned as given. Local ones (``file:///abs``, ``file://./rel``,
    ``./rel``, ``/abs``) become ``file:///absolute/path`` resolved against ``base``:
    ``file://./x`` would otherwise parse as host ``.`` and path ``/x``.
    """
    if uri.startswith("s3://"):
        return uri
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        path = (parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else parsed.path
    else:
        path = uri
    p = Path(path)
    if not p.is_absolute():
        p = base / p
    return p.resolve().as_uri()


@functools.lru_cache(maxsize=1)
def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.strip().startswith("GPU"))


def missing_shards(spec: schema.VLMPretrainRunSpec, stage: schema.Stage, base: Path) -> list[str]:
    """Local shard files the stage reads that do not exist (s3:// is not checked)."""
    names = {n for n, f in stage.mixture.items() if f > 0}
    missing = []
    for src in spec.data.sources:
        uris = ([src.uri] if src.name in names else []) + ([src.validation_uri] if src.validation_uri else [])
        for uri in uris:
            if uri.startswith("s3://"):
                continue
            for path in expand_braces(uri):
                p = Path(urlparse(path).path if path.startswith("file://") else path)
                if not p.is_absolute():
                    p = base / p
                if not p.exists():
                    missing.append(str(p))
    return missing


# --------------------------------------------------------------------------- processes


def _read_stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time in clock ticks, state) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return int(fields[1]), int(fields[19]), fields[0]
    except (IndexError, ValueError):
        return None


def _proc_table() -> dict[int, tuple[int, int, str]]:
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _set_child_subreaper() -> bool:
    """Orphaned descendants (workers of a killed agent) re-parent to this process (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class ProcessTracker:
    """Remembers every process below the given roots (the torchrun agents) by pid + start time.

    torchrun's workers live in their own sessions: a process-group kill of an agent does not
    reach them, and a SIGKILLed agent leaves them running. What was seen here can be killed
    by pid later, and the start time guards against a recycled pid.
    """

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}  # pid -> start time
        self.roots: set[int] = set()
        self.me = os.getpid()

    def set_roots(self, pids) -> None:
        self.roots = set(pids)

    def poll(self) -> None:
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        # Descendants of the agents, plus orphans re-parented to us (subreaper) that are not agents.
        stack = list(self.roots) + [p for p in children.get(self.me, []) if p in self.seen or p in self.roots]
        while stack:
            pid = stack.pop()
            if pid not in table:
                continue
            if pid not in self.seen:
                self.seen[pid] = table[pid][1]
            stack.extend(children.get(pid, []))
        self._reap_orphans(table)

    def _reap_orphans(self, table) -> None:
        for pid, (ppid, _, state) in table.items():
            if ppid == self.me and pid in self.seen and pid not in self.roots and state == "Z":
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)

    def alive(self) -> list[int]:
        out = []
        for pid, start in self.seen.items():
            st = _read_stat(pid)
            if st is not None and st[1] == start and st[2] != "Z":
                out.append(pid)
        return out

    def signal_all(self, sig: int, *, exclude_roots: bool = False) -> list[int]:
        hit = []
        for pid in self.alive():
            if exclude_roots and pid in self.roots:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                hit.append(pid)
        return hit


# --------------------------------------------------------------------------- the runner


@dataclasses.dataclass
class LocalResult:
    exit_code: int
    run_dir: Path
    checkpoint_uri: str
    stages: list[StageState]
    interrupted: bool = False
    final_checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> final checkpoint URI


class LocalRunner:
    def __init__(self, opts: LocalOptions, out: IO[str] | None = None, *, base: Path | None = None):
        self.opts = opts
        self.out = out or sys.stdout
        self.base = (base or Path.cwd()).resolve()
        self.interrupts = 0
        self._interrupt_time = 0.0
        self.tracker = ProcessTracker()

    # ---- output
    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ---- loading
    def load(self) -> tuple[dict, schema.VLMPretrainRunSpec]:
        path = Path(self.opts.file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise LocalRunError(f"{path}: {exc.strerror or exc}") from None
        problems = validate_text(text)
        if problems:
            raise LocalRunError("\n".join(f"{path}: {p}" for p in problems))
        docs = load_documents(text)
        runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == schema.KIND]
        if len(runs) != 1:
            raise LocalRunError(f"{path}: expected exactly one {schema.KIND}, found {len(runs)}")
        doc = runs[0]
        meta = doc.get("metadata") or {}
        run = {"name": meta.get("name") or path.stem, "namespace": meta.get("namespace", "default"),
               "uid": meta.get("uid", "")}
        return run, schema.parse_spec(doc["spec"])

    def localize(self, spec: schema.VLMPretrainRunSpec) -> schema.VLMPretrainRunSpec:
        """The spec with what is local changed: checkpoint location, node range, no external store."""
        spec = spec.model_copy(deep=True)
        uri = self.opts.checkpoint_dir or spec.checkpoint.uri
        spec.checkpoint.uri = local_checkpoint_uri(uri, self.base)
        if self.opts.nnodes:
            spec.resources.nodes = schema.NodeRange(min=self.opts.nnodes[0], max=self.opts.nnodes[1])
        # --nnodes MIN:MAX with elastic.externalStore: the same store process as in a cluster
        # (`vlmpretrain rendezvous-store`, a subprocess here); otherwise the agent bound to
        # the endpoint hosts it.
        spec.elastic.external_store = bool(self.opts.nnodes) and spec.elastic.external_store
        return spec

    @contextlib.contextmanager
    def rendezvous_store(self, spec: schema.VLMPretrainRunSpec):
        """Start `vlmpretrain rendezvous-store --port 0 --health-port 0` when the spec asks for
        an external store; yields its port (None without one); stops it at the end."""
        self._store_port = None
        if not spec.elastic.external_store:
            yield None
            return
        import re
        import subprocess
        import tempfile

        log = tempfile.NamedTemporaryFile("w+", prefix="vlm-rdzv-store-", suffix=".log", delete=False)
        cmd = [sys.executable, "-c", "import sys; from vlm_api.cli import main; sys.exit(main())",
               "rendezvous-store", "--port", "0", "--health-port", "0"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while self._store_port is None:
                m = re.search(r"rendezvous-store listening port=(\d+)", Path(log.name).read_text())
                if m:
                    self._store_port = int(m.group(1))
                elif proc.poll() is not None or time.monotonic() > deadline:
                    raise LocalRunError(f"the rendezvous store did not start: {Path(log.name).read_text()[-2000:]}")
                else:
                    time.sleep(0.1)
            self.say(f"rendezvous store (external, is_host=false) on 127.0.0.1:{self._store_port}")
            yield self._store_port
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            log.close()
            with contextlib.suppress(OSError):
                os.unlink(log.name)

    def nproc(self, spec: schema.VLMPretrainRunSpec) -> int:
        if self.opts.nproc:
            if self.opts.nproc < 1:
                raise LocalRunError("--nproc must be >= 1")
            return self.opts.nproc
        want = spec.resources.gpus_per_node
        if want <= 0:
            return 1
        gpus = _gpu_count()
        if gpus == 0:
            self.say(f"note: the recipe asks for {want} GPUs per node and this machine has none: "
                     "running 1 CPU process per node (use --nproc to change)")
            return 1
        return min(want, gpus)

    # ---- checkpoints
    def store(self, spec: schema.VLMPretrainRunSpec):
        from vlm_trainer.checkpoint import open_store

        return open_store(spec.checkpoint.uri, endpoint_url=spec.checkpoint.endpoint or None)

    @staticmethod
    def final_checkpoint(store, stage: schema.Stage):
        """The stage's committed final checkpoint (the stage is complete), or None."""
        for ref in store.committed(stage.name):
            if stage_policy.is_final(stage, ref.step, ref.final):
                return ref
        return None

    def capped(self, store, stage: schema.Stage):
        """The newest committed checkpoint at or past --max-steps (this invocation's work is done)."""
        if not self.opts.max_steps:
            return None
        newest = store.latest_committed(stage.name)
        return newest if newest is not None and newest.step >= self.opts.max_steps else None

    def init_source(self, store, spec: schema.VLMPretrainRunSpec, index: int, finals: dict[str, dict]) -> str | None:
        """`stage_policy.init_from` over the final checkpoints known so far (confirmed in this
        invocation, else the store's committed final one of the previous stage)."""
        if index <= 0:
            return None
        prev = spec.stages[index - 1]
        if prev.name not in finals:
            ref = self.final_checkpoint(store, prev)
            if ref is not None:
                finals[prev.name] = {"stage": prev.name, "step": ref.step, "uri": ref.uri}
        uri = stage_policy.init_from(spec, index, finals)
        if uri is not None:
            return uri
        raise LocalRunError(
            f"stage {prev.name!r} has no committed final checkpoint in {store.uri}: "
            f"run it first (vlmpretrain local {self.opts.file} --stage {prev.name})")

    def _say_capped(self, stage: schema.Stage) -> None:
        later = [s.name for s in self._spec.stages[self._spec.stage_index(stage.name) + 1:]]
        if later and not self.opts.stage:
            self.say(f"[{stage.name}] stopped at --max-steps {self.opts.max_steps}: stage(s) {later} start from "
                     f"this stage's final checkpoint; run again without --max-steps to continue")

    def cleanup_uncommitted(self, store, stage: str) -> list[int]:
        """Delete step directories without a valid COMMITTED manifest (nothing is writing now)."""
        removed = []
        for ref in store.checkpoints(stage):
            if not ref.committed:
                with contextlib.suppress(Exception):
                    store.delete(ref)
                    removed.append(ref.step)
        return removed

    # ---- signals
    def _on_signal(self, signum, _frame) -> None:
        self.interrupts += 1
        self._interrupt_time = time.monotonic()

    @contextlib.contextmanager
    def signals(self):
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ---- one stage
    def appdef(self, run: dict, spec: schema.VLMPretrainRunSpec, stage: str, *, config_path: Path,
               progress_path: Path, nproc: int, metrics_port: int):
        cluster = render.rendezvous(run, spec, stage)  # the operator's; only the endpoint is local
        store_port = getattr(self, "_store_port", None)
        endpoint = f"127.0.0.1:{store_port}" if store_port else f"localhost:{free_port()}"
        rdzv = launch.Rendezvous(run_id=cluster.run_id, endpoint=endpoint, conf=cluster.conf)
        replicas = spec.resources.nodes.max
        threads = max(1, (os.cpu_count() or 1) // max(1, nproc * replicas))
        env = {
            "PET_NPROC_PER_NODE": str(nproc),
            # A local failure is mostly deterministic (a bad recipe, missing data): fail after a few
            # worker-group restarts instead of the cluster's budget (3 covers gloo's start-up flakes).
            "PET_MAX_RESTARTS": str(min(spec.elastic.max_restarts, LOCAL_MAX_RESTARTS)),
            "PET_TEE": "3",  # every rank's stdout+stderr in the agent's log (prefixed) and per-rank files
            "VLM_PROGRESS_FILE": str(progress_path),
            "VLM_METRICS_PORT": str(metrics_port),
            "VLM_METRICS_EVERY_NODE": "0",  # local agents share one host and its port: rank 0 alone serves
            "VLM_CKPT_LOCAL_DIR": str(progress_path.parent.parent / "staging"),  # DCP staging, per node
            # the replica's "termination message" (torchx substitutes the replica id)
            stage_policy.TERMINATION_LOG_ENV: str(termination_log(progress_path.parent, local_app.REPLICA_ID)),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
            # the venv's torchrun, also when the venv is not activated
            "PATH": os.path.dirname(sys.executable),
        }
        env.update(self.opts.env)
        trainer = launch.describe(spec, name=render.job_name(run["name"], stage), rdzv=rdzv,
                                  config_path=str(config_path), env=env)
        return local_app.to_appdef(trainer, cpu_procs=nproc if _gpu_count() == 0 else None)

    def run_stage(self, runner, run: dict, spec: schema.VLMPretrainRunSpec, stage: schema.Stage, *,
                  init_from: str | None, run_dir: Path, nproc: int, metrics_port: int,
                  store=None) -> tuple[StageState, dict | None]:
        """Run the stage's replicas to their end; (state, the stage's final checkpoint
        {stage, step, uri, tokens[, validationLoss]} or None when nothing confirms it)."""
        stage_dir = run_dir / stage.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        for old in stage_dir.glob(TERMINATION_GLOB):  # an earlier invocation's: not this one's news
            old.unlink(missing_ok=True)
        config = render.build_trainer_config(run, spec, stage.name, init_from)
        if self.opts.max_steps:
            config["maxSteps"] = self.opts.max_steps
        schema.TrainerConfig.model_validate(config)  # what the trainer will load
        config_path = stage_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        progress_path = stage_dir / "progress.jsonl"
        app = self.appdef(run, spec, stage.name, config_path=config_path, progress_path=progress_path,
                          nproc=nproc, metrics_port=metrics_port)
        state = StageState(stage.name, init_from=init_from)
        view = StageView(state, self.out, mode=self.opts.progress)
        tail = ProgressTail(progress_path)
        log_root = run_dir / "logs"
        t0 = time.monotonic()
        handle, agents = local_app.submit(runner, app, log_root)
        app_id = handle.rsplit("/", 1)[-1]
        app_log_dir = next(iter(sorted(log_root.glob(f"*/{app_id}"))), log_root / app_id)
        view.message(f"torchrun x{spec.resources.nodes.max} agent(s) x {nproc} process(es); logs: "
                     f"{_rel(app_log_dir, self.base)}")
        self.tracker.set_roots(agents)
        sent_term = killed = False
        app_state = None
        attempts_seen = 1
        restarts_allowed = min(spec.elastic.max_restarts, LOCAL_MAX_RESTARTS)
        from torchx.specs import is_terminal

        while True:
            self.tracker.poll()
            view.feed(tail.read())
            if self.interrupts and not sent_term:
                sent_term = True
                view.message("interrupted: stopping the trainer at the next step boundary "
                             "(Ctrl-C again to kill now)")
                self.tracker.signal_all(signal.SIGTERM)  # agents pass it on; workers stop at a step boundary
            if sent_term and not killed and (self.interrupts >= 2 or time.monotonic() - self._interrupt_time > STOP_GRACE_S):
                killed = True
                view.message("killing the trainer processes")
                self.tracker.signal_all(signal.SIGKILL)
            attempts = len({p.name for p in _attempt_dirs(app_log_dir)})
            if attempts > attempts_seen and not self.interrupts:
                attempts_seen = attempts
                view.message(f"the worker group failed and torchrun restarted it (restart {attempts - 1} "
                             f"of at most {restarts_allowed}); it resumes from the newest committed checkpoint")
            status = runner.status(handle)
            app_state = status.state if status is not None else None
            if app_state is None or is_terminal(app_state):
                break
            time.sleep(0.2)
        self.tracker.poll()
        view.feed(tail.read())
        lingering = self.tracker.signal_all(signal.SIGKILL, exclude_roots=False)
        if lingering:
            view.message(f"killed lingering trainer process(es) {sorted(lingering)}")
            _wait_gone(self.tracker, 10)
        state.wall_s = time.monotonic() - t0
        state.note = _rel(app_log_dir, self.base)
        succeeded = app_state is not None and app_state.name == "SUCCEEDED"
        exits = local_app.replica_exit_codes(app_log_dir)
        lost = {i: rc for i, rc in exits.items() if rc != 0}
        # Done = confirmed by a replica (or the final checkpoint committed), whatever the exit codes.
        messages = {p.name: _read_text(p) for p in sorted(stage_dir.glob(TERMINATION_GLOB))}
        final = stage_policy.confirmed_final(list(messages.values()), stage.name)
        by = [name for name, m in messages.items() if stage_policy.parse_confirmation(m, stage.name)]
        committed = self.final_checkpoint(store, stage) if store is not None else None
        if final is None and committed is not None:
            tokens = ((committed.manifest or {}).get("extra") or {}).get("tokens")
            final = {"stage": stage.name, "step": committed.step, "uri": committed.uri,
                     "tokens": int(tokens) if isinstance(tokens, int) else None}
            view.message(f"no replica confirmed the stage, but its final checkpoint (step {committed.step}) is "
                         f"committed: {committed.uri}")
        elif final is not None:
            view.message(f"final checkpoint step {final['step']} confirmed ({', '.join(by)}): {final['uri']}")
        capped = self.capped(store, stage) if final is None and store is not None and not self.interrupts else None
        if final is not None or capped is not None:
            state.status, state.error = ("completed", None) if final is not None else ("capped", None)
            if final is not None:
                state.final_checkpoint = final["uri"]
            state.step = max(state.step, final["step"] if final is not None else capped.step)
            if lost or not succeeded:
                what = ", ".join(_replica_end(i, rc) for i, rc in sorted(lost.items())) or (
                    f"torchx reports the app {app_state.name if app_state is not None else 'gone'}")
                done = (f"the stage completed (final checkpoint step {final['step']})" if final is not None
                        else f"--max-steps {self.opts.max_steps} was reached (committed checkpoint step {capped.step})")
                note = f"{what}, but {done}"
                view.message(note)
                state.note = f"{note}; logs {state.note}"
        elif self.interrupts:
            state.status = "stopped"
        elif state.status not in ("completed", "failed", "stopped"):
            state.status = "completed" if succeeded else "failed"
        if final is None and not succeeded and state.status == "completed":
            state.status = "failed"
            state.error = state.error or f"torchx reports the app {app_state.name if app_state else 'gone'}"
        view.close()
        if state.status == "failed":
            if lost:
                self.say(f"[{stage.name}] no replica confirmed the stage's final checkpoint; "
                         + ", ".join(_replica_end(i, rc) for i, rc in sorted(lost.items())))
            self._show_failure(app_log_dir)
        return state, final

    def _show_failure(self, app_log_dir: Path, lines: int = 25) -> None:
        """The failing worker's own error (its per-rank stderr of the last attempt), else the agents' logs."""
        attempts = _attempt_dirs(app_log_dir)
        shown = 0
        if attempts:
            # the trainer logs its exception to stdout (logging), Python's last words go to stderr
            for path in sorted(attempts[-1].glob("*/stdout.log")) + sorted(attempts[-1].glob("*/stderr.log")):
                try:
                    text = path.read_text(errors="replace").splitlines()
                except OSError:
                    continue
                if any("Traceback" in line or "Error" in line for line in text):
                    tail = text[-lines:]
                    self.say(f"---- last {len(tail)} lines of {_rel(path, self.base)} (rank {path.parent.name})")
                    for line in tail:
                        self.say("  " + line)
                    shown += 1
                    break
        if not shown:
            for path in sorted(app_log_dir.glob("*/*/combined.log"))[:2]:
                try:
                    tail = path.read_text(errors="replace").splitlines()[-lines:]
                except OSError:
                    continue
                self.say(f"---- last {len(tail)} lines of {_rel(path, self.base)}")
                for line in tail:
                    self.say("  " + line)

    # ---- the whole run
    def run(self) -> LocalResult:
        run, user_spec = self.load()
        spec = self._spec = self.localize(user_spec)
        names = [s.name for s in spec.stages]
        if self.opts.stage and self.opts.stage not in names:
            raise LocalRunError(f"--stage {self.opts.stage!r}: the recipe's stages are {names}")
        todo = [s for s in spec.stages if not self.opts.stage or s.name == self.opts.stage]
        store = self.store(spec)
        for stage in todo:
            if self.final_checkpoint(store, stage) is None:
                missing = missing_shards(spec, stage, self.base)
                if missing:
                    raise LocalRunError(f"stage {stage.name!r}: {len(missing)} shard file(s) missing, e.g. "
                                        f"{missing[0]} (the demo data comes from `vlmpretrain demo`)")
        run_dir = Path(self.opts.run_dir or self.base / "runs" / run["name"]).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        nproc = self.nproc(spec)
        metrics_port = self.opts.metrics_port or (spec.metrics.port if port_free(spec.metrics.port) else free_port())
        self.say(f"run {run['name']}: {len(names)} stage(s) {names}; checkpoints in {spec.checkpoint.uri}; "
                 f"run directory {_rel(run_dir, self.base)}")
        _set_child_subreaper()
        from torchx.runner import get_runner

        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # torchx replaces them

        states: list[StageState] = []
        finals: dict[str, dict] = {}  # stage -> its final checkpoint {stage, step, uri, ...}
        exit_code = EXIT_OK
        runner = get_runner()
        local_app.prepare(runner)  # it installs signal handlers we replace below
        try:
            with self.signals(), self.rendezvous_store(spec):
                for i, stage in enumerate(spec.stages):
                    if self.opts.stage and stage.name != self.opts.stage:
                        continue
                    if self.interrupts:
                        break
                    progress_path = run_dir / stage.name / "progress.jsonl"
                    done = self.final_checkpoint(store, stage)
                    if done is not None:
                        st = state_from_file(stage.name, progress_path)
                        st.status, st.final_checkpoint = "skipped", done.uri
                        st.step = max(st.step, done.step)
                        st.note = f"complete: final checkpoint step {done.step} is committed"
                        self.say(f"[{stage.name}] already complete (final checkpoint step {done.step}): skipped")
                        states.append(st)
                        finals[stage.name] = {"stage": stage.name, "step": done.step, "uri": done.uri}
                        continue
                    capped = self.capped(store, stage)
                    if capped is not None:
                        st = state_from_file(stage.name, progress_path)
                        st.status = "capped"
                        st.step = max(st.step, capped.step)
                        st.note = f"--max-steps {self.opts.max_steps}: committed checkpoint step {capped.step}"
                        self.say(f"[{stage.name}] already at --max-steps {self.opts.max_steps} "
                                 f"(committed checkpoint step {capped.step})")
                        states.append(st)
                        self._say_capped(stage)
                        break
                    init_from = self.init_source(store, spec, i, finals)
                    own = store.latest_committed(stage.name)
                    if own is not None:
                        self.say(f"[{stage.name}] resuming from committed checkpoint step {own.step}")
                    elif init_from:
                        self.say(f"[{stage.name}] initialised from {init_from}")
                    st, final = self.run_stage(runner, run, spec, stage, init_from=init_from, run_dir=run_dir,
                                               nproc=nproc, metrics_port=metrics_port, store=store)
                    states.append(st)
                    if final is not None:  # confirmed: the stage is done, whatever the exit codes
                        finals[stage.name] = final
                    if st.status == "stopped" or self.interrupts:
                        removed = self.cleanup_uncommitted(store, stage.name)
                        if removed:
                            self.say(f"[{stage.name}] removed uncommitted checkpoint director(ies) at step(s) {removed}")
                        exit_code = EXIT_INTERRUPTED
                        break
                    if final is not None:
                        continue
                    if st.status == "capped":
                        self._say_capped(stage)
                        break
                    if st.status == "completed":
                        st.status = "failed"
                        st.error = f"the trainer exited 0 but no committed checkpoint ends the stage in {store.uri}"
                        self.say(f"[{stage.name}] {st.error}")
                    exit_code = EXIT_FAILED
                    break
        finally:
            self.tracker.poll()
            left = self.tracker.signal_all(signal.SIGKILL)
            if left:
                _wait_gone(self.tracker, 10)
            with contextlib.suppress(Exception):
                runner.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        result = LocalResult(exit_code, run_dir, spec.checkpoint.uri, states, bool(self.interrupts),
                             {name: ref["uri"] for name, ref in finals.items()})
        self.report(result, run, metrics_port)
        return result

    def report(self, result: LocalResult, run: dict, metrics_port: int) -> None:
        (result.run_dir / "summary.json").write_text(json.dumps(
            {"run": run["name"], "exit_code": result.exit_code, "interrupted": result.interrupted,
             "checkpoint_uri": result.checkpoint_uri, "stages": summary_dict(result.stages)}, indent=2) + "\n")
        if not result.stages:
            return
        self.say("")
        self.say(summary_table(result.stages))
        self.say("")
        rd = _rel(result.run_dir, self.base)
        self.say(f"checkpoints: {result.checkpoint_uri}  (<stage>/step-<N>/, valid once COMMITTED is present)")
        self.say(f"run directory: {rd}/  (<stage>/config.yaml = rendered TrainerConfig, "
                 f"<stage>/progress.jsonl = trainer progress, logs/ = every rank's output, summary.json)")
        self.say(f"metrics: rank 0 serves Prometheus text on http://localhost:{metrics_port}/metrics while a stage trains")
        if result.interrupted:
            self.say("stopped: run the same command again to resume from the newest committed checkpoint")


TERMINATION_GLOB = "termination-*.json"


def termination_log(stage_dir: Path, replica) -> Path:
    """A replica's termination-log file (its ``$VLM_TERMINATION_LOG``): what a pod's
    ``/dev/termination-log`` is in a cluster."""
    return Path(stage_dir) / f"termination-{replica}.json"


def _read_text(path: Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _replica_end(replica: int, rc: int | None) -> str:
    """'replica 0 was lost (killed by SIGKILL)', 'replica 1 exited 1'."""
    if rc is None:
        return f"replica {replica} ended with an unknown status"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"replica {replica} was lost (killed by {name})"
    return f"replica {replica} exited {rc}"


def _attempt_dirs(app_log_dir: Path) -> list[Path]:
    """torchrun's per-attempt log directories (``torchelastic/<role>/<run>_<id>/attempt_<N>``), oldest first."""
    found = [p for p in app_log_dir.glob("torchelastic/*/*/attempt_*") if p.is_dir()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)


def _wait_gone(tracker: ProcessTracker, timeout: float) -> None:
    end = time.monotonic() + timeout
    while tracker.alive() and time.monotonic() < end:
        tracker.poll()
        time.sleep(0.05)


# --------------------------------------------------------------------------- entry points


def run_local(opts: LocalOptions, out: IO[str] | None = None, *, base: Path | None = None) -> LocalResult:
    return LocalRunner(opts, out, base=base).run()


def main(args: argparse.Namespace) -> int:
    try:
        result = run_local(LocalOptions.from_args(args))
    except LocalRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result.exit_code


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_local.runner", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())

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

The run's steps (``stage_policy.steps``) run in order: each stage, and after a stage that
declares ``prune`` its pruning step ``<stage>-pruned``, one process of its own
(`vlm_local/steps.py`); stage k > 0 is initialised from the previous step's confirmed
checkpoint (``stage_policy.init_from``). A stage is done when its final checkpoint is confirmed, not
when every replica exits 0 (vlm_api/stage_policy.py): each replica gets a termination-log file,
``<run-dir>/<stage>/termination-<replica>.json`` (``$VLM_TERMINATION_LOG``), where the
trainer's global rank 0 writes ``stage_policy.confirmation`` once the stage's final
checkpoint is committed. After the replicas end, the stage is completed when a replica
confirmed it (``stage_policy.confirmed_final``) or the store holds its committed final
checkpoint (``stage_policy.is_final``), whatever the exit codes: a lost replica (a killed
agent) exits non-zero while the survivors finish the stage. It failed only when nothing
confirms it. Re-running the same command resumes: a stage whose final checkpoint is
committed is skipped, and a stage with committed checkpoints of its own resumes from the
newest (the trainer's checkpoint manager decides that; the runner only passes ``init_from``).
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
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from vlm_api import schema, stage_policy
from vlm_api.local_arguments import local_arguments
from vlm_api.cluster import PVC_ENV, parse_pvc_dirs
from vlm_api.validate import load_documents, validate_text

from . import appdef as local_app
from .options import LocalOptions, LocalRunError, free_port, gpu_count, local_checkpoint_uri, \
    missing_shards, port_free
from .processes import ProcessTracker, set_child_subreaper
from .steps import StepExecution, rel
from .view import StageState, state_from_file, summary_dict, write_summary

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130

# --------------------------------------------------------------------------- the runner


@dataclasses.dataclass
class LocalResult:
    exit_code: int
    run_dir: Path
    checkpoint_uri: str
    stages: list[StageState]
    interrupted: bool = False
    final_checkpoints: dict[str, str] = dataclasses.field(default_factory=dict)  # stage -> final checkpoint URI


class LocalRunner(StepExecution):
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
        gpus = gpu_count()
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
        key = stage_policy.output_step(prev)  # its pruning step's, when it prunes
        if key not in finals:
            ref = self.final_checkpoint(store, prev) if key == prev.name else self.pruned_checkpoint(store, key)
            if ref is not None:
                finals[key] = {"stage": key, "step": ref.step, "uri": ref.uri}
        uri = stage_policy.init_from(spec, index, finals)
        if uri is not None:
            return uri
        raise LocalRunError(
            f"step {key!r} has no committed final checkpoint in {store.uri}: "
            f"run it first (vlmpretrain local {self.opts.file} --stage {prev.name})")

    @staticmethod
    def pruned_checkpoint(store, step: str):
        """A pruning step's committed (always final) checkpoint, or None."""
        ref = store.latest_committed(step)
        return ref if ref is not None and ref.final else None

    def prune_step(self, run: dict, spec: schema.VLMPretrainRunSpec, step: stage_policy.Step, run_dir: Path,
                   store, finals: dict[str, dict]) -> tuple[StageState, dict | None]:
        """Skip a pruning step that committed its checkpoint, else run it on the stage's final one."""
        done = self.pruned_checkpoint(store, step.name)
        if done is not None:
            st = state_from_file(step.name, run_dir / step.name / "progress.jsonl")
            st.status, st.final_checkpoint, st.step = "skipped", done.uri, done.step
            st.note = f"complete: pruned checkpoint step {done.step} is committed"
            self.say(f"[{step.name}] already complete (pruned checkpoint step {done.step}): skipped")
            return st, {"stage": step.name, "step": done.step, "uri": done.uri}
        source = stage_policy.step_input(spec, step, finals)
        if source is None:
            raise LocalRunError(f"step {step.name!r}: stage {spec.stages[step.stage].name!r} has no final checkpoint")
        return self.run_prune_step(run, spec, step, source=source, run_dir=run_dir, store=store)

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
                missing = missing_shards(spec, stage, self.base, parse_pvc_dirs(self.opts.env.get(PVC_ENV)))
                if missing:
                    raise LocalRunError(f"stage {stage.name!r}: {len(missing)} shard file(s) missing, e.g. "
                                        f"{missing[0]} (the demo data comes from `vlmpretrain demo`)")
        run_dir = Path(self.opts.run_dir or self.base / "runs" / run["name"]).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        nproc = self.nproc(spec)
        metrics_port = self.opts.metrics_port or (spec.metrics.port if port_free(spec.metrics.port) else free_port())
        self.say(f"run {run['name']}: {len(names)} stage(s) {names}; checkpoints in {spec.checkpoint.uri}; "
                 f"run directory {rel(run_dir, self.base)}")
        set_child_subreaper()
        from torchx.runner import get_runner

        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # torchx replaces them

        states: list[StageState] = []
        finals: dict[str, dict] = {}  # stage -> its final checkpoint {stage, step, uri, ...}
        exit_code = EXIT_OK
        runner = get_runner()
        local_app.prepare(runner)  # it installs signal handlers we replace below
        try:
            with self.signals(), self.rendezvous_store(spec):
                for step in stage_policy.steps(spec):
                    i, stage = step.stage, spec.stages[step.stage]
                    if self.opts.stage and stage.name != self.opts.stage:
                        continue
                    if self.interrupts:
                        break
                    if step.prune:
                        st, final = self.prune_step(run, spec, step, run_dir, store, finals)
                        states.append(st)
                        if final is not None:
                            finals[step.name] = final
                            continue
                        exit_code = EXIT_INTERRUPTED if self.interrupts else EXIT_FAILED
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
                self.tracker.wait_gone(10)
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
        write_summary(result.stages, self.out, self.opts.progress)
        self.say("")
        rd = rel(result.run_dir, self.base)
        self.say(f"checkpoints: {result.checkpoint_uri}  (<stage>/step-<N>/, valid once COMMITTED is present)")
        self.say(f"run directory: {rd}/  (<stage>/config.yaml = rendered TrainerConfig, "
                 f"<stage>/progress.jsonl = trainer progress, logs/ = every rank's output, summary.json)")
        self.say(f"metrics: rank 0 serves Prometheus text on http://localhost:{metrics_port}/metrics while a stage trains")
        if result.interrupted:
            self.say("stopped: run the same command again to resume from the newest committed checkpoint")



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
    local_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())

"""How the local runner executes one step of a run (`vlm_api.stage_policy.steps`): a
stage as the torchx AppDef of its launch description (one torchrun agent per replica),
a pruning step as one process (`python -m vlm_trainer.visual_region.prune`). Either way
the step is done when its final checkpoint is confirmed (a termination-log file per
replica, `$VLM_TERMINATION_LOG`) or committed in the store, whatever the exit codes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from vlm_api import launch, render, schema, stage_policy

from . import appdef as local_app
from .options import free_port, gpu_count
from .view import ProgressTail, StageState, StageView

STOP_GRACE_S = float(os.environ.get("VLM_LOCAL_STOP_GRACE_S", "60"))
LOCAL_MAX_RESTARTS = 3
TERMINATION_GLOB = "termination-*.json"
PRUNE_MODULE = "vlm_trainer.visual_region.prune"


class StepExecution:
    """The step-running half of `runner.LocalRunner` (which provides opts, out, base,
    tracker, interrupts, say, final_checkpoint and capped)."""

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
        return local_app.to_appdef(trainer, cpu_procs=nproc if gpu_count() == 0 else None)

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
        try:
            tail = ProgressTail(progress_path)
            log_root = run_dir / "logs"
            t0 = time.monotonic()
            handle, agents = local_app.submit(runner, app, log_root)
            app_id = handle.rsplit("/", 1)[-1]
            app_log_dir = next(iter(sorted(log_root.glob(f"*/{app_id}"))), log_root / app_id)
            view.message(f"torchrun x{spec.resources.nodes.max} agent(s) x {nproc} process(es); logs: "
                         f"{rel(app_log_dir, self.base)}")
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
                overdue = self.interrupts >= 2 or time.monotonic() - self._interrupt_time > STOP_GRACE_S
                if sent_term and not killed and overdue:
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
                self.tracker.wait_gone(10)
            state.wall_s = time.monotonic() - t0
            state.note = rel(app_log_dir, self.base)
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
                            else f"--max-steps {self.opts.max_steps} was reached "
                                 f"(committed checkpoint step {capped.step})")
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
        finally:
            view.close()  # also on an error: rich hides the cursor while it draws
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
                    self.say(f"---- last {len(tail)} lines of {rel(path, self.base)} (rank {path.parent.name})")
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
                self.say(f"---- last {len(tail)} lines of {rel(path, self.base)}")
                for line in tail:
                    self.say("  " + line)

    def run_prune_step(self, run: dict, spec: schema.VLMPretrainRunSpec, step: stage_policy.Step, *,
                       source: str, run_dir: Path, store) -> tuple[StageState, dict | None]:
        """The pruning step after a stage: one process prunes ``source`` (the stage's
        confirmed final checkpoint); (state, its confirmed pruned checkpoint or None)."""
        stage = spec.stages[step.stage]
        step_dir = run_dir / step.name
        step_dir.mkdir(parents=True, exist_ok=True)
        term = termination_log(step_dir, 0)
        term.unlink(missing_ok=True)
        config_path = step_dir / "config.yaml"  # the pruned stage's TrainerConfig
        config_path.write_text(yaml.safe_dump(render.build_trainer_config(run, spec, stage.name), sort_keys=False))
        progress_path = step_dir / "progress.jsonl"
        log_path = run_dir / "logs" / f"{step.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLM_PROGRESS_FILE": str(progress_path), stage_policy.TERMINATION_LOG_ENV: str(term),
               "PYTHONUNBUFFERED": "1", **self.opts.env}
        state = StageState(step.name, init_from=source)
        view = StageView(state, self.out, mode=self.opts.progress)
        try:
            tail = ProgressTail(progress_path)
            view.message(f"pruning {source}; log: {rel(log_path, self.base)}")
            t0 = time.monotonic()
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", PRUNE_MODULE, "--config", str(config_path),
                                         "--checkpoint", source], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            self.tracker.set_roots([proc.pid])
            sent_term = False
            while proc.poll() is None:
                self.tracker.poll()
                view.feed(tail.read())
                if self.interrupts and not sent_term:
                    sent_term = True
                    view.message("interrupted: stopping the pruning step")
                    self.tracker.signal_all(signal.SIGTERM)
                if sent_term and (self.interrupts >= 2 or time.monotonic() - self._interrupt_time > STOP_GRACE_S):
                    self.tracker.signal_all(signal.SIGKILL)
                time.sleep(0.2)
            view.feed(tail.read())
            state.wall_s = time.monotonic() - t0
            final = stage_policy.confirmed_final([_read_text(term)], step.name)
            committed = store.latest_committed(step.name) if final is None else None
            if committed is not None and committed.final:
                final = {"stage": step.name, "step": committed.step, "uri": committed.uri, "tokens": None}
            if final is not None:
                state.status, state.final_checkpoint, state.step = "completed", final["uri"], final["step"]
                view.message(f"pruned checkpoint confirmed: {final['uri']}")
            else:
                state.status = "stopped" if self.interrupts else "failed"
                state.error = f"the pruning step exited {proc.returncode} without a confirmed checkpoint"
            state.note = rel(log_path, self.base)
        finally:
            view.close()  # also on an error: rich hides the cursor while it draws
        if state.status == "failed":
            tail_lines = (_read_text(log_path) or "").splitlines()[-25:]
            self.say(f"---- last {len(tail_lines)} lines of {rel(log_path, self.base)}")
            for line in tail_lines:
                self.say("  " + line)
        return state, final


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


def rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)



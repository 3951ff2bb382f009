"""A stage's launch description (`vlm_api.launch.Launch`) on torchx's local scheduler.

The cluster gets the same description as a PyTorchJob container (`vlm_api.render`); here it
becomes a one-role torchx AppDef run by the ``local_cwd`` scheduler: one torchrun agent per
replica, each a child process of the runner. Only torchx's public API is used: the agents'
pids come from the runner's own children, their exit codes from the ``SUCCESS`` record the
scheduler writes into the app's log directory once the app has ended.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
from torchx import specs
from torchx.runner import Runner

from vlm_api.launch import Launch

SCHEDULER = "local_cwd"
# torchx substitutes each replica's id for this in the role's env and args
REPLICA_ID = specs.macros.replica_id


def to_appdef(trainer: Launch, *, cpu_procs: int | None = None) -> specs.AppDef:
    """One role, `trainer.command trainer.args`; `cpu_procs`: CPU workers, no GPU request
    (torchx would warn about CUDA_VISIBLE_DEVICES otherwise)."""
    resource = (specs.Resource(cpu=cpu_procs, gpu=0, memMB=1024) if cpu_procs
                else specs.Resource(cpu=1, gpu=trainer.gpus_per_node, memMB=1024))
    role = specs.Role(
        name="trainer",
        image=trainer.image,
        entrypoint=trainer.command,
        args=list(trainer.args),
        env=dict(trainer.env),
        num_replicas=trainer.max_nodes,
        min_replicas=trainer.min_nodes,
        max_retries=trainer.max_retries,
        resource=resource,
        port_map=dict(trainer.ports),
    )
    return specs.AppDef(name=trainer.name, roles=[role])


def prepare(runner: Runner) -> None:
    """Create the local scheduler now: it installs its own SIGINT/SIGTERM handlers when
    created, and the caller installs its handlers after this."""
    runner.scheduler_run_opts(SCHEDULER)


def submit(runner: Runner, app: specs.AppDef, log_root: Path) -> tuple[str, list[int]]:
    """Start `app`; (its handle, the pids of the torchrun agents: the children of this
    process the scheduler started)."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    handle = runner.run(app, scheduler=SCHEDULER, cfg={"log_dir": str(log_root)})
    return handle, [p.pid for p in me.children() if p.pid not in before]


def replica_exit_codes(app_log_dir: Path) -> dict[int, int | None]:
    """{replica id: exit code (negative: killed by that signal)} of an ended app, from the
    scheduler's ``SUCCESS`` record; {} while it runs or without the record."""
    try:
        roles = json.loads((app_log_dir / "SUCCESS").read_text())["roles"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {r["replica_id"]: r["exitcode"] for replicas in roles.values() for r in replicas}

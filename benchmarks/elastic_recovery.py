"""Elastic recovery with the rendezvous store outside the workers (issue 10).

    python -m benchmarks all --only elastic_recovery [--quick]

Two real torchrun agents on this machine as two nodes (``--nnodes 1:2``, c10d, the tuned
``last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2``), one CPU worker
each, running the real trainer on the tests' tiny config (file:// checkpoints every 2
steps, ``processGroupTimeout`` 10 s). At step 5, at world size 2, one agent and its worker
get SIGKILL; the survivor must finish the stage (14 steps) at world size 1. The figure is
the time from the kill to the first step of the restarted group (its progress file).

A = the default topology: ``vlmpretrain rendezvous-store`` as its own process and
``is_host=false`` on both agents; the *first* agent is killed (the one that would host the
store in the stock topology).
B = the stock topology (the store inside the first agent, as Kubeflow's worker-0 has it):
the *second* agent is killed, the only kill that topology survives (killing the first one
ends the job: every other agent fails within a second with ``RendezvousConnectionError``).

Alternating A B A B (``harness.paired``, no warm-up round: every round is a fresh set of
processes). Figures: ``external_store_kill_seconds`` (A, absolute, target <= 20 s),
``stock_kill_second_seconds`` (B) and their ratio per pair.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from . import harness

REPO = harness.REPO
STEPS, KILL_AT, PG_TIMEOUT = 14, 5, 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Scenario:
    """One fresh run: config, progress file and logs in ``root``."""

    def __init__(self, root: Path, data: dict, *, external: bool):
        from tests.fixtures_trainer import spec_dict, stage, torchrun_env, trainer_config, write_config

        self.root, self.external = root, external
        root.mkdir(parents=True)
        spec = spec_dict(data, stages=[stage(steps=STEPS, microBatchSize=2)], checkpoint_uri=f"file://{root}/ckpt")
        spec["checkpoint"].update(interval=2, keep=2)
        spec["elastic"] = {"processGroupTimeout": PG_TIMEOUT, "externalStore": external}
        self.config = write_config(trainer_config(spec), root / "config.yaml")
        self.progress = root / "progress.jsonl"
        self.env = torchrun_env(VLM_PROGRESS_FILE=self.progress, VLM_METRICS_PORT=0, VLM_NO_CHECKPOINT=0,
                                VLM_CKPT_LOCAL_DIR=root / "local")

    def agent(self, i: int, port: int):
        from tests.support import torchrun_util as TU

        conf = ("is_host=false," if self.external else "") + TU.ELASTIC_CONF
        return TU.torchrun(self.config, nproc=1, nnodes="1:2", endpoint=f"127.0.0.1:{port}", rdzv_id=self.root.name,
                           rdzv_conf=conf, max_restarts=5, env=self.env, log=self.root / f"agent{i}.log", cwd=REPO)

    def run(self) -> dict:
        """Start the agents, kill one at step KILL_AT, return the recovery figures."""
        from tests.support import torchrun_util as TU

        store = TU.RendezvousStore(self.root, cwd=REPO) if self.external else None
        agents = []
        try:
            if store is not None:
                port = store.port
                agents = [self.agent(0, port), self.agent(1, port)]
            else:  # the first agent hosts the store: start the second once it listens
                port = _free_port()
                agents = [self.agent(0, port)]
                TU.wait_for(lambda: _listening(port), 120, "the first agent's rendezvous store", agents)
                agents.append(self.agent(1, port))
            TU.wait_for(lambda: any(e["step"] >= KILL_AT for e in TU.steps(self.progress)), 240, f"step {KILL_AT}",
                        agents)
            victim = 0 if self.external else 1
            t_kill = time.time()
            TU.kill_tree(agents[victim])
            rc = agents[1 - victim].wait(timeout=240)
        finally:
            for p in agents:
                if p.poll() is None:
                    TU.kill_tree(p)
            if store is not None:
                store.stop()
        events = TU.read_progress(self.progress)
        starts = [e for e in events if e["event"] == "start"]
        end = [e for e in events if e["event"] == "end"]
        if rc != 0 or not end or end[-1]["step"] != STEPS or starts[-1]["world_size"] != 1:
            logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.root.glob("agent*.log")))
            raise RuntimeError(f"{self.root.name}: the survivor did not finish at world size 1 (rc {rc}):\n{logs}")
        restores = [e for e in events if e["event"] == "restore"]
        resumed = restores[-1]["step"] if restores else None  # None: no checkpoint was committed before the kill
        return {"seconds": harness.recovery_seconds(events, t_kill), "resumed_from": resumed,
                "world_sizes": [e["world_size"] for e in starts]}


def run(quick: bool) -> dict:
    sys.path.insert(0, str(REPO))
    from tests.fixtures_trainer import make_data

    details: dict[str, list] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as d:
        tmp = Path(d)
        data = make_data(tmp / "data")
        count = {"A": 0, "B": 0}

        def once(label: str, external: bool) -> float:
            count[label] += 1
            out = Scenario(tmp / f"{label}{count[label]}", data, external=external).run()
            details[label].append({k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()})
            return out["seconds"]

        p = harness.paired(lambda: once("A", True), lambda: once("B", False), repeats=1 if quick else 3, warmup=0)
    figures = [
        harness.Figure.from_samples(
            "external_store_kill_seconds", p.a, unit="s", target_id="elastic.external_store_kill",
            baseline="absolute: SIGKILL of the first agent (2 agents as 2 nodes, external store) -> first new step",
            description="agent SIGKILL -> first step of the survivor's new group, external rendezvous store",
            extra={"runs": details["A"]}),
        harness.Figure.from_samples(
            "stock_kill_second_seconds", p.b, unit="s",
            baseline="absolute: stock topology (store in the first agent), SIGKILL of the second agent",
            description="the same kill where the stock topology survives it", extra={"runs": details["B"]}),
        harness.Figure.from_paired(
            "external_vs_stock_recovery_ratio", p,
            baseline="stock topology, SIGKILL of the second agent (the only kill it survives), same invocation, A B A B"),
    ]
    return {"figures": [f.as_dict() for f in figures], "quick": quick,
            "params": {"steps": STEPS, "kill_at": KILL_AT, "process_group_timeout_s": PG_TIMEOUT}}


if __name__ == "__main__":  # python -m benchmarks.elastic_recovery [--quick]
    print(json.dumps(run("--quick" in sys.argv), indent=1, default=str))

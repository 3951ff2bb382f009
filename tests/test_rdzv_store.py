"""Elastic runs with the rendezvous store outside the workers (`vlmpretrain rendezvous-store`,
issue 10): real torchrun agents on this machine as two nodes (``--nnodes 1:2``, c10d,
``is_host=false``) running the real trainer on a tiny config with file:// checkpoints.

Faults, each on its own run, each finishing with the right final step and data position
(the same tokens as every other scenario) and the time from the fault to the first new step
recorded (``record_property("recovery_seconds")`` and printed):

* SIGKILL the first agent (the one that would host the store in the default topology);
* SIGKILL the second agent;
* SIGSTOP one agent's worker for twice ``processGroupTimeout`` (10 s here): the survivor's
  collective times out, its agent restarts the group, the run goes on;
* restart the store process mid-run (a new, empty store on the same port).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from tests.fixtures_trainer import REPO, shared_data, spec_dict, stage, torchrun_env, trainer_config, write_config
from tests.support import torchrun_util as TU

pytestmark = pytest.mark.slow

STEPS = 14
FAULT_AT = 5
PG_TIMEOUT = 10
RDZV_CONF = "is_host=false," + TU.ELASTIC_CONF
_TOKENS: dict[str, int] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = shared_data(tmp_path_factory)

    def make(name: str) -> dict:
        root = tmp_path_factory.mktemp(name)
        spec = spec_dict(data, stages=[stage(steps=STEPS, microBatchSize=2)], checkpoint_uri=f"file://{root}/ckpt")
        spec["checkpoint"].update(interval=2, keep=2)
        spec["elastic"] = {"processGroupTimeout": PG_TIMEOUT, "externalStore": True}
        config = write_config(trainer_config(spec), root / "config.yaml")
        progress = root / "progress.jsonl"
        env = torchrun_env(VLM_PROGRESS_FILE=progress, VLM_METRICS_PORT=0, VLM_NO_CHECKPOINT=0,
                           VLM_CKPT_LOCAL_DIR=root / "local")
        return {"root": root, "config": config, "progress": progress, "env": env, "name": name}

    return make


def _sigcont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def _agent(s: dict, store: TU.RendezvousStore, i) -> subprocess.Popen:
    return TU.torchrun(s["config"], nproc=1, nnodes="1:2", endpoint=f"127.0.0.1:{store.port}", rdzv_id=s["name"],
                       rdzv_conf=RDZV_CONF, max_restarts=5, env=s["env"], log=s["root"] / f"agent{i}.log", cwd=REPO)


def _logs(s: dict) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(s["root"].glob("*.log")))


def _supervise(s: dict, store: TU.RendezvousStore, agents: list[subprocess.Popen], timeout: float = 150) -> list[int]:
    """What the kubelet does with the PyTorchJob's ``restartPolicy: OnFailure``: an agent
    that exits non-zero is started again (at most twice); returns the final exit codes."""
    relaunched = [0] * len(agents)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rcs = [p.poll() for p in agents]
        if all(rc == 0 for rc in rcs):
            return rcs
        for i, rc in enumerate(rcs):
            if rc not in (None, 0):
                if relaunched[i] >= 2:
                    return rcs
                relaunched[i] += 1
                agents[i] = _agent(s, store, f"{i}-restart{relaunched[i]}")
        time.sleep(0.2)
    raise AssertionError(f"agents still running after {timeout}s")


def run_with_fault(s: dict, fault, record_property, *, expect_world: int | None = None,
                   relaunch: bool = False, closed_ok: tuple[int, ...] = ()) -> dict:
    """Start the store and two agents, wait for step FAULT_AT at world size 2, apply
    ``fault(agents, store) -> survivors``, wait for the survivors to finish, check the run.
    ``relaunch``: restart agents that fail, as the kubelet would (`_supervise`).
    ``closed_ok``: agents (by index) that may instead fail to rejoin a rendezvous the others
    closed by finishing the run (`RendezvousClosedError`; the job has succeeded by then)."""
    store = TU.RendezvousStore(s["root"], cwd=REPO)
    agents: list[subprocess.Popen] = []
    stopped: list[int] = []
    try:
        agents = [_agent(s, store, 0), _agent(s, store, 1)]
        TU.wait_for(lambda: any(e["step"] >= FAULT_AT for e in TU.steps(s["progress"])), 150, f"step {FAULT_AT}",
                    agents)
        starts = [e for e in TU.read_progress(s["progress"]) if e["event"] == "start"]
        assert starts and starts[0]["world_size"] == 2, _logs(s)
        t_fault = time.time()
        survivors = fault(agents, store, stopped)
        if relaunch:
            old, agents = agents, survivors  # _supervise replaces failed agents in this list
            for p in old:
                if p not in agents and p.poll() is None:
                    TU.kill_tree(p)
            rcs = _supervise(s, store, agents)
        else:
            rcs = [p.wait(timeout=150) for p in survivors]
        fault_end = time.time()
    finally:
        for pid in stopped:
            _sigcont(pid)
        for p in agents:
            if p.poll() is None:
                TU.kill_tree(p)
        TU.kill(stopped)
        store.stop()
    for i, rc in enumerate(rcs):
        closed = i in closed_ok and "RendezvousClosedError" in (s["root"] / f"agent{i}.log").read_text()
        assert rc == 0 or closed, _logs(s)
    assert rcs[0] == 0, _logs(s)
    events = TU.read_progress(s["progress"])
    steps = [e for e in events if e["event"] == "step"]
    end = [e for e in events if e["event"] == "end"][-1]
    assert end["status"] == "completed" and end["step"] == STEPS and end["committed"], _logs(s)
    assert sorted({e["step"] for e in steps}) == list(range(1, STEPS + 1))
    restores = [e for e in events if e["event"] == "restore"]
    assert restores and restores[-1]["mode"] == "resume", _logs(s)
    # the group that trained the last steps (a node rejoining after the stage finished resumes
    # from the final checkpoint and trains nothing)
    resumed_from = [e["step"] for e in restores if e["step"] < STEPS][-1]
    assert [e["step"] for e in steps[-(STEPS - resumed_from):]] == list(range(resumed_from + 1, STEPS + 1))
    # the data position: a step's token count is the same whatever the world size / restarts
    by_step = {e["step"]: e["tokens"] for e in steps}
    assert end["tokens"] == by_step[STEPS]
    _TOKENS.setdefault("end", end["tokens"])
    assert end["tokens"] == _TOKENS["end"]
    starts = [e for e in events if e["event"] == "start"]
    if expect_world is not None:
        assert starts[-1]["world_size"] == expect_world, starts
    # the first step of the restarted group (steps of the old group may still finish after
    # the fault: after a store restart the agents notice only at their next poll)
    restarted = min((e["time"] for e in starts if e["time"] > t_fault), default=t_fault)
    recovery = min(e["time"] for e in steps if e["time"] > restarted) - t_fault
    record_property("recovery_seconds", round(recovery, 2))
    print(f"\n{s['name']}: fault -> first new step {recovery:.1f}s (resumed from step {resumed_from}, "
          f"world sizes {[e['world_size'] for e in starts]}, fault -> end {fault_end - t_fault:.1f}s)")
    return {"recovery": recovery, "starts": starts}


def test_sigkill_first_agent(setup, record_property):
    """The agent that would host the c10d store in the default topology: with the store
    outside, the other agent continues at world size 1."""
    def fault(agents, store, stopped):
        TU.kill_tree(agents[0])
        return [agents[1]]

    run_with_fault(setup("kill-first"), fault, record_property, expect_world=1)


def test_sigkill_second_agent(setup, record_property):
    def fault(agents, store, stopped):
        TU.kill_tree(agents[1])
        return [agents[0]]

    run_with_fault(setup("kill-second"), fault, record_property, expect_world=1)


def test_sigstop_worker_longer_than_pg_timeout(setup, record_property):
    """A frozen (not dead) worker, stopped for twice processGroupTimeout (a long GC or I/O
    stall): the survivor's collective fails after the timeout (10 s, not torch's 30 min), its
    agent re-rendezvouses, and the run finishes. The failed survivor exits at once
    (vlm_trainer.__main__: os._exit) instead of joining the async-save thread still blocked
    in a collective with the frozen peer.

    Two paths, both measured here: usually the frozen worker's agent sees the survivor
    waiting, stops its worker (SIGTERM stays pending on a stopped process until it resumes,
    or torchrun SIGKILLs it after its 30 s grace) and both agents form a new group at world
    size 2. On a loaded machine the frozen node's agent can instead miss the keep-alive
    deadline and be dropped from the rendezvous: the survivor then goes on alone at world
    size 1, and the frozen worker, once it resumes, fails its collective with the gone peer,
    so its agent rejoins. A worker frozen *forever* on a dropped node would hang its agent
    (torchrun polls only for waiting nodes); the survivor still finishes the stage, which
    makes the PyTorchJob Succeeded, so the run goes on."""
    def fault(agents, store, stopped):
        pid = TU.workers(agents[1].pid)
        assert pid, "no worker under the second agent"
        w = next(iter(pid.values()))
        os.kill(w, signal.SIGSTOP)
        stopped.append(w)
        resume = threading.Timer(2 * PG_TIMEOUT, _sigcont, (w,))
        resume.daemon = True
        resume.start()
        return agents

    out = run_with_fault(setup("sigstop"), fault, record_property, closed_ok=(1,))
    assert out["recovery"] > PG_TIMEOUT * 0.8  # the survivor waited for the timeout, not forever


def test_store_restart_mid_run(setup, record_property):
    """A restarted store holds no state. What happens (measured): both agents' next
    ``num_nodes_waiting`` poll fails (``RendezvousConnectionError``: the connection to the old
    store is gone), each agent stops its worker and exits non-zero; the pod's
    ``restartPolicy: OnFailure`` (here `_supervise`) starts the agents again, they rendezvous
    against the new, empty store and training resumes from the last committed checkpoint at
    world size 2."""
    def fault(agents, store, stopped):
        store.restart()
        return list(agents)

    out = run_with_fault(setup("store-restart"), fault, record_property, relaunch=True, expect_world=2)
    assert len(out["starts"]) >= 2

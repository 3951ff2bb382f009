"""The checkpoint manager inside the real trainer (vlm_trainer.train) with moto's S3 over HTTP:
exact resume, a signal-stop checkpoint, S3 faults during a run; and (slow) real torchrun
fault tests: SIGKILL one worker, SIGKILL a whole second agent of an elastic 1:2-node job."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")

from tests.fixtures_trainer import REPO, one_thread, shared_data, spec_dict, stage, torchrun_env, trainer_config, write_config  # noqa: E402
from tests.support import torchrun_util as TU  # noqa: E402
from tests.support.s3 import FaultProxy, free_port, new_bucket  # noqa: E402
from vlm_trainer.checkpoint import open_store  # noqa: E402
from vlm_trainer.metrics import reset_registry  # noqa: E402
from vlm_trainer.train import EXIT_OK, EXIT_STOPPED, Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture
def run_trainer(tmp_path_factory, monkeypatch, moto_endpoint):
    """run(spec_kw, store uri, progress file, ...) -> (trainer, result, events) in this process."""
    data = shared_data(tmp_path_factory)
    monkeypatch.setenv("VLM_METRICS_PORT", "0")
    monkeypatch.setenv("VLM_DATA_WORKER", "inline")
    monkeypatch.delenv("VLM_NO_CHECKPOINT", raising=False)
    monkeypatch.setenv("VLM_CKPT_LOCAL_DIR", str(tmp_path_factory.mktemp("ckpt-local")))

    def run(uri: str, progress: Path, *, steps: int = 8, interval=3, max_steps=None, stop_early=False,
            endpoint: str | None = None):
        monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress))
        spec = spec_dict(data, stages=[stage(steps=steps, visualIntroduceAt=0.5)], checkpoint_uri=uri)
        spec["checkpoint"].update(interval=interval, keep=2, endpoint=endpoint or moto_endpoint)
        cfg = trainer_config(spec, **({"max_steps": max_steps} if max_steps else {}))
        reset_registry()
        with one_thread():
            t = Trainer(cfg, serve_metrics=False)
            if stop_early:
                t.request_stop()
            try:
                result = t.train()
            finally:
                t.close()
        return t, result, TU.read_progress(progress)

    return run


def _losses(events) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "step"]


def test_exact_resume_of_the_trainer(run_trainer, moto_endpoint, tmp_path):
    """8 steps uninterrupted vs 4 steps, stop, resume, 4 more (images enter at step 4;
    checkpoints every 3 steps and at the stop): the same loss sequence and the same final
    weights, bit for bit (one process, fp32 on CPU)."""
    full, res, ev = run_trainer(f"s3://{new_bucket(moto_endpoint)}/a", tmp_path / "a.jsonl")
    assert res.exit_code == EXIT_OK
    uri = f"s3://{new_bucket(moto_endpoint)}/b"
    first, res1, ev1 = run_trainer(uri, tmp_path / "b1.jsonl", max_steps=4)
    assert res1.exit_code == EXIT_OK and res1.step == 4 and not res1.stage_finished
    store = open_store(uri, endpoint_url=moto_endpoint)
    assert [(r.step, r.final) for r in store.committed("pretrain")] == [(4, False), (3, False)]
    second, res2, ev2 = run_trainer(uri, tmp_path / "b2.jsonl")
    assert res2.exit_code == EXIT_OK and res2.step == 8
    restore = [e for e in ev2 if e["event"] == "restore"]
    assert restore and restore[0]["step"] == 4 and restore[0]["mode"] == "resume"
    assert _losses(ev1) + _losses(ev2) == _losses(ev)  # exact
    a, b = dict(full.vlm.named_parameters()), dict(second.vlm.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r.step, r.final) for r in store.committed("pretrain")] == [(8, True), (6, False)]
    ckpt_events = [e for e in ev2 if e["event"] == "checkpoint"]
    assert [e["step"] for e in ckpt_events] == [6, 8] and ckpt_events[-1]["final"]


def test_signal_stop_checkpoints_the_current_step(run_trainer, moto_endpoint, tmp_path):
    """SIGTERM (suspend, preemption): the trainer stops at a step boundary and the
    trainer checkpoints that step, so the restart loses nothing."""
    uri = f"s3://{new_bucket(moto_endpoint)}/stop"
    t, res, ev = run_trainer(uri, tmp_path / "s.jsonl", stop_early=True, interval=100)
    assert res.exit_code == EXIT_STOPPED and res.step == 1
    ref = open_store(uri, endpoint_url=moto_endpoint).latest_committed("pretrain")
    assert ref.step == 1 and not ref.final
    t2, res2, ev2 = run_trainer(uri, tmp_path / "s2.jsonl", interval=100)
    assert res2.exit_code == EXIT_OK and [e["step"] for e in ev2 if e["event"] == "step"] == list(range(2, 9))


def test_s3_faults_during_a_training_run(run_trainer, moto_endpoint, tmp_path):
    """Transient S3 faults (503 SlowDown, 500, a dropped connection) during the run's saves
    are retried; one checkpoint whose commit keeps failing is counted, training goes on,
    the next save commits and the run ends with its final checkpoint committed."""
    proxy = FaultProxy(moto_endpoint)
    try:
        uri = f"s3://{new_bucket(moto_endpoint)}/faults"
        proxy.fail("PutObject", 503, 1)
        proxy.fail("PutObject", "drop", 1)
        proxy.fail("PutObject", 500, 1)
        proxy.fail("PutCommitted", 503, 1)  # step 2: retried, commits
        proxy.fail("PutCommitted", "pass", 1)
        proxy.fail("PutCommitted", 500, 5)  # step 4: all 5 of botocore's attempts fail -> counted, training goes on
        t, res, ev = run_trainer(uri, tmp_path / "f.jsonl", interval=2, endpoint=proxy.url)
        assert res.exit_code == EXIT_OK and res.step == 8
        assert len([a for _, a in proxy.injected if a != "pass"]) == 3 + 1 + 5
        failed = [e for e in ev if e["event"] == "checkpoint_failed"]
        assert [(e["step"], e["phase"]) for e in failed] == [(4, "commit")]
        assert [e["step"] for e in ev if e["event"] == "checkpoint"] == [2, 6, 8]
        reg = t.metrics.registry
        assert reg.get_sample_value("vlmtrain_checkpoint_failures_total", {"phase": "commit"}) == 1
        assert reg.get_sample_value("vlmtrain_checkpoint_last_step") == 8
        store = open_store(uri, endpoint_url=moto_endpoint)
        assert [(r.step, r.final) for r in store.committed("pretrain")] == [(8, True), (6, False)]
        assert store.verify(store.latest_committed("pretrain")) == []
    finally:
        proxy.close()


# --------------------------------------------------------------------------- real torchrun faults

STEPS = 16
KILL_AT = 6


@pytest.fixture(scope="module")
def elastic_setup(tmp_path_factory, moto_endpoint, aws_env):
    data = shared_data(tmp_path_factory)

    def make(name: str) -> dict:
        root = tmp_path_factory.mktemp(name)
        uri = f"s3://{new_bucket(moto_endpoint)}/{name}"
        spec = spec_dict(data, stages=[stage(steps=STEPS, microBatchSize=2)], checkpoint_uri=uri)
        spec["checkpoint"].update(interval=2, keep=2, endpoint=moto_endpoint)
        spec["elastic"] = {"processGroupTimeout": 20}
        config = write_config(trainer_config(spec), root / "config.yaml")
        progress = root / "progress.jsonl"
        env = torchrun_env(VLM_PROGRESS_FILE=progress, VLM_METRICS_PORT=0, VLM_NO_CHECKPOINT=0,
                           VLM_CKPT_LOCAL_DIR=root / "local", **aws_env)
        return {"root": root, "uri": uri, "config": config, "progress": progress, "env": env}

    return make


def _final_model(uri: str, endpoint: str, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    store = open_store(uri, endpoint_url=endpoint)
    ref = store.latest_committed("pretrain")
    assert ref.final and ref.step == STEPS
    store.download(ref, tmp / "dl")
    dcp_to_torch_save(tmp / "dl", tmp / "full.pt")
    return torch.load(tmp / "full.pt", weights_only=False)["model"]


def _run_to_end(procs, timeout: float = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                TU.kill_tree(p)


@pytest.fixture(scope="module")
def reference_run(elastic_setup, moto_endpoint):
    s = elastic_setup("reference")
    agent = TU.torchrun(s["config"], nproc=2, env=s["env"], log=s["root"] / "agent.log", cwd=REPO)
    assert _run_to_end([agent]) == [0], (s["root"] / "agent.log").read_text()[-4000:]
    steps = TU.steps(s["progress"])
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    return {"losses": [e["loss"] for e in steps], "model": _final_model(s["uri"], moto_endpoint, s["root"])}


def _check_result(s, reference_run, moto_endpoint, *, exact: bool) -> tuple[list[dict], list[dict]]:
    events = TU.read_progress(s["progress"])
    steps = [e for e in events if e["event"] == "step"]
    end = [e for e in events if e["event"] == "end"][-1]
    assert end["status"] == "completed" and end["step"] == STEPS and end["committed"]
    restores = [e for e in events if e["event"] == "restore"]
    assert restores and restores[-1]["mode"] == "resume" and restores[-1]["step"] < KILL_AT + 2
    # the step count is right: every step of the stage ran, the resumed ones again from the checkpoint
    resumed_from = restores[-1]["step"]
    last = {e["step"]: e for e in steps}
    assert sorted(last) == list(range(1, STEPS + 1))
    assert [e["step"] for e in steps[-(STEPS - resumed_from):]] == list(range(resumed_from + 1, STEPS + 1))
    losses = [last[i]["loss"] for i in range(1, STEPS + 1)]
    model = _final_model(s["uri"], moto_endpoint, s["root"])
    assert model.keys() == reference_run["model"].keys()
    if exact:
        assert losses == reference_run["losses"]
        assert all(torch.equal(model[k], reference_run["model"][k]) for k in model)
    else:
        assert losses == pytest.approx(reference_run["losses"], rel=1e-5)
        for k in model:
            torch.testing.assert_close(model[k], reference_run["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    return events, steps


@pytest.mark.slow
def test_sigkill_one_worker(elastic_setup, reference_run, moto_endpoint, record_property):
    """torchrun restarts the group; the workers resume from the newest committed checkpoint
    and finish: same steps, same result as the uninterrupted run (bit-exact: same world
    size, deterministic CPU kernels)."""
    s = elastic_setup("kill-worker")
    agent = TU.torchrun(s["config"], nproc=2, env=s["env"], log=s["root"] / "agent.log", cwd=REPO)
    try:
        TU.wait_for(lambda: any(e["step"] >= KILL_AT for e in TU.steps(s["progress"])), 180, f"step {KILL_AT}",
                    [agent])
        pids = TU.workers(agent.pid)
        assert set(pids) == {0, 1}
        t_kill = time.time()
        TU.kill([pids[1]])
        rc = _run_to_end([agent])
    finally:
        if agent.poll() is None:
            TU.kill_tree(agent)
    assert rc == [0], (s["root"] / "agent.log").read_text()[-4000:]
    events, steps = _check_result(s, reference_run, moto_endpoint, exact=True)
    starts = [e for e in events if e["event"] == "start"]
    assert starts[0]["restart_count"] == 0 and starts[-1]["restart_count"] >= 1 and starts[-1]["world_size"] == 2
    recovery = min(e["time"] for e in steps if e["time"] > t_kill) - t_kill
    record_property("recovery_seconds", round(recovery, 2))
    print(f"\nworker SIGKILL -> first resumed step: {recovery:.1f}s")


@pytest.mark.slow
def test_sigkill_second_agent_of_two_nodes(elastic_setup, reference_run, moto_endpoint, record_property):
    """Two torchrun agents on this machine as two nodes (--nnodes 1:2, c10d, tuned
    rendezvous). SIGKILL the second agent and its worker: the survivor re-rendezvouses at
    world size 1, resumes from the newest committed checkpoint (saved by 2 ranks, loaded by
    1) and finishes. Result equal to the uninterrupted run within float tolerance (the
    reduction order changes with the world size)."""
    s = elastic_setup("kill-agent")
    port = free_port()
    kw = dict(nproc=1, nnodes="1:2", endpoint=f"127.0.0.1:{port}", rdzv_id="kill-agent", cwd=REPO)
    first = TU.torchrun(s["config"], env=s["env"], log=s["root"] / "agent0.log", **kw)
    second = None
    try:
        time.sleep(1.0)  # the first agent hosts the rendezvous store
        second = TU.torchrun(s["config"], env=s["env"], log=s["root"] / "agent1.log", **kw)
        TU.wait_for(lambda: any(e["step"] >= KILL_AT for e in TU.steps(s["progress"])), 180, f"step {KILL_AT}",
                    [first, second])
        assert [e["world_size"] for e in TU.read_progress(s["progress"]) if e["event"] == "start"] == [2]
        t_kill = time.time()
        TU.kill_tree(second)
        rc = _run_to_end([first])
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                TU.kill_tree(p)
    assert rc == [0], (s["root"] / "agent0.log").read_text()[-4000:]
    events, steps = _check_result(s, reference_run, moto_endpoint, exact=False)
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["world_size"] == 1
    restore = [e for e in events if e["event"] == "restore"][-1]
    assert restore["checkpoint_world_size"] == 2 and restore["world_size"] == 1
    recovery = min(e["time"] for e in steps if e["time"] > t_kill) - t_kill
    record_property("recovery_seconds", round(recovery, 2))
    print(f"\nagent SIGKILL -> first resumed step at world size 1: {recovery:.1f}s")

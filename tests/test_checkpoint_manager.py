"""CheckpointManager in one process against moto's S3 over HTTP (and a local directory):
round trip + metrics, retention, interval, stage init with a different trainable set,
a killed upload skipped on resume, S3 faults retried during saves, async blocking time."""

from __future__ import annotations

import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")

from prometheus_client import CollectorRegistry  # noqa: E402

from tests.support import ckpt_tiny as T  # noqa: E402
from tests.support.ckpt_faults import corrupt  # noqa: E402
from tests.support.s3 import FaultProxy, new_bucket  # noqa: E402
from vlm_trainer.checkpoint import (  # noqa: E402
    CheckpointError,
    CheckpointSettings,
    RetrySettings,
    TransferSettings,
    WorkerGroupConflict,
    open_store,
)
from vlm_trainer.checkpoint.manager import CheckpointManager  # noqa: E402
from vlm_trainer.checkpoint.state import ModelState  # noqa: E402
from vlm_trainer.schedule import init_optimizer_state  # noqa: E402

pytestmark = pytest.mark.usefixtures("aws_env")

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
FAST_RETRY = RetrySettings(max_attempts=4, connect_timeout=5, read_timeout=20)
SMALL_PARTS = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4,
                               file_concurrency=2)


def make_settings(uri: str, tmp_path: Path, endpoint: str = "", **kw) -> CheckpointSettings:
    kw.setdefault("retry", FAST_RETRY)
    return CheckpointSettings(uri=uri, endpoint=endpoint, local_dir=str(tmp_path / "local"), **kw)


def manager(settings: CheckpointSettings, run: "Run", stage: str = "pretrain", **kw) -> CheckpointManager:
    kw.setdefault("registry", CollectorRegistry())
    return CheckpointManager(settings, run.states, stage=stage, **kw)


def sample(reg: CollectorRegistry, name: str, labels: dict | None = None) -> float | None:
    return reg.get_sample_value(name, labels or {})


class Run:
    """A tiny model being trained, with its checkpointable state."""

    def __init__(self, *, seed: int = 0, frozen: tuple = (), hidden: int = 64, eager_state: bool = False,
                 continue_schedule: bool = False):
        self.module, self.opt = T.build("single", seed=seed, frozen=frozen, hidden=hidden)
        if eager_state:
            init_optimizer_state(self.opt)
        self.box, self.states = T.states(self.module, self.opt, continue_schedule=continue_schedule)
        self.step = 0

    def train(self, n: int = 1, mgr: CheckpointManager | None = None) -> None:
        for _ in range(n):
            self.step += 1
            T.train_step(self.module, self.opt, self.step)
            self.box["step"] = self.step
            self.box["data"] = {"text": 5 * self.step, "captions": 2 * self.step}
            if mgr is not None:
                mgr.after_step(self.step)

    def state(self) -> dict:
        return T.full_state(self.module, self.opt)


@pytest.fixture
def s3(moto_endpoint):
    return f"s3://{new_bucket(moto_endpoint)}/runs/r1", moto_endpoint


# --------------------------------------------------------------------------- round trip


def test_round_trip_async_and_final_with_metrics(s3, tmp_path):
    uri, endpoint = s3
    reg = CollectorRegistry()
    run = Run()
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=2, keep=3), run, registry=reg)
    assert mgr.restore() is None  # fresh start
    run.train(2, mgr)  # async save at step 2
    assert mgr.in_flight or mgr.last_committed is not None
    at2 = run.state()
    run.train(1, mgr)  # step 3 trains while step 2 is written and uploaded
    out = mgr.finalize(3)  # waits for step 2, then the synchronous final one
    assert out.ok and out.final and out.step == 3
    at3 = run.state()
    store = open_store(uri, endpoint_url=endpoint)
    committed = store.committed("pretrain")
    assert [(r.step, r.final) for r in committed] == [(3, True), (2, False)]
    m = committed[0].manifest
    assert m["world_size"] == 1 and m["extra"]["nodes"] == 1 and {f["path"] for f in m["files"]} >= {
        ".metadata", "__0_0.distcp"}
    assert not list((tmp_path / "local").rglob("*.distcp"))  # staging cleaned up

    # metrics (names are the contract with dashboards, alerts and the operator)
    assert sample(reg, "vlmtrain_checkpoint_last_step") == 3
    assert abs(sample(reg, "vlmtrain_checkpoint_last_success_timestamp_seconds") - time.time()) < 60
    assert sample(reg, "vlmtrain_checkpoint_interval_seconds") == 0
    assert sample(reg, "vlmtrain_checkpoint_bytes") == committed[0].total_bytes
    for h in ("save", "upload", "commit", "blocking"):
        assert sample(reg, f"vlmtrain_checkpoint_{h}_duration_seconds_count" if h != "blocking"
                      else "vlmtrain_checkpoint_blocking_seconds_count") == 2, h
    assert sample(reg, "vlmtrain_checkpoint_failures_total", {"phase": "upload"}) == 0
    assert sample(reg, "vlmtrain_checkpoint_last_info", {"uri": committed[0].uri}) == 1
    assert sample(reg, "vlmtrain_checkpoint_last_info", {"uri": committed[1].uri}) is None
    assert sample(reg, "vlmtrain_checkpoint_save_duration_seconds_bucket", {"le": "3600.0"}) == 2
    mgr.close()

    # a new process: the newest committed checkpoint, exactly (model, optimizer, extra state)
    reg2 = CollectorRegistry()
    fresh = Run(seed=99)
    mgr2 = manager(make_settings(uri, tmp_path / "b", endpoint), fresh, registry=reg2)
    r = mgr2.restore()
    assert r.mode == "resume" and r.step == 3 and r.rng_restored and not r.world_size_changed
    assert T.diff(at3, fresh.state()) == []
    assert fresh.box["step"] == 3 and fresh.box["data"] == {"text": 15, "captions": 6}
    assert sample(reg2, "vlmtrain_checkpoint_load_duration_seconds_count") == 1
    assert sample(reg2, "vlmtrain_checkpoint_last_step") == 3
    assert sample(reg2, "vlmtrain_checkpoint_last_info", {"uri": committed[0].uri}) == 1
    # the stage is done: finalize at the same step is a no-op, not a second commit
    assert mgr2.finalize(3).ok
    mgr2.close()
    assert at2 != {}


def test_resume_continues_exactly(s3, tmp_path):
    """Train 6 steps uninterrupted vs 3 + save + resume + 3: identical losses and state."""
    uri, endpoint = s3
    ref = Run()
    losses = []
    for step in range(1, 7):
        losses.append(T.train_step(ref.module, ref.opt, step))
    a = Run()
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=1), a)
    a.train(3, mgr)  # async saves at 1, 2, 3: the later ones reuse the staging buffers
    at3 = a.state()
    assert mgr.finalize(3, final=False).ok  # step 3 is committed already: nothing more
    assert [o.step for o in mgr.outcomes] == [1, 2, 3]
    mgr.close()
    b = Run(seed=5)
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=3), b)
    assert mgr.restore().step == 3
    assert T.diff(at3, b.state()) == [] and b.box["data"] == {"text": 15, "captions": 6}
    resumed = [T.train_step(b.module, b.opt, step) for step in range(4, 7)]
    assert resumed == losses[3:]  # bit-exact
    assert T.diff(ref.state(), b.state()) == []
    mgr.close()


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_one_before_restored(s3, tmp_path, caplog):
    """Choosing reads no checkpoint bytes (one listing), so a same-size corruption is found
    by the sha256 check of the node that fetches the file; the restore then goes back to
    the checkpoint before it, exactly, and says which file failed."""
    uri, endpoint = s3
    a = Run(seed=2)
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=1), a)
    a.train(1, mgr)
    mgr.wait()
    at1 = a.state()
    a.train(1, mgr)
    mgr.close()
    store = open_store(uri, endpoint_url=endpoint)
    corrupt(store, "pretrain", 2, "__0_0.distcp")
    b = Run(seed=9)
    reg = CollectorRegistry()
    mgr = manager(make_settings(uri, tmp_path / "b", endpoint, interval=1), b, registry=reg)
    with caplog.at_level(logging.WARNING):
        r = mgr.restore()
    mgr.close()
    assert r.step == 1 and T.diff(at1, b.state()) == [] and b.box["step"] == 1
    assert "step-000000002" in caplog.text and "sha256 mismatch __0_0.distcp" in caplog.text
    assert sample(reg, "vlmtrain_checkpoint_failures_total", {"phase": "load"}) == 1
    assert not (tmp_path / "b" / "local").exists() or not any((tmp_path / "b" / "local").rglob("*.distcp"))


# --------------------------------------------------------------------------- retention, interval


def test_retention_keeps_exactly_keep_and_final_marks_the_last_save(tmp_path):
    uri = str(tmp_path / "store")
    run = Run()
    mgr = manager(make_settings(uri, tmp_path, interval=1, keep=2), run)
    store = open_store(uri)
    for _ in range(5):
        run.train(1, mgr)
        mgr.wait()
        steps = [r.step for r in store.committed("pretrain")]
        assert steps == list(range(run.step, max(0, run.step - 2), -1))  # exactly keep (newest never deleted)
    assert [r.step for r in store.checkpoints("pretrain")] == [5, 4]  # nothing else left behind
    run.train(1, mgr)  # the interval save of step 6 is the stage's last step
    out = mgr.finalize(6)  # -> marked final in place, not written twice
    assert out.ok and out.final and len(mgr.outcomes) == 7
    committed = store.committed("pretrain")
    assert [(r.step, r.final) for r in committed] == [(6, True), (5, False)]
    assert store.verify(committed[0]) == []
    # stage-final checkpoints survive retention; the newest is never deleted
    assert store.prune("pretrain", keep=1).kept == [6]
    mgr.close()


def test_duration_interval(tmp_path):
    run = Run()
    mgr = manager(make_settings(str(tmp_path / "s"), tmp_path, interval="10m"), run)
    reg = mgr.metrics
    assert mgr.kind == "seconds" and reg.interval._value.get() == 600
    assert not mgr.due(1)
    mgr._last_save_clock -= 601
    assert mgr.due(2)
    run.train(1)
    mgr.save(2)
    assert not mgr.due(3)  # the clock restarts with every save
    mgr.close()


# --------------------------------------------------------------------------- stage init


def test_stage_init_loads_weights_and_only_shared_optimizer_moments(tmp_path):
    """Stage b trains a different set (emb instead of head) than stage a: weights come from
    a's final checkpoint; with continueSchedule the moments of the parameters both train
    (the layers) carry over and emb starts fresh; without it the optimizer stays fresh."""
    uri = str(tmp_path / "store")
    a = Run(frozen=("emb",), eager_state=True)
    mgr = manager(make_settings(uri, tmp_path, interval=2), a, stage="a")
    a.train(4, mgr)  # non-final checkpoints at 2 and 4 ...
    mgr.wait()
    a.train(1, mgr)
    mgr.finalize(5)  # ... and the final one at 5
    mgr.close()
    a_state = a.state()

    for cont in (True, False):
        b = Run(seed=42, frozen=("head",), eager_state=True, continue_schedule=cont)
        mgr = manager(make_settings(uri, tmp_path / f"b{cont}", interval=2), b, stage="b", prev_stage="a")
        r = mgr.restore()
        assert r.mode == "init" and r.step == 5 and r.ref.final and r.optimizer_loaded == cont
        st = b.state()
        assert T.diff(a_state, st, keys="model.") == []
        assert b.box["loads"] == ["init"] and b.box["step"] == 0  # the trainer decides what an init carries
        layer_keys = [k for k in st if k.startswith("optim.state.layers.")]
        assert layer_keys
        if cont:
            assert all(torch.equal(st[k], a_state[k]) for k in layer_keys)
            assert sorted(r.fresh_optimizer_params) == ["emb.weight"]
        else:
            assert all(float(torch.as_tensor(st[k]).abs().sum()) == 0 for k in layer_keys)
        assert float(st["optim.state.emb.weight.exp_avg"].abs().sum()) == 0
        assert float(torch.as_tensor(st["optim.state.emb.weight.step"])) == 0
        assert not any(k.startswith("optim.state.head.") for k in st)
        # this stage's own hyper-parameters stay (lr, weight decay of its optimizer)
        assert st["optim.param_groups.emb.weight.lr"] == 1e-2
        b.train(1)
        mgr.close()

    # init_from names a checkpoint explicitly (here even a non-final one); the stage's own
    # checkpoints win once it has any
    store = open_store(uri)
    four = store.step_uri("a", 4)
    c = Run(seed=1, frozen=("emb",), eager_state=True)
    mgr = manager(make_settings(uri, tmp_path / "c", interval=1), c, stage="c", init_from=four)
    r = mgr.restore()
    assert r.mode == "init" and r.ref.stage == "a" and r.step == 4
    c.train(1, mgr)
    mgr.wait()
    mgr.close()
    mgr = manager(make_settings(uri, tmp_path / "c2", interval=1), Run(seed=2, frozen=("emb",), eager_state=True),
                  stage="c", init_from=four)
    r = mgr.restore()
    assert r.mode == "resume" and r.ref.stage == "c" and r.step == 1
    mgr.close()
    # init_from may also name the previous stage's prefix (what the operator renders when it
    # has not seen the final checkpoint's URI): its newest FINAL checkpoint, as a URI or a path
    for prefix in (store.uri + "a/", str(tmp_path / "store" / "a")):
        mgr = manager(make_settings(uri, tmp_path / "d", interval=1), Run(seed=3, frozen=("emb",), eager_state=True),
                      stage="d", init_from=prefix)
        r = mgr.restore()
        assert r.mode == "init" and r.ref.stage == "a" and r.step == 5 and r.ref.final
        mgr.close()
    mgr = manager(make_settings(uri, tmp_path / "e", interval=1), Run(seed=3, frozen=("emb",), eager_state=True),
                  stage="e", init_from=store.uri + "c/")
    with pytest.raises(CheckpointError, match="no valid final checkpoint of stage c"):
        mgr.restore()
    mgr.close()


def test_resume_with_a_missing_parameter_fails_loudly(tmp_path):
    uri = str(tmp_path / "store")
    a = Run()
    mgr = manager(make_settings(uri, tmp_path, interval=1), a)
    a.train(1)
    mgr.finalize(1, final=False)
    mgr.close()
    bigger = Run()
    bigger.module.extra = torch.nn.Linear(2, 2)  # a parameter the checkpoint does not have
    mgr = CheckpointManager(make_settings(uri, tmp_path / "b", interval=1), {"model": ModelState(bigger.module)},
                            stage="pretrain", registry=CollectorRegistry())
    with pytest.raises(CheckpointError, match="model keys missing"):
        mgr.restore()
    assert sample_failures(mgr, "load") == 1
    mgr.close()


def sample_failures(mgr: CheckpointManager, phase: str) -> float:
    return mgr.metrics.failures.labels(phase=phase)._value.get()


# --------------------------------------------------------------------------- failures


def _worker_cfg(tmp_path: Path, **cfg) -> Path:
    p = tmp_path / "worker.json"
    p.write_text(json.dumps(cfg))
    return p


def test_killed_upload_is_skipped_on_resume(s3, tmp_path, caplog):
    """A process SIGKILLed in the middle of its upload leaves files but no COMMITTED
    marker: resume takes the previous committed checkpoint and warns; the next commit's
    retention removes the debris."""
    uri, endpoint = s3
    a = Run(seed=3)
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=2), a)
    a.train(2, mgr)
    mgr.wait()
    mgr.close()
    at2 = a.state()

    proxy = FaultProxy(endpoint)
    proc = None
    try:
        proxy.fail("PutObject", "pass", 1)  # one file arrives ...
        proxy.fail("PutObject", "hold", -1)  # ... the next one hangs until the process dies
        cfg = _worker_cfg(tmp_path, scenario="save", uri=uri, endpoint=proxy.url, local=str(tmp_path / "w"),
                          step=4)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "trainer"), str(REPO / "operator"), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, str(REPO / "tests/support/ckpt_worker.py"), str(cfg)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proxy.wait_held(90), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no upload"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()

    store = open_store(uri, endpoint_url=endpoint)
    refs = {r.step: r for r in store.checkpoints("pretrain")}
    assert set(refs) == {2, 4} and not refs[4].committed  # files of step 4, no marker
    b = Run(seed=8)
    mgr = manager(make_settings(uri, tmp_path / "b", endpoint, interval=2), b)
    with caplog.at_level(logging.WARNING):
        r = mgr.restore()
    assert r.step == 2 and T.diff(at2, b.state()) == []
    assert "step-000000004" in caplog.text and "COMMITTED" in caplog.text
    b.step = 4
    b.train(2, mgr)  # step 6 commits; step 4's leftovers are garbage now
    mgr.wait()
    assert [r.step for r in store.checkpoints("pretrain")] == [6, 2]
    mgr.close()


def test_s3_faults_during_saves_are_retried_and_training_goes_on(s3, tmp_path):
    """500s, SlowDown, a connection reset inside a multipart upload, a failing Complete and a
    failing commit are retried; a save that still fails is counted and training goes on;
    the next save commits."""
    uri, endpoint = s3
    proxy = FaultProxy(endpoint)
    try:
        reg = CollectorRegistry()
        settings = make_settings(uri, tmp_path, proxy.url, interval=2, keep=2, transfer=SMALL_PARTS)
        run = Run(hidden=8192)
        mgr = manager(settings, run, registry=reg)  # a shard of ~13 MB: multipart with 5 MiB parts
        proxy.fail("UploadPart", 500, 2)
        proxy.fail("UploadPart", "drop", 1)
        proxy.fail("UploadPart", 503, 1)
        proxy.fail("PutObject", 503, 1)
        proxy.fail("CompleteMultipartUpload", 500, 1)
        proxy.fail("PutCommitted", 503, 1)
        run.train(2, mgr)
        out = mgr.wait()
        assert out.ok, out
        assert {op for op, _ in proxy.injected} == {"UploadPart", "PutObject", "CompleteMultipartUpload",
                                                     "PutCommitted"}
        assert ("UploadPart", "drop") in proxy.injected
        proxy.fail("PutCommitted", 500, -1)  # the store is down for the commit of step 4
        run.train(2, mgr)
        out = mgr.wait()
        assert not out.ok and out.phase == "commit"
        assert sample(reg, "vlmtrain_checkpoint_failures_total", {"phase": "commit"}) == 1
        assert sample(reg, "vlmtrain_checkpoint_last_step") == 2
        proxy.clear()
        run.train(2, mgr)  # training went on; the next save commits
        out = mgr.finalize(6)
        assert out.ok
        store = open_store(uri, endpoint_url=endpoint)
        assert [r.step for r in store.committed("pretrain")] == [6, 2]
        assert store.verify(store.latest_committed("pretrain")) == []
        assert sample(reg, "vlmtrain_checkpoint_last_step") == 6
        mgr.close()
    finally:
        proxy.close()


def test_final_checkpoint_that_cannot_commit_raises(tmp_path, monkeypatch):
    uri = str(tmp_path / "store")
    run = Run()
    mgr = manager(make_settings(uri, tmp_path, interval=100, final_attempts=2, final_backoff_s=0.0), run)
    run.train(1)

    def broken(*_a, **_k):
        raise ConnectionError("store unreachable")

    monkeypatch.setattr(mgr.store, "_put_exclusive", broken)
    with pytest.raises(CheckpointError, match="final checkpoint of pretrain step 1 not committed"):
        mgr.finalize(1)
    assert sample_failures(mgr, "commit") == 2
    assert open_store(uri).committed("pretrain") == []
    mgr.close()


# --------------------------------------------------------------------------- blocking


def test_async_save_blocks_training_far_less_than_a_sync_save(s3, tmp_path, record_property):
    """Blocking time of an async save vs. a synchronous save of the same state (~25 MB),
    alternating; the figure is reported, not asserted (timing on a shared 2-core box)."""
    uri, endpoint = s3
    run = Run(hidden=16384)
    mgr = manager(make_settings(uri, tmp_path, endpoint, interval=1000, keep=1), run)
    run.train(1)
    sync_t, async_t = [], []
    for i in range(3):
        out = mgr.save(10 + 2 * i, blocking=True)
        assert out.ok
        sync_t.append(out.blocking_seconds)
        t0 = time.perf_counter()
        mgr.save(11 + 2 * i)
        async_t.append(time.perf_counter() - t0)
        assert mgr.wait().ok
    ratio = statistics.median(async_t) / statistics.median(sync_t)
    record_property("async_blocking_ratio", round(ratio, 4))
    print(f"\nasync save blocking {statistics.median(async_t):.4f}s vs sync {statistics.median(sync_t):.4f}s: "
          f"ratio {ratio:.3f}")
    mgr.close()


def test_a_failing_state_capture_is_counted_and_the_next_save_works(tmp_path):
    uri = str(tmp_path / "store")
    run = Run()
    mgr = manager(make_settings(uri, tmp_path, interval=1), run)
    calls = {"n": 0}
    small = run.states["trainer"]
    get = small.state_dict

    def flaky():
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("no room for the staging copy")
        return get()

    small.state_dict = flaky
    run.train(1, mgr)
    out = mgr.wait()
    assert out is None or not out.ok  # the failed save never started a write
    assert sample_failures(mgr, "save") == 1 and mgr.last_committed is None
    run.train(1, mgr)
    assert mgr.wait().ok and mgr.last_committed.step == 2
    mgr.close()


# --------------------------------------------------------------------------- two worker groups


def test_a_second_worker_group_never_writes_over_a_committed_step(tmp_path):
    """torchrun's rendezvous can drop a node whose heartbeats stall without telling it, and its
    replacement forms a second group on the same stage (seen on the faithful cluster). The group
    that reaches an already committed step stops before uploading: the other group's checkpoint
    stays intact (every file matches its manifest) and the dropped group raises
    WorkerGroupConflict so that torchrun restarts it into the current round."""

    uri = (tmp_path / "ckpt").as_uri()
    a, b = Run(seed=1), Run(seed=2)
    ahead = manager(make_settings(uri, tmp_path / "a", interval=2, async_save=False), a)
    behind = manager(make_settings(uri, tmp_path / "b", interval=2, async_save=False), b)
    a.train(4, ahead)  # group A commits steps 2 and 4
    store = open_store(uri)
    before = {f["path"]: f["sha256"] for f in store.latest_committed("pretrain").manifest["files"]}
    b.train(1, behind)  # group B, dropped and unaware, trains from scratch...
    with pytest.raises(WorkerGroupConflict, match="another worker group"):
        b.train(3, behind)  # ...reaches step 2, finds it committed, and stops at its next step
    ref = store.latest_committed("pretrain")
    assert ref.step == 4 and store.verify(ref) == []
    assert {f["path"]: f["sha256"] for f in ref.manifest["files"]} == before
    assert store.verify(store.ref_from_uri(store.step_uri("pretrain", 2))) == []
    with pytest.raises(WorkerGroupConflict):
        behind.finalize(b.step)
    ahead.close()
    behind.close()

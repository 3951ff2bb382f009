"""Distributed checkpoints with 2 real processes (gloo) against moto's S3 over HTTP: DDP and
FSDP2 round trips (exact state, exact continuation), DDP <-> FSDP2, 1 -> 2 and 2 -> 1
processes, per-node uploads (2 simulated nodes) and the collective duration interval.
One pair of worker processes runs every distributed scenario (tests/support/ckpt_worker.py);
the tests below check its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")

from prometheus_client import CollectorRegistry  # noqa: E402

from tests.support import ckpt_tiny as T  # noqa: E402
from tests.support.s3 import free_port, new_bucket  # noqa: E402
from vlm_trainer.checkpoint import CheckpointSettings, open_store  # noqa: E402
from vlm_trainer.checkpoint.manager import CheckpointManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def launch_ranks(script: Path, args: list[str], world: int, env: dict, timeout: float) -> list[tuple[int, str]]:
    """Start ``world`` processes of ``script`` as one gloo group; (returncode, output) each.
    Every process is killed by pid on the way out."""
    port = free_port()
    procs = []
    logs = []
    try:
        for r in range(world):
            e = dict(env, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
            log = open(Path(args[0]).parent / f"rank{r}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=e, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=REPO))
        out = []
        for p, log in zip(procs, logs):
            rc = p.wait(timeout=timeout)
            log.seek(0)
            out.append((rc, log.read()))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def two_ranks(moto_endpoint, aws_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt-dist")
    uri = f"s3://{new_bucket(moto_endpoint)}/dist"
    # the single-process checkpoint the two ranks load (1 -> 2)
    module, opt = T.build("single", seed=5)
    box, states = T.states(module, opt)
    for step in (1, 2, 3):
        T.train_step(module, opt, step)
        box["step"] = step
    torch.save(T.full_state(module, opt), tmp / "ref-single-3.pt")
    mgr = CheckpointManager(CheckpointSettings(uri=uri, endpoint=moto_endpoint, interval=100,
                                               local_dir=str(tmp / "single")), states, stage="single",
                            registry=CollectorRegistry())
    assert mgr.finalize(3, final=False).ok
    mgr.close()

    cfg = tmp / "cfg.json"
    cfg.write_text(json.dumps({"uri": uri, "endpoint": moto_endpoint, "out": str(tmp), "local": str(tmp / "w")}))
    env = dict(os.environ, **aws_env)
    results = launch_ranks(REPO / "tests/support/ckpt_worker.py", [str(cfg)], 2, env, timeout=240)
    for rc, log in results:
        assert rc == 0, log[-4000:]
    res = [json.loads((tmp / f"result-{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "uri": uri, "endpoint": moto_endpoint, "results": res}


@pytest.mark.parametrize("saved,loaded", [("ddp", "ddp"), ("fsdp", "fsdp"), ("ddp", "fsdp"), ("fsdp", "ddp")])
def test_two_process_round_trip_is_exact(two_ranks, saved, loaded):
    """Saved by 2 ranks with one wrapper, loaded by 2 ranks with the same or the other one:
    model, AdamW state, extra state and RNG equal step 3's exactly, and two more steps equal
    the uninterrupted run's steps 4-5 exactly (the save ran while those steps trained)."""
    res = two_ranks["results"]
    assert res[0]["checks"][f"{saved}->{loaded}"] == []
    assert res[0][f"outcome-{saved}"]["ok"] and res[1][f"outcome-{saved}"]["ok"]


@pytest.mark.parametrize("loaded", ["ddp", "fsdp"])
def test_one_process_checkpoint_loads_into_two(two_ranks, loaded):
    assert two_ranks["results"][0]["checks"][f"single->{loaded}"] == []


@pytest.mark.parametrize("saved", ["ddp", "fsdp"])
def test_two_process_checkpoint_loads_into_one(two_ranks, saved, tmp_path):
    tmp = two_ranks["tmp"]
    module, opt = T.build("single", seed=77)
    box, states = T.states(module, opt)
    mgr = CheckpointManager(CheckpointSettings(uri=two_ranks["uri"], endpoint=two_ranks["endpoint"], interval=100,
                                               local_dir=str(tmp_path)), states, stage=saved, registry=CollectorRegistry())
    r = mgr.restore()
    assert r.step == 3 and r.ref.world_size == 2 and r.world_size_changed and not r.rng_restored
    assert box["step"] == 3 and box["data"] == {"text": 30, "captions": 9}
    ref3 = torch.load(tmp / f"ref-{saved}-3.pt", weights_only=False)
    assert T.diff(ref3, T.full_state(module, opt)) == []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same kernels' reduction order
    try:
        for step in (4, 5):
            T.train_step(module, opt, step)
    finally:
        torch.set_num_threads(threads)
    assert T.diff(torch.load(tmp / f"ref-{saved}-5.pt", weights_only=False), T.full_state(module, opt)) == []
    mgr.close()


def test_each_node_uploads_its_own_files(two_ranks):
    """FSDP2 saved as two nodes (one rank each, separate local directories): each node's
    leader uploaded its shard, rank 0 committed one manifest over both."""
    res = two_ranks["results"]
    assert res[0]["outcome-fsdp"]["nodes"] == 2 and res[0]["outcome-fsdp"]["leader"] and res[1]["outcome-fsdp"]["leader"]
    assert res[0]["outcome-ddp"]["nodes"] == 1 and not res[1]["outcome-ddp"]["leader"]
    store = open_store(two_ranks["uri"], endpoint_url=two_ranks["endpoint"])
    for stage in ("ddp", "fsdp"):
        ref = store.latest_committed(stage)
        assert ref.step == 3 and ref.world_size == 2
        assert {f["path"] for f in ref.files} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
        assert store.verify(ref) == []


def test_duration_interval_is_decided_collectively(two_ranks):
    """Only rank 0's clock had passed the interval: both ranks save at the same step."""
    res = two_ranks["results"]
    assert [r["due_after_interval"] for r in res] == [True, True]
    assert [r["due_before_interval"] for r in res] == [False, False]


def test_async_save_returned_quickly(two_ranks):
    blocking = two_ranks["results"][0]["blocking"]
    print(f"\nasync save call, 2 ranks: ddp {blocking['ddp']:.3f}s, fsdp {blocking['fsdp']:.3f}s")
    assert set(blocking) == {"ddp", "fsdp"}


def test_each_node_fetches_only_what_its_ranks_read(moto_endpoint, aws_env, tmp_path):
    """4 ranks as 4 nodes, FSDP2: the restore is exact, and every node, rank 0's included,
    downloads only `.metadata`, its own shard file and rank 0's (every replicated entry is
    saved there), not the whole checkpoint: 3 of 5 files (rank 0: 2). Then a same-size
    corruption of the file only the last node reads: that node's sha256 check fails the
    load on every rank, and all of them restore the checkpoint before it, exactly."""
    uri = f"s3://{new_bucket(moto_endpoint)}/nodes"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"scenario": "nodes", "uri": uri, "endpoint": moto_endpoint, "out": str(tmp_path),
                               "local": str(tmp_path / "w")}))
    results = launch_ranks(REPO / "tests/support/ckpt_worker.py", [str(cfg)], 4, dict(os.environ, **aws_env),
                           timeout=240)
    for rc, log in results:
        assert rc == 0, log[-4000:]
    res = [json.loads((tmp_path / f"nodes-{r}.json").read_text()) for r in range(4)]
    assert all(r["saved"] and r["step"] == 3 and r["extra"] == 3 for r in res)
    assert res[0]["diff"] == []
    ref = open_store(uri, endpoint_url=moto_endpoint).latest_committed("nodes")
    assert len(ref.files) == 5
    for r in res:
        assert sorted(r["fetched"]) == sorted({".metadata", "__0_0.distcp", f"__{r['rank']}_0.distcp"}), r
        assert 0 < r["fetched_bytes"] < ref.total_bytes
    assert [r["fallback"]["step"] for r in res] == [2, 2, 2, 2]
    assert [r["fallback"]["extra"] for r in res] == [2, 2, 2, 2]
    assert res[0]["fallback"]["diff"] == []
    assert "skipping " + ref.uri in results[0][1] and "sha256 mismatch __3_0.distcp" in results[0][1]

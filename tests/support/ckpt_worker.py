"""Worker process of the distributed checkpoint tests (one per rank; RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT in the environment). ``python ckpt_worker.py CONFIG.json``.

Scenario ``roundtrip`` (2 ranks), results into ``<out>/result-<rank>.json`` and reference
states into ``<out>/ref-*.pt`` (rank 0):

1. 1 -> 2: the single-process checkpoint (stage ``single``, reference ``ref-single-3.pt``)
   loads into DDP and into FSDP2, exactly.
2. for ddp and fsdp: train 3 steps, async save at step 3 while training steps 4-5 go on,
   commit; (fsdp: as two "nodes", VLM_NODE_ID per rank, each node uploading its files);
   then restore into a fresh DDP and a fresh FSDP2 model: the state equals step 3's
   exactly, and 2 more steps equal steps 4-5 of the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace as dataclasses_replace
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ckpt_tiny as T  # noqa: E402
from ckpt_faults import corrupt  # noqa: E402
from vlm_trainer.checkpoint import CheckpointSettings, RetrySettings  # noqa: E402
from vlm_trainer.checkpoint.manager import CheckpointManager  # noqa: E402


def settings(cfg, local_suffix: str) -> CheckpointSettings:
    return CheckpointSettings(uri=cfg["uri"], endpoint=cfg.get("endpoint", ""), interval=1000, keep=3,
                              local_dir=os.path.join(cfg["local"], local_suffix),
                              retry=RetrySettings())


def manager(cfg, states: dict, stage: str, suffix: str, node: str | None = None) -> CheckpointManager:
    if node:
        os.environ["VLM_NODE_ID"] = node
    else:
        os.environ.pop("VLM_NODE_ID", None)
    from prometheus_client import CollectorRegistry

    return CheckpointManager(settings(cfg, suffix), states, stage=stage, registry=CollectorRegistry())


def save_once(cfg) -> None:
    """Scenario ``save``: one process, no process group: train ``step`` steps and save them
    synchronously (the test kills this process in the middle of the upload)."""
    module, opt = T.build("single", seed=3)
    box, states = T.states(module, opt)
    for step in range(1, cfg["step"] + 1):
        T.train_step(module, opt, step)
        box["step"] = step
    mgr = manager(cfg, states, cfg.get("stage", "pretrain"), "save")
    print("saving", flush=True)
    mgr.save(cfg["step"], blocking=True)
    print("saved", flush=True)


def restore_per_node(cfg) -> None:
    """Scenario ``nodes`` (any world size, one rank per "node"): FSDP2 saves steps 2 and 3;
    a fresh FSDP2 model restores step 3, each rank recording the files its node fetched;
    then rank 0 flips a byte of the shard file only the last node reads (same size: only
    its sha256 tells) and fresh models restore again: every rank falls back to step 2."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    module, opt = T.build("fsdp", seed=11)
    box, components = T.states(module, opt)
    mgr = manager(cfg, components, "nodes", "save", node=f"n{rank}")
    states, saved = {}, []
    for step in (1, 2, 3):
        T.train_step(module, opt, step)
        box["step"] = step
        if step >= 2:
            states[step] = T.full_state(module, opt)
            saved.append(mgr.save(step, blocking=True).ok)
    mgr.close()

    def restore(suffix: str):
        m2, o2 = T.build("fsdp", seed=99)
        box2, states2 = T.states(m2, o2)
        mgr2 = manager(cfg, states2, "nodes", suffix, node=f"n{rank}")
        r = mgr2.restore()
        mgr2.close()
        return r, box2["step"], T.full_state(m2, o2)

    r, extra, st = restore("load")
    res = {"rank": rank, "saved": all(saved), "step": r.step, "fetched": r.fetched_files,
           "fetched_bytes": r.fetched_bytes, "extra": extra, "diff": T.diff(states[3], st) if rank == 0 else []}
    dist.barrier()
    if rank == 0:
        corrupt(mgr.store, "nodes", 3, f"__{world - 1}_0.distcp")
    dist.barrier()
    r, extra, st = restore("fallback")
    res["fallback"] = {"step": r.step, "extra": extra, "diff": T.diff(states[2], st) if rank == 0 else []}
    (Path(cfg["out"]) / f"nodes-{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    if cfg.get("scenario") == "save":
        return save_once(cfg)
    if cfg.get("scenario") == "nodes":
        return restore_per_node(cfg)
    out = Path(cfg["out"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res: dict = {"rank": rank, "checks": {}, "blocking": {}}
    checks = res["checks"]

    # 1 -> 2
    ref_single = torch.load(out / "ref-single-3.pt", weights_only=False) if rank == 0 else {}
    for strat in ("ddp", "fsdp"):
        module, opt = T.build(strat, seed=7)
        box, states = T.states(module, opt)
        mgr = manager(cfg, states, "single", f"single-{strat}")
        r = mgr.restore()
        st = T.full_state(module, opt)
        if rank == 0:
            checks[f"single->{strat}"] = T.diff(ref_single, st) + ([] if r and r.step == 3 and box["step"] == 3
                                                                    else [f"restored {r} {box}"])
        mgr.close()

    for strat in ("ddp", "fsdp"):
        module, opt = T.build(strat)
        box, states = T.states(module, opt)
        for step in (1, 2, 3):
            T.train_step(module, opt, step)
            box["step"] = step
            box["data"] = {"text": 10 * step, "captions": 3 * step}
        ref3 = T.full_state(module, opt)
        mgr = manager(cfg, states, strat, f"save-{strat}", node=f"n{rank}" if strat == "fsdp" else None)
        t0 = time.perf_counter()
        mgr.save(3)
        res["blocking"][strat] = time.perf_counter() - t0
        for step in (4, 5):  # training goes on while the save is written and uploaded
            T.train_step(module, opt, step)
        outcome = mgr.wait()
        ref5 = T.full_state(module, opt)
        res[f"outcome-{strat}"] = {"ok": outcome.ok, "error": outcome.error, "uri": outcome.uri,
                                   "nodes": mgr.num_nodes, "leader": mgr.is_node_leader}
        mgr.close()
        if rank == 0:
            torch.save(ref3, out / f"ref-{strat}-3.pt")
            torch.save(ref5, out / f"ref-{strat}-5.pt")
        for load_strat in ("ddp", "fsdp"):
            m2, o2 = T.build(load_strat, seed=123)  # different init: everything must come from the checkpoint
            box2, states2 = T.states(m2, o2)
            mgr2 = manager(cfg, states2, strat, f"load-{strat}-{load_strat}")
            r = mgr2.restore()
            st3 = T.full_state(m2, o2)
            for step in (4, 5):
                T.train_step(m2, o2, step)
            st5 = T.full_state(m2, o2)
            if rank == 0:
                problems = T.diff(ref3, st3) + [f"after 2 steps: {d}" for d in T.diff(ref5, st5)]
                if not (r and r.mode == "resume" and r.step == 3 and r.rng_restored and not r.world_size_changed):
                    problems.append(f"restored: {r}")
                if box2["data"] != {"text": 30, "captions": 9} or box2["loads"] != ["resume"]:
                    problems.append(f"extra state: {box2}")
                checks[f"{strat}->{load_strat}"] = problems
            mgr2.close()
    # a duration interval is decided collectively: only rank 0's clock has passed it
    cfg_time = dict(cfg)
    mgr = CheckpointManager(dataclasses_replace(settings(cfg_time, "time"), interval="1h"), {}, stage="time")
    if rank == 0:
        mgr._last_save_clock -= 7200
    res["due_after_interval"] = mgr.due(1)
    mgr._last_save_clock = time.monotonic()
    res["due_before_interval"] = mgr.due(2)
    mgr.close()
    (out / f"result-{rank}.json").write_text(json.dumps(res, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

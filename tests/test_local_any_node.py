"""`vlmpretrain local --nnodes 1:2`: a stage is done when its final checkpoint is confirmed,
not when every replica exits 0 (issue 16). Two torchrun agents with the external rendezvous
store; the first agent (and its worker) is SIGKILLed during stage 1: the survivor finishes
the stage and confirms its final checkpoint, the runner counts the stage completed (saying
that a replica was lost) and starts stage 2 from that checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.support import torchrun_util as TU
from vlm_api import stage_policy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-local.yaml"
PRETRAIN_STEPS, SFT_STEPS, KILL_AT = 10, 2, 3


def _recipe(path: Path) -> Path:
    """tests/data/tiny-local.yaml cut down: 4 sequences a step, 10 + 2 steps, checkpoints every 2."""
    doc = yaml.safe_load(TINY.read_text())
    spec = doc["spec"]
    for st, steps in zip(spec["stages"], (PRETRAIN_STEPS, SFT_STEPS)):
        st.update(steps=steps, globalBatchTokens=256, microBatchSize=4)
    spec["stages"][0]["optimizer"]["warmupSteps"] = 2
    spec["checkpoint"].update(interval=2, keep=2)
    spec["elastic"] = {"processGroupTimeout": 20, "externalStore": True}
    path.write_text(yaml.safe_dump(doc))
    return path


def _replica_agent(runner_pid: int, replica: int) -> int | None:
    """The torchrun agent torchx started for `replica` (a direct child of the runner)."""
    try:
        kids = [p.pid for p in psutil.Process(runner_pid).children()]
    except psutil.Error:
        return None
    for pid in kids:
        if TU.proc_env(pid).get("TORCHELASTIC_ERROR_FILE", "").endswith(f"/trainer/{replica}/error.json"):
            return pid
    return None


def _events(path: Path) -> list[dict]:
    return TU.read_progress(path)


def test_a_lost_replica_does_not_fail_a_stage_the_survivor_finished(tmp_path):
    from vlm_trainer.data import synthdata
    from vlm_trainer.checkpoint import open_store

    synthdata.generate(tmp_path / "tiny-data", samples_per_shard=64, image_size=32,
                       shards={"text": 1, "captions": 2, "instruct": 1, "text-instruct": 1})
    manifest = _recipe(tmp_path / "tiny.yaml")
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    out = tmp_path / "local.out"
    with open(out, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "vlm_api.cli", "local", str(manifest), "--nnodes", "1:2",
                                 "--nproc", "1", "--checkpoint-dir", str(ckpt), "--run-dir", str(run_dir),
                                 "--progress", "plain"], cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
    progress = run_dir / "pretrain" / "progress.jsonl"
    try:
        TU.wait_for(lambda: any(e["event"] == "step" and e["step"] >= KILL_AT for e in _events(progress)), 180,
                    f"pretrain step {KILL_AT}", [proc])
        assert [e["world_size"] for e in _events(progress) if e["event"] == "start"] == [2], out.read_text()
        agent = _replica_agent(proc.pid, 0)
        assert agent, "no torchrun agent of replica 0 under the runner"
        TU.kill([agent] + TU.children(agent))  # the node is lost: its agent and its worker
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(5)
            proc.kill()
    text = out.read_text()
    assert rc == 0, text
    assert "replica 0 was lost (killed by SIGKILL), but the stage completed" in text, text

    store = open_store(ckpt.as_uri())
    pre, sft = store.latest_committed("pretrain"), store.latest_committed("sft")
    assert pre.final and pre.step == PRETRAIN_STEPS and sft.final and sft.step == SFT_STEPS
    starts = [e for e in _events(progress) if e["event"] == "start"]
    assert starts[-1]["world_size"] == 1, "the survivor finished stage 1 alone"
    # the survivor (replica 1) confirmed stage 1; the killed replica wrote nothing
    files = sorted(p.name for p in (run_dir / "pretrain").glob("termination-*.json"))
    assert files == ["termination-1.json"], files
    confirmed = stage_policy.parse_confirmation((run_dir / "pretrain" / files[0]).read_text(), "pretrain")
    assert confirmed and confirmed["uri"] == pre.uri and confirmed["step"] == PRETRAIN_STEPS
    assert confirmed["tokens"] == pre.manifest["extra"]["tokens"]
    # stage 2 started from stage 1's confirmed final checkpoint
    assert yaml.safe_load((run_dir / "sft" / "config.yaml").read_text())["initFrom"] == pre.uri
    restore = [e for e in _events(run_dir / "sft" / "progress.jsonl") if e["event"] == "restore"]
    assert restore and restore[0]["mode"] == "init" and restore[0]["uri"] == pre.uri
    sft_confirmations = [stage_policy.parse_confirmation(p.read_text(), "sft")
                         for p in (run_dir / "sft").glob("termination-*.json")]
    assert sft_confirmations and all(c and c["uri"] == sft.uri for c in sft_confirmations)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["completed", "completed"] and summary["exit_code"] == 0
    assert "replica 0 was lost (killed by SIGKILL), but the stage completed" in summary["stages"][0]["note"]
    assert summary["stages"][0]["final_checkpoint"] == pre.uri

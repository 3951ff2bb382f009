"""Completion confirmed by the trainer (vlm_api/stage_policy.py): the real trainer on the tiny
config with file:// checkpoints. Global rank 0 writes `stage_policy.confirmation` of the
stage's committed final checkpoint to ``$VLM_TERMINATION_LOG`` (else /dev/termination-log
when Kubernetes created it), also when it only resumes a stage that had already ended; a
stopped or capped run writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures_trainer import one_thread, shared_data, spec_dict, stage, trainer_config
from vlm_api import stage_policy
from vlm_trainer import stage_io
from vlm_trainer import train as T
from vlm_trainer.checkpoint import open_store
from vlm_trainer.metrics import reset_registry

STEPS = 4


@pytest.fixture
def run(tmp_path_factory, tmp_path, monkeypatch):
    """run(termination log, max_steps=None, stop=False) -> (result, progress events); one
    stage of STEPS steps (checkpoints every 2) into tmp_path/ckpt, in this process."""
    data = shared_data(tmp_path_factory)
    monkeypatch.setenv("VLM_METRICS_PORT", "0")
    monkeypatch.setenv("VLM_DATA_WORKER", "inline")
    monkeypatch.setenv("VLM_CKPT_LOCAL_DIR", str(tmp_path / "local"))
    monkeypatch.delenv("VLM_NO_CHECKPOINT", raising=False)
    spec = spec_dict(data, stages=[stage(steps=STEPS, microBatchSize=2, evalBatches=1)],
                     checkpoint_uri=(tmp_path / "ckpt").as_uri())
    spec["checkpoint"].update(interval=2, keep=2)
    n = [0]

    def go(termination: Path | None, *, max_steps: int | None = None, stop: bool = False):
        n[0] += 1
        progress = tmp_path / f"progress{n[0]}.jsonl"
        monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress))
        if termination is None:
            monkeypatch.delenv(stage_policy.TERMINATION_LOG_ENV, raising=False)
        else:
            monkeypatch.setenv(stage_policy.TERMINATION_LOG_ENV, str(termination))
        cfg = trainer_config(spec, **({"max_steps": max_steps} if max_steps else {}))
        reset_registry()
        with one_thread():
            t = T.Trainer(cfg, serve_metrics=False)
            if stop:
                t.request_stop()
            try:
                result = t.train()
            finally:
                t.close()
        events = [json.loads(line) for line in progress.read_text().splitlines()]
        return result, events

    go.store = lambda: open_store((tmp_path / "ckpt").as_uri())
    return go


def test_a_finished_stage_confirms_its_final_checkpoint_also_when_resumed(run, tmp_path):
    first = tmp_path / "termination-first.json"
    res, events = run(first)
    assert res.exit_code == T.EXIT_OK and res.stage_finished
    ref = run.store().latest_committed("pretrain")
    assert ref.final and ref.step == STEPS
    got = json.loads(first.read_text())
    end = [e for e in events if e["event"] == "end"][-1]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals, "the stage evaluates (validation sources): the final losses go with the confirmation"
    assert got == {"stage": "pretrain", "step": STEPS, "uri": ref.uri, "tokens": end["tokens"],
                   "validationLoss": {m: round(v, 6) for m, v in evals[-1]["losses"].items()}}
    assert got["tokens"] == ref.manifest["extra"]["tokens"] > 0
    assert stage_policy.confirmed_final([first.read_text()], "pretrain") == got

    # A node that joins after the stage ended: it resumes the final checkpoint, trains
    # nothing, and confirms the same checkpoint (the step, URI and tokens of the manifest).
    again = tmp_path / "termination-again.json"
    res2, events2 = run(again)
    assert res2.exit_code == T.EXIT_OK and [e for e in events2 if e["event"] == "step"] == []
    assert [(e["mode"], e["step"]) for e in events2 if e["event"] == "restore"] == [("resume", STEPS)]
    got2 = json.loads(again.read_text())
    assert {k: got2[k] for k in ("stage", "step", "uri", "tokens")} == {k: got[k] for k in ("stage", "step", "uri", "tokens")}
    assert set(got2["validationLoss"]) == set(got["validationLoss"])


def test_a_stopped_or_capped_stage_confirms_nothing(run, tmp_path):
    log = tmp_path / "termination.json"
    res, _ = run(log, stop=True)  # a signal: stops at step 1 with a (non-final) checkpoint
    assert res.exit_code == T.EXIT_STOPPED and not log.exists()
    res, _ = run(log, max_steps=2)  # --max-steps: committed, not the stage's end
    assert res.exit_code == T.EXIT_OK and not res.stage_finished and not log.exists()
    assert not run.store().latest_committed("pretrain").final


def test_where_the_confirmation_goes(tmp_path, monkeypatch):
    monkeypatch.delenv(stage_policy.TERMINATION_LOG_ENV, raising=False)
    monkeypatch.setattr(stage_policy, "TERMINATION_LOG", str(tmp_path / "absent" / "termination-log"))
    assert stage_io.termination_log_path() is None
    assert stage_io.write_termination_log("{}") is None  # outside Kubernetes: nowhere, silently
    k8s = tmp_path / "termination-log"
    k8s.write_text("")  # the kubelet creates the file
    monkeypatch.setattr(stage_policy, "TERMINATION_LOG", str(k8s))
    assert stage_io.termination_log_path() == str(k8s)
    assert stage_io.write_termination_log('{"a":1}') == str(k8s) and k8s.read_text() == '{"a":1}'
    k8s.chmod(0o444)
    try:
        import os

        if not os.access(k8s, os.W_OK):  # (root can write anyway)
            assert stage_io.termination_log_path() is None
    finally:
        k8s.chmod(0o644)
    mine = tmp_path / "mine.json"
    monkeypatch.setenv(stage_policy.TERMINATION_LOG_ENV, str(mine))
    assert stage_io.termination_log_path() == str(mine)
    stage_io.write_termination_log('{"b":2}')
    assert mine.read_text() == '{"b":2}' and k8s.read_text() == '{"a":1}'

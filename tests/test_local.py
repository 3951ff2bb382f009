"""`vlmpretrain local` and the demo's grounding check.

Fast tests: progress rendering on synthetic progress files, URI and option handling, the
process tracker (workers in their own sessions), the derangement of the grounding test.

Slow tests (`-m slow`, real torchrun through torchx's local scheduler, 2 workers) check one
pipeline on tests/data/tiny-local.yaml in a shared directory, run once by module-scoped
fixtures (one per phase, each on the previous one's result), so the tests pass alone and in
any order:

1. ``--max-steps 30 --checkpoint-dir C``: pretrain stops at step 30 (committed, not final),
   the SFT stage does not start, nothing lands in the recipe's own checkpoint URI;
2. the same command without ``--max-steps`` resumes at step 30; SIGINT after the next
   committed checkpoint: exit 130, no trainer process left, every step directory left in
   the store is a valid committed checkpoint;
3. again: pretrain resumes from its newest checkpoint, finishes, and SFT runs from its
   final checkpoint (two stages end to end, --nproc 2);
4. again: nothing is re-trained (both stages skipped);
5. grounding: caption loss with mismatched images >= GROUNDING_MIN x the true-image loss
   on the final checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vlm_local import options as O
from vlm_local import processes as P
from vlm_local import runner as L
from vlm_local import steps as S
from vlm_local import view as V

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-local.yaml"
VLM = [sys.executable, "-m", "vlm_api.cli"]
# Measured on tests/data/tiny-local.yaml with --nproc 2: 5.5x to 11.5x over seeds 0-3 (README, "Local runs and
# the demo"); 2.0 leaves a wide margin.
GROUNDING_MIN = 2.0


# --------------------------------------------------------------------------- fast: rendering


def _events(stage="pretrain", steps=20, total=40, start=0, t0=1000.0):
    evs = [{"event": "start", "time": t0, "run": "r", "stage": stage, "step": start, "total_steps": total,
            "stop_at": total, "world_size": 2, "metrics_port": 9400, "restart_count": 0}]
    for s in range(start + 1, start + steps + 1):
        evs.append({"event": "step", "time": t0 + s * 0.5, "run": "r", "stage": stage, "step": s, "total_steps": total,
                    "loss": 5.0 - 0.1 * s, "lr": 1e-3, "tokens": 1000 * s, "image_token_ratio": 0.125,
                    "tokens_per_s": 2000.0})
        if s % 10 == 0:
            evs.append({"event": "checkpoint", "time": t0 + s * 0.5, "run": "r", "stage": stage, "step": s,
                        "uri": f"file:///c/{stage}/step-{s:09d}/", "final": s == total, "bytes": 10})
    return evs


def test_progress_tail_reads_only_complete_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    tail = V.ProgressTail(path)
    assert tail.read() == []  # no file yet
    with open(path, "w") as f:
        f.write(json.dumps({"event": "start", "step": 0}) + "\n" + '{"event": "step", "st')
    assert [e["event"] for e in tail.read()] == ["start"]
    with open(path, "a") as f:
        f.write('ep": 1}\nnot json\n')
    got = tail.read()
    assert got == [{"event": "step", "step": 1}]
    # a tail opened on an existing file starts at its end (an earlier attempt's lines are old news)
    assert V.ProgressTail(path).read() == []


def test_stage_state_and_plain_lines():
    out = io.StringIO()
    st = V.StageState("pretrain")
    view = V.StageView(st, out, mode="plain")
    view.feed(_events(steps=20, total=40))
    view.feed([{"event": "eval", "step": 20, "losses": {"text": 1.5, "image-text": 2.25}},
               {"event": "checkpoint_failed", "step": 25, "phase": "upload", "error": "boom"}])
    text = out.getvalue()
    assert "starting: 40 steps, world size 2" in text
    assert "step 20/40 (50%)" in text and "img 12.5%" in text
    assert "checkpoint step 10 committed" in text and "FAILED (upload): boom" in text
    assert "validation at step 20: image-text 2.250 text 1.500" in text
    # ~5% of the stage per plain line, not one per step
    assert 2 <= text.count("| loss") <= 21
    assert st.checkpoints == [10, 20] and st.val == {"text": 1.5, "image-text": 2.25}
    assert st.train_loss == pytest.approx(sum(5.0 - 0.1 * s for s in range(11, 21)) / 10)
    assert st.eta_seconds() == pytest.approx(20 * 0.5)
    assert "\r" not in text


def _frames(text: str) -> list[str]:
    """What a terminal shows after each of rich's in-place redraws, colours stripped."""
    from rich.text import Text

    return [Text.from_ansi(f).plain.strip() for f in text.split("\r\x1b[2K")]


def test_bar_mode_redraws_in_place():
    out = io.StringIO()  # mode="bar": a rich Console with force_terminal=True writes to it
    st = V.StageState("sft")
    view = V.StageView(st, out, mode="bar", min_interval=0)
    evs = _events(stage="sft", steps=10, total=10)
    view.feed(evs[:6])  # start + steps 1-5
    view.feed(evs[6:])
    view.close()
    text = out.getvalue()
    frames = _frames(text)
    assert len(frames) >= 3  # redrawn in place, not one line per update
    assert any(f.startswith("sft  50% ") and "5/10 | loss 4.500" in f for f in frames)
    assert frames[-1].startswith("sft 100% ") and "10/10 | loss 4.000 | 2.0k tok/s | img 12.5%" in frames[-1]
    assert frames[-1].endswith("eta 0:00")
    assert "[sft] final checkpoint step 10 committed file:///c/sft/step-000000010/\n" in text
    assert text.endswith("\n\x1b[?25h")  # the last bar stays, on its own line, and the cursor is back


def test_resumed_stage_and_summary_table(tmp_path):
    path = tmp_path / "progress.jsonl"
    evs = _events(steps=10, total=40) + [{"event": "end", "status": "stopped", "step": 10, "tokens": 10000}]
    evs += _events(steps=30, total=40, start=10, t0=2000.0)
    evs += [{"event": "eval", "step": 40, "losses": {"text": 1.25, "image-text": 0.5}},
            {"event": "end", "status": "completed", "step": 40, "tokens": 40000, "loss": 1.0}]
    path.write_text("".join(json.dumps(e) + "\n" for e in evs))
    st = V.state_from_file("pretrain", path)
    assert st.status == "completed" and st.start_step == 10 and st.attempts == 2 and st.step == 40
    st.wall_s = 75
    other = V.StageState("sft", status="failed", step=3, total_steps=8, error="x")
    table = V.summary_table([st, other])
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "status", "steps", "tokens", "train", "loss", "val", "image-text", "val",
                                "text", "ckpts", "wall"]
    assert "40/40 (from 10)" in lines[2] and "40.0k" in lines[2] and "0.500" in lines[2] and "1:15" in lines[2]
    assert lines[3].startswith("sft") and "3/8" in lines[3]
    plain, drawn = io.StringIO(), io.StringIO()
    V.write_summary([st, other], plain, "plain")
    assert plain.getvalue() == table + "\n"
    V.write_summary([st, other], drawn, "bar")  # rich's table
    rows = [r for r in _frames(drawn.getvalue())[0].splitlines() if r.strip()]
    assert rows[0].split() == lines[0].split() and set(rows[1].strip()) == {"─"}
    assert rows[2].split()[:3] == ["pretrain", "completed", "40/40"] and "1:15" in rows[2]
    d = V.summary_dict([st, other])
    assert d[0]["validation_loss"] == {"text": 1.25, "image-text": 0.5} and d[1]["error"] == "x"


def test_formatting_helpers():
    assert V.fmt_duration(None) == "--:--" and V.fmt_duration(65) == "1:05" and V.fmt_duration(3725) == "1:02:05"
    assert V.fmt_count(1234) == "1.2k" and V.fmt_count(5_600_000) == "5.6M" and V.fmt_count(12) == "12"
    assert V.fmt_loss(float("nan")) == "-" and V.fmt_loss(1.23456) == "1.235"


# --------------------------------------------------------------------------- fast: runner pieces


def test_checkpoint_uris_are_made_absolute(tmp_path):
    assert O.local_checkpoint_uri("s3://b/p/", tmp_path) == "s3://b/p/"
    want = (tmp_path / "runs" / "demo" / "checkpoints").as_uri()
    assert O.local_checkpoint_uri("file://./runs/demo/checkpoints", tmp_path) == want  # not host '.'
    assert O.local_checkpoint_uri("./runs/demo/checkpoints", tmp_path) == want
    assert O.local_checkpoint_uri("runs/demo/checkpoints", tmp_path) == want
    assert O.local_checkpoint_uri(f"file://{tmp_path}/x", Path("/elsewhere")) == (tmp_path / "x").as_uri()
    assert O.local_checkpoint_uri(str(tmp_path / "x"), Path("/elsewhere")) == (tmp_path / "x").as_uri()


def test_parse_nnodes():
    assert O.parse_nnodes("2") == (2, 2) and O.parse_nnodes("1:3") == (1, 3)
    for bad in ("0", "3:1", "x", "1:y"):
        with pytest.raises(O.LocalRunError):
            O.parse_nnodes(bad)


def test_localized_appdef_is_the_operators_with_local_changes(tmp_path):
    from vlm_api import launch, render

    runner = L.LocalRunner(O.LocalOptions(file=str(TINY), nnodes=(1, 2), checkpoint_dir=str(tmp_path / "c")),
                           io.StringIO(), base=tmp_path)
    run, spec = runner.load()
    local_spec = runner.localize(spec)
    assert local_spec.checkpoint.uri == (tmp_path / "c").as_uri() and spec.checkpoint.uri == "file://./tiny-ckpt"
    app = runner.appdef(run, local_spec, "pretrain", config_path=tmp_path / "config.yaml",
                        progress_path=tmp_path / "pretrain" / "progress.jsonl", nproc=2, metrics_port=9999)
    ref = launch.describe(local_spec, name=render.job_name("tiny", "pretrain"),
                          rdzv=render.rendezvous(run, local_spec, "pretrain"))
    role = app.roles[0]
    assert role.entrypoint == ref.command == "torchrun"
    assert role.args == ["-m", "vlm_trainer", "--config", str(tmp_path / "config.yaml")]
    assert list(ref.args[:3]) == role.args[:3]
    assert role.num_replicas == 2 and role.min_replicas == 1
    env = role.env
    assert env["PET_NNODES"] == "1:2" and env["PET_NPROC_PER_NODE"] == "2" and env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"].startswith("localhost:")
    assert env["PET_MAX_RESTARTS"] == str(min(int(ref.env["PET_MAX_RESTARTS"]), S.LOCAL_MAX_RESTARTS)) == "3"
    assert env["PET_RDZV_CONF"] == ref.env["PET_RDZV_CONF"]
    assert env["VLM_PROGRESS_FILE"].endswith("progress.jsonl") and env["VLM_METRICS_PORT"] == "9999"
    # each replica's termination message (a pod's /dev/termination-log): torchx fills in the replica id
    assert env["VLM_TERMINATION_LOG"] == str(tmp_path / "pretrain" / "termination-${replica_id}.json")
    # local agents share one host (and its metrics port): only rank 0 serves
    assert env["VLM_METRICS_EVERY_NODE"] == "0" and ref.env["VLM_METRICS_EVERY_NODE"] == "1"
    same = {k for k in ref.env
            if k not in ("PET_RDZV_ENDPOINT", "PET_NPROC_PER_NODE", "PET_MAX_RESTARTS", "VLM_METRICS_EVERY_NODE")}
    assert all(env[k] == ref.env[k] for k in same)


def test_missing_shards_are_reported(tmp_path):
    runner = L.LocalRunner(O.LocalOptions(file=str(TINY)), io.StringIO(), base=tmp_path)
    _, spec = runner.load()
    missing = O.missing_shards(spec, spec.stages[0], tmp_path)
    assert any(m.endswith("tiny-data/captions/train-0001.tar") for m in missing)
    assert not any("instruct" in m for m in missing)  # not read by the pretrain stage


def test_invalid_manifest_is_refused_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("text: 0.2, captions: 0.8", "text: 0.2, captions: 0.7"))
    r = subprocess.run(VLM + ["local", str(bad)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "sum to 1" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = subprocess.run(VLM + ["local", str(TINY)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "shard file(s) missing" in r.stderr and "tiny-data/text/train-0000.tar" in r.stderr
    assert not (tmp_path / "runs").exists(), "missing data is found before anything runs"


def test_tracker_kills_workers_in_their_own_session(tmp_path):
    """A stand-in for torchrun: an agent whose 'worker' runs in its own session."""
    pidfile = tmp_path / "worker.pid"
    agent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "w = subprocess.Popen(['sleep', '120'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(w.pid))\n"
        "time.sleep(120)\n")], start_new_session=True)
    try:
        for _ in range(100):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        worker = int(pidfile.read_text())
        tracker = P.ProcessTracker()
        tracker.set_roots([agent.pid])
        tracker.poll()
        assert {agent.pid, worker} <= set(tracker.alive())
        os.killpg(agent.pid, signal.SIGKILL)  # what a process-group kill of the agent does ...
        agent.wait()
        assert P.process_alive(worker)  # ... the worker lives on
        tracker.poll()
        assert tracker.signal_all(signal.SIGKILL) == [worker]
        tracker.wait_gone(5)
        assert tracker.alive() == []
    finally:
        agent.kill()


def test_derangement_changes_every_caption():
    from vlm_trainer.grounding import derangement

    caps = ["a", "b", "a", "c", "d", "b", "e", "a"]
    perm = derangement(caps, seed=3)
    assert sorted(perm) == list(range(len(caps)))
    assert all(caps[perm[i]] != caps[i] for i in range(len(caps)))


# --------------------------------------------------------------------------- slow: the pipeline


def _trainers_of(run_dir: Path) -> list[int]:
    key = str(run_dir)
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if key in cmd and "vlm_trainer" in cmd and p.pid != os.getpid():
            out.append(p.pid)
    return out


def _committed(ckpt: Path) -> tuple[list[int], list[str]]:
    """(pretrain's step directories, problems: a step directory with files but no valid COMMITTED manifest)."""
    from vlm_trainer.checkpoint import open_store

    store = open_store(ckpt.as_uri())
    steps, problems = [], []
    for stage in ("pretrain", "sft"):
        for ref in store.checkpoints(stage):
            files = [p for p in Path(ref.uri[len("file://"):]).rglob("*") if p.is_file()]
            if files and not ref.committed:
                problems.append(f"{ref.uri} has files but no valid COMMITTED manifest")
            elif files and store.verify(ref):
                problems.append(f"{ref.uri}: {store.verify(ref)}")
            if stage == "pretrain":
                steps.append(ref.step)
    return steps, problems


def _starts(progress: Path) -> list[int]:
    return [e["step"] for e in V.read_events(progress) if e["event"] == "start"]


def _local(work: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(VLM + ["local", str(TINY), "--nproc", "2", "--checkpoint-dir", str(work / "ckpt"),
                                 "--progress", "plain", *extra],
                          cwd=work, capture_output=True, text=True, timeout=timeout)


def _output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr


# The pipeline runs once per module, one phase per fixture, each phase on the previous one's
# result; a phase records what its test checks (later phases overwrite the run directory).
# Any test, alone or in any order, runs the phases it needs.


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from vlm_trainer.data import synthdata

    d = tmp_path_factory.mktemp("local")
    synthdata.generate(d / "tiny-data", samples_per_shard=160, image_size=32,
                       shards={"text": 1, "captions": 2, "instruct": 1, "text-instruct": 1})
    return d


@pytest.fixture(scope="module")
def capped(work):
    """1. `--max-steps 30 --checkpoint-dir C`."""
    from vlm_trainer.checkpoint import open_store

    r = _local(work, "--max-steps", "30")
    store = open_store((work / "ckpt").as_uri())
    run = work / "runs/tiny"
    return {
        "result": r,
        "committed": _committed(work / "ckpt"),
        "latest": store.latest_committed("pretrain"),
        "sft": store.checkpoints("sft"),
        "config": (run / "pretrain/config.yaml").read_text() if (run / "pretrain/config.yaml").exists() else "",
        "summary": json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None,
        "logs": [p.read_text() for p in (run / "logs").rglob("combined.log")],
    }


@pytest.fixture(scope="module")
def interrupted(work, capped):
    """2. The same command without `--max-steps` (a resume); SIGINT after the next committed checkpoint."""
    assert capped["result"].returncode == 0, _output(capped["result"])
    progress = work / "runs/tiny/pretrain/progress.jsonl"
    seen = len(V.read_events(progress))
    proc = subprocess.Popen(VLM + ["local", str(TINY), "--nproc", "2", "--checkpoint-dir", str(work / "ckpt"),
                                   "--progress", "plain"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    checkpointed = False
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if any(e["event"] == "checkpoint" and e["step"] >= 50 for e in V.read_events(progress)[seen:]):
                checkpointed = True
                break
            time.sleep(0.2)
        starts = _starts(progress)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {
        "checkpointed": checkpointed,
        "starts": starts,
        "returncode": proc.returncode,
        "output": out,
        "left": _trainers_of(work / "runs" / "tiny"),
        "committed": _committed(work / "ckpt"),
        "ends": [e for e in V.read_events(progress) if e["event"] == "end"],
    }


@pytest.fixture(scope="module")
def completed(work, interrupted):
    """3. Again: pretrain resumes from its newest checkpoint and finishes; SFT runs from its final checkpoint."""
    from vlm_trainer.checkpoint import open_store

    steps, _ = _committed(work / "ckpt")
    r = _local(work)
    store = open_store((work / "ckpt").as_uri())
    run = work / "runs/tiny"
    return {
        "before": max(steps, default=None),
        "result": r,
        "starts": _starts(run / "pretrain/progress.jsonl"),
        "pretrain": store.latest_committed("pretrain"),
        "sft": store.latest_committed("sft"),
        "sft_events": V.read_events(run / "sft/progress.jsonl"),
        "summary": json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None,
    }


@pytest.mark.slow
def test_1_max_steps_and_checkpoint_dir(work, capped):
    r = capped["result"]
    assert r.returncode == 0, _output(r)
    assert not (work / "tiny-ckpt").exists(), "--checkpoint-dir must replace spec.checkpoint.uri"
    assert capped["committed"] == ([30], [])
    assert not capped["latest"].final  # a prefix of the stage, not its end
    assert capped["sft"] == [], "a stage cut short by --max-steps must not feed the next one"
    assert "run again without --max-steps" in r.stdout
    assert "maxSteps: 30" in capped["config"] and (work / "ckpt").as_uri() in capped["config"]
    stage = capped["summary"]["stages"][0]
    assert stage["step"] == 30 and stage["status"] == "capped"
    assert any("[default1]" in text for text in capped["logs"]), "every rank's output in the run directory"


@pytest.mark.slow
def test_2_resume_then_sigint_leaves_only_committed_checkpoints(interrupted):
    out = interrupted["output"]
    assert interrupted["checkpointed"], f"no checkpoint after the resume: {out}"
    assert interrupted["starts"][-1] == 30, "the second run must resume from the committed step 30"
    assert interrupted["returncode"] == 130, out
    assert "interrupted" in out and "run the same command again to resume" in out
    assert interrupted["left"] == [], "no trainer process may outlive the runner"
    steps, problems = interrupted["committed"]
    assert problems == []
    assert steps and max(steps) >= 50 and max(steps) < 1000
    assert interrupted["ends"][-1]["status"] == "stopped"
    assert max(steps) == interrupted["ends"][-1]["step"], "the trainer checkpoints the step it stopped at"


@pytest.mark.slow
def test_3_two_stages_end_to_end_with_two_processes(completed):
    r = completed["result"]
    assert r.returncode == 0, _output(r)
    assert completed["starts"][-1] == completed["before"], "pretrain resumes from its newest committed checkpoint"
    pre, sft = completed["pretrain"], completed["sft"]
    assert pre.final and pre.step == 1000 and sft.final and sft.step == 8
    assert pre.world_size == 2 and sft.world_size == 2
    restore = [e for e in completed["sft_events"] if e["event"] == "restore"]
    assert restore and restore[0]["uri"] == pre.uri and restore[0]["mode"] == "init"
    stages = completed["summary"]["stages"]
    assert [s["status"] for s in stages] == ["completed", "completed"]
    assert all(s["validation_loss"].get("image-text") for s in stages)
    assert "val image-text" in r.stdout and "val text" in r.stdout  # the summary table


@pytest.mark.slow
def test_4_rerun_trains_nothing(work, completed):
    assert completed["result"].returncode == 0, _output(completed["result"])
    t0 = time.monotonic()
    r = _local(work, timeout=120)
    assert r.returncode == 0, _output(r)
    assert r.stdout.count("already complete") == 2 and "torchrun" not in r.stdout
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_5_grounding_gap_on_the_final_checkpoint(work, completed, monkeypatch):
    from vlm_trainer.grounding import evaluate_checkpoint

    assert completed["result"].returncode == 0, _output(completed["result"])
    monkeypatch.chdir(work)  # the recipe's data paths are relative to where it ran
    r = evaluate_checkpoint((work / "ckpt" / "sft").as_uri() + "/", config=str(work / "runs/tiny/sft/config.yaml"))
    print(f"tiny grounding: true {r.true_loss:.4f} mismatched {r.mismatched_loss:.4f} ratio {r.ratio:.2f}")
    assert r.samples >= 64
    assert r.ratio >= GROUNDING_MIN, r


@pytest.mark.slow
def test_two_agents_on_localhost_with_an_s3_checkpoint_uri(work, moto_endpoint, tmp_path):
    """`--nnodes 1:2`: two torchrun agents (replicas) rendezvous on localhost; an s3:// checkpoint
    URI (moto over HTTP) is used as given."""
    import boto3
    import yaml

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="tiny-ckpt")
    doc = yaml.safe_load(TINY.read_text())
    doc["spec"]["checkpoint"].update(uri="s3://tiny-ckpt/runs/tiny/", endpoint=moto_endpoint)
    manifest = tmp_path / "tiny-s3.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    r = subprocess.run(VLM + ["local", str(manifest), "--nnodes", "1:2", "--max-steps", "5", "--progress", "plain",
                              "--run-dir", str(tmp_path / "run")], cwd=work, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world size 2" in r.stdout and "x2 agent(s)" in r.stdout
    assert sorted(p.parent.name for p in (tmp_path / "run" / "logs").rglob("trainer/*/combined.log")) == ["0", "1"]
    from vlm_trainer.checkpoint import open_store

    ref = open_store("s3://tiny-ckpt/runs/tiny/", endpoint_url=moto_endpoint).latest_committed("pretrain")
    assert ref is not None and ref.step == 5 and ref.world_size == 2
    assert "s3://tiny-ckpt/runs/tiny/" in (tmp_path / "run" / "pretrain" / "config.yaml").read_text()

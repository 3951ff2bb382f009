"""`vlmpretrain local SWEEP.yaml` on a 2-point, 1-seed tiny sweep (real torchrun, real trainer),
`render` of a sweep, and a half-done sweep resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vlm_api import sweep_grid

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-local.yaml"
VLM = [sys.executable, "-m", "vlm_api.cli"]
INTRO = "stages[pretrain].visualIntroduceAt"


def tiny_sweep(path: Path, steps: int = 6) -> Path:
    """tests/data/tiny-local.yaml cut to one short stage, swept over two introduction points."""
    run = yaml.safe_load(TINY.read_text())
    pretrain = run["spec"]["stages"][0]
    pretrain.update(steps=steps, evalBatches=1, evalInterval=0)
    run["spec"]["stages"] = [pretrain]
    sweep = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainSweep", "metadata": {"name": "tinysweep"},
             "spec": {"template": run["spec"], "parameters": [{"path": INTRO, "values": [0.0, 0.5]}], "seeds": [0],
                      "objective": {"stage": "pretrain", "modality": "image-text"}}}
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from vlm_trainer.data import synthdata

    d = tmp_path_factory.mktemp("sweep")
    synthdata.generate(d / "tiny-data", samples_per_shard=64, image_size=32,
                       shards={"text": 1, "captions": 2, "instruct": 1, "text-instruct": 1})
    tiny_sweep(d / "sweep.yaml")
    return d


@pytest.mark.integration
def test_render_prints_the_child_runs(work):
    r = subprocess.run(VLM + ["render", "sweep.yaml"], cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = list(yaml.safe_load_all(r.stdout))
    assert [o["metadata"]["name"] for o in runs] == [sweep_grid.run_name("tinysweep", {INTRO: v}, 0) for v in (0.0, 0.5)]
    assert [o["spec"]["stages"][0]["visualIntroduceAt"] for o in runs] == [0.0, 0.5]


@pytest.mark.integration
def test_validate_names_the_path_and_the_point(work):
    bad = yaml.safe_load((work / "sweep.yaml").read_text())
    bad["spec"]["parameters"][0]["values"].append(1.5)
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = subprocess.run(VLM + ["validate", "bad.yaml"], cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stdout.startswith("bad.yaml: spec.parameters[0].values[2]: stages[pretrain].visualIntroduceAt = 1.5"), r.stdout


@pytest.mark.integration
def test_single_run_options_are_refused_for_a_sweep(work):
    r = subprocess.run(VLM + ["local", "sweep.yaml", "--max-steps", "3", "--stage", "pretrain"], cwd=work,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-steps, --stage: options of a single run" in r.stderr, r.stderr


@pytest.mark.integration
def test_local_sweep_writes_results_and_resumes(work):
    r = subprocess.run(VLM + ["local", "sweep.yaml", "--nproc", "1"], cwd=work, capture_output=True, text=True,
                       timeout=600)
    root = work / "runs" / "tinysweep"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    names = [sweep_grid.run_name("tinysweep", {INTRO: v}, 0) for v in (0.0, 0.5)]
    assert [p["run"] for p in results["points"]] == names
    for p in results["points"]:
        assert p["status"] == "succeeded" and p["seed"] == 0 and p["wallSeconds"] > 0
        assert set(p["validationLoss"]) == {"text", "image-text"}  # confirmed by the trainer, per modality
        assert p["stages"]["pretrain"] == p["validationLoss"]
        assert p["tokens"] > 0
        # the same figure the trainer wrote as its termination message
        message = json.loads((root / p["run"] / "pretrain" / "termination-0.json").read_text())
        assert message["validationLoss"] == p["validationLoss"]
    best = min(results["points"], key=lambda p: p["validationLoss"]["image-text"])
    assert results["best"] == {"name": best["name"], "parameters": best["parameters"],
                               "value": round(best["validationLoss"]["image-text"], 6), "seeds": 1}
    md = (root / "results.md").read_text()
    assert md.splitlines()[0] == f"| {INTRO} | seeds ok | image-text val. loss | text val. loss |  |"
    assert md.count("**best**") == 1 and "| 0.0 | 1/1 |" in md and "| 0.5 | 1/1 |" in md
    assert (root / "results.png").stat().st_size > 1000

    # A half-done sweep: one point's result gone; the same command runs only that point.
    (root / names[1] / "point.json").unlink()
    r = subprocess.run(VLM + ["local", "sweep.yaml", "--nproc", "1", "--parallel", "2"], cwd=work, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 runs (1 done)" in r.stdout and f"start {names[1]}" in r.stdout and f"start {names[0]}" not in r.stdout
    again = json.loads((root / "results.json").read_text())
    assert again["points"][0] == results["points"][0]
    assert again["points"][1]["validationLoss"] == results["points"][1]["validationLoss"]  # its stage was complete


@pytest.mark.slow  # a stage long enough to interrupt: ~40 s
def test_ctrl_c_stops_the_sweep_and_leaves_the_point_to_resume(work):
    """SIGINT to the terminal's process group (Ctrl-C): the running point's runner stops its
    stage, no other point starts, the sweep exits 130 and the stopped point has no result."""
    tiny_sweep(work / "long.yaml", steps=5000)
    root = work / "runs" / "long"
    text = (work / "long.yaml").read_text().replace("name: tinysweep", "name: long")
    (work / "long.yaml").write_text(text)
    proc = subprocess.Popen(VLM + ["local", "long.yaml", "--nproc", "1"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = sweep_grid.run_name("long", {INTRO: 0.0}, 0)
    progress = root / first / "pretrain" / "progress.jsonl"
    deadline = time.monotonic() + 300
    while not (progress.is_file() and '"event": "step"' in progress.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, "the first point never trained"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert f"stopped   {first}" in out
    assert not (root / first / "point.json").exists()
    assert not (root / sweep_grid.run_name("long", {INTRO: 0.5}, 0)).exists()  # never started

"""The real operator runs a VLMPretrainSweep over HTTP against the emulator.

The test plays the user (creates and edits sweeps) and the Kubeflow training operator
(finishes each child run's PyTorchJobs, with rank 0's confirmation carrying the final
validation loss per modality); the operator creates and watches the child runs itself.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import jsonschema
import pytest

from tests.support.operator_harness import NS, RUNS, Cluster, spec, wait
from vlm_api import sweep_crd, sweep_grid
from vlm_api.validate import _strict as strict_schema

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SWEEPS = "pretrain.vlm.dev/v1alpha1/vlmpretrainsweeps"
INTRO = "stages[pretrain].visualIntroduceAt"
VALUES = [0.0, 0.4, 0.8]


def sweep_obj(name: str = "intro", **overrides) -> dict:
    body = {"template": spec(maxRetries=0), "parameters": [{"path": INTRO, "values": VALUES}], "seeds": [0, 1],
            "maxConcurrent": 2, "objective": {"stage": "sft", "modality": "image-text", "goal": "minimize"}}
    body.update(overrides)
    return {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainSweep",
            "metadata": {"name": name, "namespace": NS}, "spec": body}


def run_names(name: str = "intro", seeds=(0, 1)) -> list[str]:
    """The children in the order the operator starts them: every point once per seed, seed-major."""
    return [sweep_grid.run_name(name, {INTRO: v}, s) for s in seeds for v in VALUES]


def sweep_status(cluster: Cluster, name: str = "intro") -> dict:
    return (cluster.get(SWEEPS, name) or {}).get("status") or {}


def children(cluster: Cluster) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in cluster.objects(RUNS)}


def active(cluster: Cluster) -> list[str]:
    return sorted(n for n, r in children(cluster).items()
                  if (r.get("status") or {}).get("phase") not in ("Succeeded", "Failed", "Invalid"))


def loss_of(run: str) -> float:
    """A made-up image-text loss: lower for later introduction, a little noise per seed."""
    intro = next(v for v in VALUES if sweep_grid.run_name("intro", {INTRO: v}, int(run[-1])) == run)
    return round(3.0 - intro + 0.01 * int(run[-1]), 6)


def finish(cluster: Cluster, run: str, fail: bool = False) -> None:
    """Play Kubeflow through both stages of a child run (or fail its first stage)."""
    for stage in ("pretrain", "sft"):
        job = f"{run}-{stage}"
        wait(lambda: cluster.job(job), timeout=15, what=f"job {job}")
        if fail:
            cluster.set_job(job, "Failed", "Error", "worker exited 1")
            cluster.wait_phase(run, "Failed", timeout=15)
            return
        loss = loss_of(run) + (0.5 if stage == "pretrain" else 0.0)
        cluster.confirm(job, validation_loss={"text": 2.0 + loss / 10, "image-text": loss})
        cluster.set_job(job, "Succeeded", confirm=False)
    cluster.wait_phase(run, "Succeeded", timeout=15)


class ActiveWatch:
    """Samples the number of active child runs in the background: the most ever seen."""

    def __init__(self, cluster: Cluster):
        self.cluster, self.most, self._stop = cluster, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.most = max(self.most, len(active(self.cluster)))
            self._stop.wait(0.01)

    def __enter__(self) -> "ActiveWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_sweep_runs_every_point_within_max_concurrent_and_picks_the_best(cluster):
    names = run_names()
    with cluster.operator(), ActiveWatch(cluster) as watch:
        sweep = cluster.create(SWEEPS, sweep_obj())
        wait(lambda: len(children(cluster)) == 2, what="the first two runs")
        assert sorted(children(cluster)) == sorted(names[:2])
        # Churn: finish whatever is active, in reverse order; one point of seed 1 fails.
        while len(children(cluster)) < len(names) or active(cluster):
            run = wait(lambda: active(cluster), timeout=15, what="an active run")[-1]
            finish(cluster, run, fail=(run == names[5]))
        status = wait(lambda: sweep_status(cluster).get("phase") == "Succeeded" and sweep_status(cluster),
                      timeout=15, what="sweep Succeeded")
        cluster.wait_events("intro", "SweepSucceeded")
    assert watch.most == 2
    # What the operator wrote is what the CRD's status schema holds (nothing the API server would prune).
    root = sweep_crd.build_sweep_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert list(jsonschema.Draft4Validator(strict_schema(root["properties"]["status"])).iter_errors(status)) == []
    assert sorted(children(cluster)) == sorted(names)
    assert status["done"] == "6/6"
    by_run = {p["run"]: p for p in status["points"]}
    assert [p["run"] for p in status["points"]] == names
    assert by_run[names[5]]["phase"] == "Failed" and "validationLoss" not in by_run[names[5]]
    for run in set(names) - {names[5]}:
        point = by_run[run]
        assert point["phase"] == "Succeeded"
        assert point["validationLoss"]["image-text"] == pytest.approx(loss_of(run))
        assert point["stages"]["pretrain"]["image-text"] == pytest.approx(loss_of(run) + 0.5)
        assert point["tokens"] == 2 * 409_600
        assert point["parameters"] == {INTRO: VALUES[names.index(run) % 3]}
    # 0.8 is best; its seed-1 run failed, so its mean is over seed 0 only.
    assert status["best"] == {"name": sweep_grid.point_name("intro", {INTRO: 0.8}), "parameters": {INTRO: 0.8},
                              "value": pytest.approx(loss_of(names[2])), "seeds": 1}
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Progressing": "False",
                                                                     "Degraded": "True"}
    uid = sweep["metadata"]["uid"]
    for run in children(cluster).values():
        meta = run["metadata"]
        assert meta["ownerReferences"] == [{"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainSweep",
                                            "name": "intro", "uid": uid, "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["pretrain.vlm.dev/sweep"] == "intro"
        assert run["spec"]["checkpoint"]["uri"] == f"s3://ckpt/runs/test/{meta['name']}/"
        assert run["spec"]["seed"] == int(meta["labels"]["pretrain.vlm.dev/seed"])
    # kubectl prints the CRD's columns (server-side printing from the applied sweep CRD).
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    subprocess.run(["kubectl", "apply", "--validate=false", "-f", str(REPO / sweep_crd.SWEEP_CRD_FILE)], env=env,
                   check=True, capture_output=True)
    header, row = subprocess.run(["kubectl", "get", "vps", "-n", NS], env=env, check=True, capture_output=True,
                                 text=True).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "DONE", "BEST", "AGE"]
    assert row.split()[:4] == ["intro", "Succeeded", "6/6", str(loss_of(names[2]))]


def test_a_restarted_operator_creates_no_duplicates(cluster):
    names = run_names()
    with cluster.operator():
        cluster.create(SWEEPS, sweep_obj(maxConcurrent=3))
        wait(lambda: len(children(cluster)) == 3, what="three runs")
    first = {n: r["metadata"]["uid"] for n, r in children(cluster).items()}
    with cluster.operator():
        finish(cluster, names[0])
        wait(lambda: len(children(cluster)) == 4, what="the fourth run")
        wait(lambda: sweep_status(cluster).get("done") == "1/6", what="status after the restart")
    after = children(cluster)
    assert sorted(after) == sorted(names[:4])
    assert all(after[n]["metadata"]["uid"] == uid for n, uid in first.items())  # the same objects, none re-made
    # Not even a create answered 409: the new process listed the runs before deciding.
    assert [r.verb for r in cluster.kube.request_log if r.resource == "vlmpretrainruns"].count("create") == 4


def test_suspend_suspends_the_active_runs_and_starts_no_new_one(cluster):
    names = run_names()
    with cluster.operator():
        cluster.create(SWEEPS, sweep_obj())
        wait(lambda: len(children(cluster)) == 2, what="two runs")
        cluster.merge(SWEEPS, "intro", {"spec": {"suspend": True}})
        wait(lambda: all(r["spec"]["suspend"] for r in children(cluster).values()), what="runs suspended")
        wait(lambda: sweep_status(cluster).get("phase") == "Suspended", what="sweep Suspended")
        finish(cluster, names[0])
        wait(lambda: sweep_status(cluster).get("done") == "1/6", what="the finished run mirrored")
        assert sorted(children(cluster)) == sorted(names[:2])  # no new run while suspended
        cluster.merge(SWEEPS, "intro", {"spec": {"suspend": False}})
        wait(lambda: len(children(cluster)) == 3, what="a new run after resuming")
        wait(lambda: not children(cluster)[names[1]]["spec"]["suspend"], what="the active run resumed")
        wait(lambda: sweep_status(cluster).get("phase") == "Running", what="sweep Running")


def test_all_points_failing_fails_the_sweep(cluster):
    names = run_names(seeds=(0,))
    with cluster.operator():
        cluster.create(SWEEPS, sweep_obj(seeds=[0], maxConcurrent=3))
        wait(lambda: len(children(cluster)) == 3, what="three runs")
        for run in names:
            finish(cluster, run, fail=True)
        status = wait(lambda: sweep_status(cluster).get("phase") == "Failed" and sweep_status(cluster),
                      timeout=15, what="sweep Failed")
    assert status["done"] == "3/3" and "best" not in status


def test_an_invalid_sweep_says_which_path_and_creates_nothing(cluster):
    bad = sweep_obj(parameters=[{"path": "stages[pretrain].visualIntroducAt", "values": [0.1]}])
    with cluster.operator():
        cluster.create(SWEEPS, bad)
        status = wait(lambda: sweep_status(cluster).get("phase") == "Invalid" and sweep_status(cluster),
                      what="sweep Invalid")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert "spec.parameters[0].path" in ready["message"] and "visualIntroduceAt?" in ready["message"]
    assert children(cluster) == {}


def test_a_run_name_taken_by_someone_else_is_skipped_not_adopted(cluster):
    names = run_names(seeds=(0,))
    with cluster.operator():
        foreign = cluster.create_run(names[0], spec(), labels={"team": "other"})
        cluster.create(SWEEPS, sweep_obj(seeds=[0], maxConcurrent=1))
        wait(lambda: names[1] in children(cluster), what="the next point started instead")
        status = wait(lambda: sweep_status(cluster).get("points") and sweep_status(cluster), what="points")
        cluster.wait_events("intro", "RunConflict")
    point = next(p for p in status["points"] if p["run"] == names[0])
    assert point["phase"] == "Failed" and "not this sweep's" in point["message"]
    assert cluster.run(names[0])["metadata"]["uid"] == foreign["metadata"]["uid"]
    assert "ownerReferences" not in cluster.run(names[0])["metadata"]  # never adopted
    assert names[2] not in children(cluster)  # one slot, held by the second point

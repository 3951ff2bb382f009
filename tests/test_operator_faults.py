"""Missing pieces and failing API calls: the operator waits, retries and recovers, never
crashes, and never makes a second copy of a child (also across restarts)."""

from __future__ import annotations

import collections

import pytest

from tests.support.kube_emulator import DEFAULT_RESOURCES
from tests.support.operator_harness import JOBS, PODMONITORS, RUNS, Cluster, spec, wait
from vlm_operator import metrics


# kubernetes-client 36 on urllib3 1.26 (pinned by torchx), on every error response: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")


def additions(cluster: Cluster) -> collections.Counter:
    """How many times each object was created (ADDED) over the emulator's whole history."""
    count: collections.Counter = collections.Counter()
    for _, resource, event in list(cluster.kube.emulator._events):
        if event["type"] == "ADDED":
            meta = event["object"]["metadata"]
            count[(resource.plural, meta.get("namespace"), meta["name"])] += 1
    return count


def test_pytorchjob_crd_missing_then_installed(cluster):
    cluster.kube.remove_resource(JOBS)
    with cluster.operator():
        cluster.create_run("llama")
        degraded = wait(lambda: cluster.condition("llama", "Degraded").get("reason") == "PyTorchJobCRDMissing"
                        and cluster.condition("llama", "Degraded"), what="Degraded/PyTorchJobCRDMissing")
        assert degraded["status"] == "True" and "Kubeflow Training Operator" in degraded["message"]
        assert cluster.status("llama")["phase"] == "Pending"
        (event,) = wait(lambda: cluster.events("llama", "PyTorchJobCRDMissing"), what="event")
        assert event["type"] == "Warning"
        # TemporaryError(delay): kopf re-runs the handler, recording each retry on the run.
        wait(lambda: sum(r.verb == "patch" and r.resource == "vlmpretrainruns" and r.subresource is None
                         for r in cluster.kube.request_log) >= 3, what="retries with delay")
        assert cluster.job("llama-pretrain") is None

        cluster.kube.add_resource(JOBS, DEFAULT_RESOURCES[JOBS])  # the Kubeflow Training Operator gets installed
        wait(lambda: cluster.job("llama-pretrain"), what="job after the CRD appeared")
        wait(lambda: cluster.condition("llama", "Degraded").get("status") == "False", what="recovery")
        # kopf noticed the new CRD and watches PyTorchJobs now: their status flows in.
        cluster.set_job("llama-pretrain", "Running")
        cluster.wait_phase("llama", "Running")
    assert len(cluster.events("llama", "PyTorchJobCRDMissing")) == 1
    assert additions(cluster)[("pytorchjobs", "ns1", "llama-pretrain")] == 1


def test_podmonitor_crd_absent_means_no_podmonitor(cluster):
    cluster.kube.remove_resource(PODMONITORS)
    with cluster.operator():
        cluster.create_run("llama")
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        # The job is created before the status patch lands: await the status, don't read it once.
        wait(lambda: cluster.status("llama").get("phase") == "Pending", what="phase Pending")
    assert cluster.condition("llama", "Degraded")["status"] == "False"
    assert not any(r.resource == "podmonitors" and r.verb == "create" for r in cluster.kube.request_log)


def test_injected_409_500_429_are_absorbed(cluster):
    kube = cluster.kube
    errors_before = {code: metrics.value("vlmoperator_api_errors_total", {"verb": v, "resource": res, "code": code})
                     for code, v, res in (("500", "create", "pytorchjobs.kubeflow.org"),
                                          ("429", "patch", "vlmpretrainruns.pretrain.vlm.dev"))}
    # 409: the ConfigMap is already there (created by an earlier operator before it died:
    # with the run as its owner, so it is ours).
    run = cluster.create_run("llama")
    owner = {"apiVersion": run["apiVersion"], "kind": run["kind"], "name": "llama", "uid": run["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": True}
    cluster.create("v1/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "data": {},
                                     "metadata": {"name": "llama-pretrain-config", "namespace": "ns1",
                                                  "ownerReferences": [owner]}})
    kube.fail("create", JOBS, 500, times=2)  # the API server fails the job creation twice
    kube.fail("patch", RUNS, 429, times=2, retry_after=0, subresource="status")  # throttled status writes
    kube.fail("patch", RUNS, 500, times=1, subresource=None)  # kopf's own annotation patch fails once
    kube.fail("create", "v1/events", 503, times=1)  # an event gets lost: no harm
    with cluster.operator() as runner:
        wait(lambda: cluster.job("llama-pretrain"), what="job despite 500s")
        wait(lambda: cluster.status("llama").get("phase") == "Pending", what="status despite 429s")
        cluster.set_job("llama-pretrain", "Running")
        cluster.wait_phase("llama", "Running")
        # A dropped watch stream: kopf reconnects and events keep flowing.
        kube.emulator.close_watches()
        kube.fail("watch", JOBS, 410, times=1)
        cluster.set_job("llama-pretrain", "Succeeded")
        wait(lambda: cluster.job("llama-sft"), timeout=15, what="next stage after the watch dropped")
    assert "Traceback" not in runner.output
    created = additions(cluster)
    assert created[("pytorchjobs", "ns1", "llama-pretrain")] == 1 and created[("configmaps", "ns1", "llama-pretrain-config")] == 1
    assert cluster.names(JOBS) == ["llama-pretrain", "llama-sft"]
    assert metrics.value("vlmoperator_api_errors_total", {"verb": "create", "resource": "pytorchjobs.kubeflow.org",
                                                           "code": "500"}) >= errors_before["500"] + 2
    assert metrics.value("vlmoperator_api_errors_total", {"verb": "patch", "resource": "vlmpretrainruns.pretrain.vlm.dev",
                                                           "code": "429"}) >= errors_before["429"] + 2
    # The pre-existing ConfigMap was taken as it was (409 = it exists), not overwritten.
    assert cluster.get("v1/configmaps", "llama-pretrain-config")["data"] == {}


def test_refused_child_is_reported_then_retried(cluster):
    cluster.kube.fail("create", JOBS, 422, times=2, message='PyTorchJob.kubeflow.org "llama-pretrain" is invalid: denied by a webhook')
    with cluster.operator():
        cluster.create_run("llama")
        degraded = wait(lambda: cluster.condition("llama", "Degraded").get("reason") == "ChildRejected"
                        and cluster.condition("llama", "Degraded"), what="Degraded/ChildRejected")
        assert "denied by a webhook" in degraded["message"] and degraded["status"] == "True"
        (event,) = wait(lambda: cluster.events("llama", "ChildRejected"), what="event")
        assert event["type"] == "Warning"
        wait(lambda: cluster.job("llama-pretrain"), what="the retry succeeding")
        wait(lambda: cluster.condition("llama", "Degraded").get("status") == "False", what="recovery")
    assert additions(cluster)[("pytorchjobs", "ns1", "llama-pretrain")] == 1


def test_persistent_api_failure_does_not_crash_and_recovers(cluster):
    kube = cluster.kube
    kube.fail("*", JOBS, 503, times=None)  # the API server is down for PyTorchJobs
    with cluster.operator():
        cluster.create_run("llama")
        wait(lambda: sum(r.resource == "pytorchjobs" and r.verb == "create" for r in kube.request_log) >= 8,
             what="several retries")
        assert cluster.job("llama-pretrain") is None
        kube.emulator.clear_faults()
        wait(lambda: cluster.job("llama-pretrain"), what="recovery")
        cluster.set_job("llama-pretrain", "Running")
        cluster.wait_phase("llama", "Running")
    assert additions(cluster)[("pytorchjobs", "ns1", "llama-pretrain")] == 1


def test_operator_restart_mid_pipeline_creates_no_duplicates(cluster):
    kube = cluster.kube
    with cluster.operator():  # operator A: first stage up and running
        cluster.create_run("llama")
        wait(lambda: cluster.job("llama-pretrain"), what="first job")
        cluster.set_job("llama-pretrain", "Running")
        cluster.wait_phase("llama", "Running")
    first = {r: cluster.get(r, n)["metadata"]["uid"] for r, n in (
        (JOBS, "llama-pretrain"), ("v1/configmaps", "llama-pretrain-config"), (PODMONITORS, "llama"))}

    cluster.set_job("llama-pretrain", "Succeeded")  # ...while no operator runs

    with cluster.operator():  # operator B resumes: the next stage, nothing twice
        wait(lambda: cluster.job("llama-sft"), what="next stage after restart")
        cluster.wait_phase("llama", "Pending")
        assert {r: cluster.get(r, n)["metadata"]["uid"] for r, n in (
            (JOBS, "llama-pretrain"), ("v1/configmaps", "llama-pretrain-config"), (PODMONITORS, "llama"))} == first
        # Crash window: the retry job gets created but its status write never lands.
        kube.fail("patch", RUNS, 500, times=None, subresource="status")
        cluster.set_job("llama-sft", "Failed", "Error", "OOM")
        wait(lambda: cluster.job("llama-sft-r1"), what="retry job")
        r1 = cluster.job("llama-sft-r1")["metadata"]["uid"]
        assert cluster.status("llama")["attempt"] == 0  # status is behind the children
    kube.emulator.clear_faults()

    with cluster.operator():  # operator C: re-decides attempt 1 from the old status, finds r1
        status = wait(lambda: cluster.status("llama").get("attempt") == 1 and cluster.status("llama"), what="attempt 1")
        assert status["jobName"] == "llama-sft-r1"
        cluster.set_job("llama-sft-r1", "Running")
        cluster.wait_phase("llama", "Running")
        cluster.set_job("llama-sft-r1", "Succeeded")
        done = cluster.wait_phase("llama", "Succeeded")
    assert cluster.job("llama-sft-r1")["metadata"]["uid"] == r1
    assert cluster.names(JOBS) == ["llama-pretrain", "llama-sft", "llama-sft-r1"]
    assert cluster.names("v1/configmaps") == ["llama-pretrain-config", "llama-sft-config"]
    assert cluster.names(PODMONITORS) == ["llama"]
    twice = {k: n for k, n in additions(cluster).items() if n > 1}
    assert twice == {}, twice
    assert done["attempt"] == 1 and set(done["finalCheckpoints"]) == {"pretrain", "sft"}

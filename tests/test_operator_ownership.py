"""Ownership: the operator touches only what it owns, and believes only pods its job owns.

- A child name already taken by an object without the run's ownerReference (none at all,
  or another owner's) is never adopted, patched or deleted: the run is Degraded with
  reason ChildConflict and a Warning Event, nothing is created past it, and it continues
  once the name is free.
- A day-2 change never patches a stage ConfigMap that was replaced by someone else's.
- Removing an ended attempt's store deletes only objects the run owns.
- The scraper reads only pods owned by the run's current PyTorchJob: a pod that merely
  carries the run's labels (anyone who can create pods in the namespace can copy them)
  cannot feed status (step, lastCheckpoint).
"""

from __future__ import annotations

import pytest

from tests.support.operator_harness import JOBS, NS, Cluster, TrainerMetrics, spec, wait
from vlm_api import render

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")

CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"


def _writes(cluster: Cluster, resource: str, name: str, verbs=("patch", "update", "delete")) -> list:
    return [r for r in cluster.kube.request_log if r.resource == resource and r.name == name and r.verb in verbs]


def _conflict(cluster: Cluster, run: str = "llama") -> dict:
    return wait(lambda: cluster.condition(run, "Degraded").get("reason") == "ChildConflict"
                and cluster.condition(run, "Degraded"), what="Degraded/ChildConflict")


def test_a_taken_child_name_is_not_adopted_and_the_run_waits_for_it(cluster):
    foreign = cluster.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "data": {"config.yaml": "theirs"},
                                          "metadata": {"name": "llama-pretrain-config", "namespace": NS}})
    with cluster.operator():
        cluster.create_run("llama")
        degraded = _conflict(cluster)
        assert degraded["status"] == "True" and "llama-pretrain-config" in degraded["message"]
        assert "no ownerReference" in degraded["message"]
        (event,) = wait(lambda: cluster.events("llama", "ChildConflict"), what="ChildConflict event")
        assert event["type"] == "Warning"
        # Nothing past the conflict, the object as it was.
        assert cluster.job("llama-pretrain") is None
        live = cluster.get(CONFIGMAPS, "llama-pretrain-config")
        assert live["data"] == {"config.yaml": "theirs"} and not live["metadata"].get("ownerReferences")
        assert live["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
        assert _writes(cluster, "configmaps", "llama-pretrain-config") == []
        assert cluster.status("llama")["phase"] == "Pending"
        # The owner frees the name: the run goes on, with a child of its own.
        code, _ = cluster.request("DELETE", f"/api/v1/namespaces/{NS}/configmaps/llama-pretrain-config")
        assert code == 200
        wait(lambda: cluster.job("llama-pretrain"), timeout=15, what="the job once the name is free")
        cm = cluster.get(CONFIGMAPS, "llama-pretrain-config")
        assert cm["metadata"]["ownerReferences"][0]["uid"] == cluster.run("llama")["metadata"]["uid"]
        wait(lambda: cluster.condition("llama", "Degraded").get("status") == "False", what="recovery")


def test_a_child_owned_by_someone_else_is_not_taken(cluster):
    other = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun", "name": "other", "uid": "not-ours",
             "controller": True}
    cluster.create(JOBS, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                          "metadata": {"name": "llama-pretrain", "namespace": NS, "ownerReferences": [other],
                                       "labels": {render.LABEL_RUN: "llama"}},
                          "spec": {"pytorchReplicaSpecs": {}}})
    with cluster.operator():
        cluster.create_run("llama")
        degraded = _conflict(cluster)
        assert "VLMPretrainRun/other" in degraded["message"]
        job = cluster.job("llama-pretrain")
        assert job["metadata"]["ownerReferences"] == [other] and job["spec"] == {"pytorchReplicaSpecs": {}}
        assert _writes(cluster, "pytorchjobs", "llama-pretrain") == []


def test_day2_changes_never_patch_an_unowned_configmap(cluster):
    with cluster.operator():
        cluster.create_run("llama")
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        cluster.set_job("llama-pretrain", "Running")
        cluster.wait_phase("llama", "Running")
        # Someone replaces the stage's ConfigMap with their own.
        cluster.request("DELETE", f"/api/v1/namespaces/{NS}/configmaps/llama-pretrain-config")
        cluster.create(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "data": {"config.yaml": "theirs"},
                                    "metadata": {"name": "llama-pretrain-config", "namespace": NS}})
        cluster.patch_spec("llama", {"checkpoint": {"keep": 9}})
        _conflict(cluster)
        assert cluster.get(CONFIGMAPS, "llama-pretrain-config")["data"] == {"config.yaml": "theirs"}
        assert _writes(cluster, "configmaps", "llama-pretrain-config", ("patch", "update")) == []


def test_an_ended_attempts_store_is_removed_only_where_it_is_ours(cluster):
    body = spec()
    body["elastic"] = {"externalStore": True}
    with cluster.operator():
        cluster.create_run("llama", body)
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        store = render.store_name("llama", "pretrain", 0)
        wait(lambda: cluster.get(SERVICES, store), what="store service")
        # The attempt's Service is replaced by someone else's under the same name.
        cluster.request("DELETE", f"/api/v1/namespaces/{NS}/services/{store}")
        theirs = cluster.create(SERVICES, {"apiVersion": "v1", "kind": "Service",
                                           "metadata": {"name": store, "namespace": NS},
                                           "spec": {"ports": [{"port": 80}]}})
        cluster.set_job("llama-pretrain", "Failed", "PyTorchJobFailed", "exit 1")
        wait(lambda: cluster.job("llama-pretrain-r1"), what="retry")
        for resource in ("apps/v1/deployments", "policy/v1/poddisruptionbudgets"):
            wait(lambda: cluster.get(resource, store) is None, what=f"the ended attempt's {resource} removed")
        assert cluster.get(SERVICES, store)["metadata"]["uid"] == theirs["metadata"]["uid"]
        assert len(_writes(cluster, "services", store, ("delete",))) == 1  # the test's own, above


def _foreign_metrics(port: int, ip: str):
    """A pod's metrics endpoint claiming far more progress and its own checkpoint."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

    reg = CollectorRegistry()
    Counter("vlmtrain_steps", "", registry=reg).inc(999)
    Gauge("vlmtrain_checkpoint_last_step", "", registry=reg).set(999)
    Gauge("vlmtrain_checkpoint_last_success_timestamp_seconds", "", registry=reg).set(1_700_000_000)
    Gauge("vlmtrain_checkpoint_last_info", "", ["uri"], registry=reg).labels(uri="s3://attacker/planted/").set(1)
    server, _ = start_http_server(port, addr=ip, registry=reg)
    return server


def test_the_scraper_reads_only_pods_the_job_owns(cluster):
    trainer = TrainerMetrics()
    foreign = _foreign_metrics(trainer.port, "127.0.0.3")
    try:
        with cluster.operator():
            cluster.create_run("llama", spec(metrics={"port": trainer.port, "podMonitor": True}))
            wait(lambda: cluster.job("llama-pretrain"), what="job")
            # The run's labels, listed (and sorted) first, but not the job's pod.
            cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=0, ip="127.0.0.3", owned=False,
                            name="aaa-lookalike")
            cluster.set_job("llama-pretrain", "Running")
            msg = wait(lambda: "no pod owned by llama-pretrain" in cluster.condition("llama", "Progressing").get("message", "")
                       and cluster.condition("llama", "Progressing")["message"], what="the lookalike passed over")
            assert "step" not in cluster.status("llama") and "lastCheckpoint" not in cluster.status("llama"), msg
            # The job's own pod: its numbers, never the lookalike's.
            cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=0, ip="127.0.0.1")
            trainer.train(steps=5, text=900, image=100, loss=3.0)
            trainer.commit(4, "s3://ckpt/runs/test/pretrain/step-000000004/", 1_700_000_000)
            status = wait(lambda: cluster.status("llama").get("step") == 5 and cluster.status("llama"), what="scrape")
            assert status["lastCheckpoint"]["uri"] == "s3://ckpt/runs/test/pretrain/step-000000004/"
            assert all(cluster.status("llama").get("step") != 999 for _ in range(20))
    finally:
        foreign.shutdown()
        foreign.server_close()
        trainer.close()

"""Day-2 changes against the real operator: rescale in place, suspend/resume, config
updates, and immutable fields when no CRD admission guards them."""

from __future__ import annotations

import pytest
import yaml

from tests.support.operator_harness import JOBS, Cluster, spec, wait


# kubernetes-client 36 on urllib3 1.26 (pinned by torchx), on every error response: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")


def running(cluster: Cluster, name: str = "llama") -> dict:
    cluster.create_run(name)
    wait(lambda: cluster.job(f"{name}-pretrain"), what="job")
    cluster.set_job(f"{name}-pretrain", "Running")
    cluster.wait_phase(name, "Running")
    return cluster.job(f"{name}-pretrain")


def test_rescale_patches_the_live_job_in_place(cluster):
    with cluster.operator():
        before = running(cluster)
        assert before["spec"]["elasticPolicy"]["minReplicas"] == 1 and before["spec"]["elasticPolicy"]["maxReplicas"] == 2
        cluster.patch_spec("llama", {"resources": {"nodes": {"min": 2, "max": 4}}})
        job = wait(lambda: cluster.job("llama-pretrain")["spec"]["elasticPolicy"]["maxReplicas"] == 4
                   and cluster.job("llama-pretrain"), what="rescaled job")
        status = wait(lambda: cluster.status("llama").get("observedGeneration") == 2 and cluster.status("llama"))
        cluster.wait_events("llama", "Rescaled")
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 2
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert job["metadata"]["uid"] == before["metadata"]["uid"]  # the same job: no restart from scratch
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"] == before["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    assert cluster.names(JOBS) == ["llama-pretrain"]
    assert status["phase"] == "Running"
    assert "nodes" not in status  # the Nodes column shows the rendezvous (from metrics), not the request
    assert all(c["observedGeneration"] == 2 for c in status["conditions"])
    (event,) = cluster.events("llama", "Rescaled")
    assert "2..4" in event["message"]
    config = yaml.safe_load(cluster.get("v1/configmaps", "llama-pretrain-config")["data"]["config.yaml"])
    assert config["spec"]["resources"]["nodes"] == {"min": 2, "max": 4}


def test_suspend_and_resume(cluster):
    with cluster.operator():
        before = running(cluster)
        cluster.patch_spec("llama", {"suspend": True})
        wait(lambda: cluster.job("llama-pretrain")["spec"]["runPolicy"]["suspend"] is True, what="job suspended")
        cluster.wait_phase("llama", "Suspended")
        assert cluster.condition("llama", "Ready")["reason"] == "Suspended"
        cluster.set_job("llama-pretrain", "Suspended", "PyTorchJobSuspended")  # the controller deletes the pods
        assert cluster.status("llama")["phase"] == "Suspended"

        cluster.patch_spec("llama", {"suspend": False})
        wait(lambda: cluster.job("llama-pretrain")["spec"]["runPolicy"]["suspend"] is False, what="job resumed")
        resuming = cluster.wait_phase("llama", "Pending")
        assert cluster.condition("llama", "Ready")["reason"] == "Resuming"
        cluster.set_job("llama-pretrain", "Running", "PyTorchJobResumed")
        cluster.wait_phase("llama", "Running")
        cluster.wait_events("llama", "Suspended", "Resumed")
    assert cluster.job("llama-pretrain")["metadata"]["uid"] == before["metadata"]["uid"]
    assert cluster.names(JOBS) == ["llama-pretrain"]
    assert [e["reason"] for e in cluster.events("llama") if e["reason"] in ("Suspended", "Resumed")] == ["Suspended", "Resumed"]
    assert resuming["stage"] == "pretrain"


def test_suspended_at_creation(cluster):
    with cluster.operator():
        cluster.create_run("paused", spec(suspend=True))
        cluster.wait_phase("paused", "Suspended")
    assert cluster.job("paused-pretrain")["spec"]["runPolicy"]["suspend"] is True


def test_checkpoint_keep_flows_to_the_trainer_config(cluster):
    with cluster.operator():
        job = running(cluster)
        cluster.patch_spec("llama", {"checkpoint": {"keep": 7}})
        cm = wait(lambda: "keep: 7" in cluster.get("v1/configmaps", "llama-pretrain-config")["data"]["config.yaml"]
                  and cluster.get("v1/configmaps", "llama-pretrain-config"), what="config update")
        wait(lambda: cluster.events("llama", "ConfigUpdated"), what="event")
    assert yaml.safe_load(cm["data"]["config.yaml"])["spec"]["checkpoint"]["keep"] == 7
    assert cluster.job("llama-pretrain")["metadata"]["uid"] == job["metadata"]["uid"]
    assert cluster.status("llama")["phase"] == "Running"


def test_immutable_fields_changed_without_admission_mark_the_run_invalid(cluster):
    with cluster.operator():
        running(cluster)
        stages = spec()["stages"]
        stages[0]["steps"] = 500  # a changed recipe is a new run (the CRD's CEL would reject this edit)
        cluster.patch_spec("llama", {"stages": stages})
        cluster.wait_phase("llama", "Invalid")
        ready = cluster.condition("llama", "Ready")
        assert ready["reason"] == "InvalidSpec" and "spec.stages: is immutable" in ready["message"]
        wait(lambda: cluster.events("llama", "InvalidSpec"), what="event")
        # Reverting the edit brings the run back; nothing was restarted meanwhile.
        cluster.patch_spec("llama", {"stages": spec()["stages"]})
        cluster.wait_phase("llama", "Running")
    assert cluster.names(JOBS) == ["llama-pretrain"]

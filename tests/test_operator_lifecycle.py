"""The real operator (kopf) over HTTP against the emulator: create, pipeline, retries, invalid specs.

The test plays the user (creates and edits runs) and the Kubeflow training operator
(writes PyTorchJob /status conditions); the operator runs as in production
(`kopf run -m vlm_operator.handlers -A --standalone`, logging in through a kubeconfig).
"""

from __future__ import annotations

import time

import pytest
import yaml

from tests.support.operator_harness import JOBS, PODMONITORS, Cluster, TrainerMetrics, crd_errors, spec, wait
from tests.support.schemas import core_errors
from vlm_api import stage_policy
from vlm_operator import kube as operator_kube


# kubernetes-client 36 on urllib3 1.26 (pinned by torchx), on every error response: harmless.
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")


def sent(cluster: Cluster, method: str = "POST"):
    """(resource, body) of every request the operator's own client sent."""
    for r in list(cluster.kube.emulator._requests):
        agent = next((v for k, v in r.headers.items() if k.lower() == "user-agent"), "")
        if r.method.value.upper() == method and agent.startswith(operator_kube.USER_AGENT.split("/")[0]):
            yield r, r.data


def children(cluster: Cluster) -> dict[str, list[str]]:
    return {
        "configmaps": cluster.names("v1/configmaps"),
        "pytorchjobs": cluster.names(JOBS),
        "podmonitors": cluster.names(PODMONITORS),
    }


def test_create_makes_owned_children_that_pass_real_schemas(cluster):
    with cluster.operator():
        run = cluster.create_run("llama")
        wait(lambda: cluster.status("llama").get("jobName"), what="status")
        cluster.wait_events("llama", "StageStarted")
        assert children(cluster) == {"configmaps": ["llama-pretrain-config"], "pytorchjobs": ["llama-pretrain"],
                                     "podmonitors": ["llama"]}
    uid = run["metadata"]["uid"]
    assert uid
    for resource, name in (("v1/configmaps", "llama-pretrain-config"), (JOBS, "llama-pretrain"), (PODMONITORS, "llama")):
        obj = cluster.get(resource, name)
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun", "name": "llama", "uid": uid,
            "controller": True, "blockOwnerDeletion": True}]
        labels = obj["metadata"]["labels"]
        assert labels["pretrain.vlm.dev/run"] == "llama" and labels["team"] == "vision"  # kopf.adopt copies the run's labels
    assert cluster.get(PODMONITORS, "llama")["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    # Every object the operator sent validates against the real schemas.
    kinds = set()
    for _, body in sent(cluster):
        kinds.add(body["kind"])
        if body["kind"] in ("PyTorchJob", "PodMonitor"):
            assert crd_errors(body) == [], body["kind"]
        else:
            assert core_errors(body) == [], body["kind"]
    assert {"ConfigMap", "Deployment", "Service", "PyTorchJob", "PodMonitor", "Event"} <= kinds

    job = cluster.job("llama-pretrain")
    assert job["spec"]["elasticPolicy"]["rdzvId"] == stage_policy.rdzv_id(uid, "pretrain", 0)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    config = yaml.safe_load(cluster.get("v1/configmaps", "llama-pretrain-config")["data"]["config.yaml"])
    assert config["stage"] == "pretrain" and config["run"]["uid"] == uid and "initFrom" not in config
    text = cluster.get("v1/configmaps", "llama-pretrain-config")["data"]["config.yaml"]
    assert "AWS_SECRET_ACCESS_KEY" not in text

    status = cluster.status("llama")
    assert status["phase"] == "Pending" and status["stage"] == "pretrain" and status["attempt"] == 0
    assert {c["type"]: c["observedGeneration"] for c in status["conditions"]} == {
        "Ready": 1, "Progressing": 1, "Degraded": 1, "RendezvousReady": 1}
    assert status["observedGeneration"] == 1
    assert [e["reason"] for e in cluster.events("llama")] == ["StageStarted"]
    # No finalizer; status only through /status; spec never written.
    assert not cluster.run("llama")["metadata"].get("finalizers")
    for r, body in sent(cluster, "PATCH"):
        if r.resource.plural == "vlmpretrainruns":
            assert r.subresource == "status" and set(body) == {"status"}
    for r in list(cluster.kube.emulator._requests):
        if r.resource is not None and r.resource.plural == "vlmpretrainruns" and r.subresource is None and r.method.value.upper() == "PATCH":
            assert "spec" not in (r.data if isinstance(r.data, dict) else {}) and "status" not in (r.data if isinstance(r.data, dict) else {})


def test_stage_pipeline_runs_to_success(cluster):
    with cluster.operator():
        cluster.create_run("llama")
        wait(lambda: cluster.job("llama-pretrain"), what="first job")
        cluster.set_job("llama-pretrain", "Running")
        running = cluster.wait_phase("llama", "Running")
        assert cluster.condition("llama", "Ready")["status"] == "True"
        assert running["stage"] == "pretrain"

        cluster.set_job("llama-pretrain", "Succeeded")
        wait(lambda: cluster.job("llama-sft"), what="the next stage's job")
        status = wait(lambda: cluster.status("llama").get("stage") == "sft" and cluster.status("llama"))
        assert status["stageIndex"] == 1 and status["attempt"] == 0 and status["jobName"] == "llama-sft"
        confirmed = "s3://ckpt/runs/test/pretrain/step-000000100/"  # what the trainer's pod confirmed
        assert status["finalCheckpoints"]["pretrain"]["uri"] == confirmed
        assert status["finalCheckpoints"]["pretrain"]["step"] == 100
        sft = yaml.safe_load(cluster.get("v1/configmaps", "llama-sft-config")["data"]["config.yaml"])
        assert sft["stage"] == "sft" and sft["initFrom"] == confirmed
        assert cluster.job("llama-sft")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0] == {
            "name": "config", "configMap": {"name": "llama-sft-config"}}

        cluster.set_job("llama-sft", "Running")
        cluster.wait_phase("llama", "Running")
        cluster.set_job("llama-sft", "Succeeded")
        done = cluster.wait_phase("llama", "Succeeded")
        cluster.wait_events("llama", "RunSucceeded")
    assert done["completionTime"] and done["startTime"] <= done["completionTime"]
    assert set(done["finalCheckpoints"]) == {"pretrain", "sft"}
    ready = cluster.condition("llama", "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Succeeded"
    assert cluster.condition("llama", "Progressing")["status"] == "False"
    assert cluster.names(JOBS) == ["llama-pretrain", "llama-sft"]
    assert [e["reason"] for e in cluster.events("llama")] == [
        "StageStarted", "StageSucceeded", "StageStarted", "StageSucceeded", "RunSucceeded"]


def test_a_pruning_stage_is_followed_by_its_own_pruning_job(cluster):
    """`stage.prune`: after the stage, a one-worker job `<run>-<stage>-pruned` prunes the
    stage's confirmed final checkpoint; the next stage starts from the pruned checkpoint
    that job confirmed, and status names the step while it runs."""
    body = spec()
    body["stages"][0]["prune"] = {"removeLayers": 1, "calibration": {"source": "caps", "samples": 16}}
    with cluster.operator():
        cluster.create_run("llama", body)
        wait(lambda: cluster.job("llama-pretrain"), what="first job")
        cluster.set_job("llama-pretrain", "Succeeded")
        job = wait(lambda: cluster.job("llama-pretrain-pruned"), what="the pruning step's job")
        assert cluster.job("llama-sft") is None  # not before the pruned checkpoint is confirmed
        trained = "s3://ckpt/runs/test/pretrain/step-000000100/"
        worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
        container = worker["template"]["spec"]["containers"][0]
        assert worker["replicas"] == 1 and "elasticPolicy" not in job["spec"] and not crd_errors(job)
        assert container["command"] == ["python"] and container["args"] == [
            "-m", "vlm_trainer.visual_region.prune", "--config", "/etc/vlm/config.yaml", "--checkpoint", trained]
        config = yaml.safe_load(cluster.get("v1/configmaps", "llama-pretrain-pruned-config")["data"]["config.yaml"])
        assert config["stage"] == "pretrain"  # the TrainerConfig of the stage it prunes
        status = wait(lambda: cluster.status("llama").get("stage") == "pretrain-pruned" and cluster.status("llama"))
        assert status["stageIndex"] == 0 and status["jobName"] == "llama-pretrain-pruned"

        cluster.set_job("llama-pretrain-pruned", "Running")
        assert cluster.wait_phase("llama", "Running")["stage"] == "pretrain-pruned"
        cluster.set_job("llama-pretrain-pruned", "Succeeded")  # its pod confirms `pretrain-pruned`
        wait(lambda: cluster.job("llama-sft"), what="the next stage's job")
        status = wait(lambda: cluster.status("llama").get("stage") == "sft" and cluster.status("llama"))
        pruned = "s3://ckpt/runs/test/pretrain-pruned/step-000000100/"
        assert status["stageIndex"] == 1 and status["finalCheckpoints"]["pretrain-pruned"]["uri"] == pruned
        sft = yaml.safe_load(cluster.get("v1/configmaps", "llama-sft-config")["data"]["config.yaml"])
        assert sft["initFrom"] == pruned

        cluster.set_job("llama-sft", "Succeeded")
        done = cluster.wait_phase("llama", "Succeeded")
    assert set(done["finalCheckpoints"]) == {"pretrain", "pretrain-pruned", "sft"}
    assert cluster.names(JOBS) == ["llama-pretrain", "llama-pretrain-pruned", "llama-sft"]
    assert [e["reason"] for e in cluster.events("llama")] == [
        "StageStarted", "StageSucceeded", "StageStarted", "StageSucceeded", "StageStarted", "StageSucceeded",
        "RunSucceeded"]


def test_failed_job_is_retried_from_the_last_checkpoint_then_the_run_fails(cluster):
    metrics = TrainerMetrics()
    try:
        with cluster.operator(VLM_OPERATOR_RETRY_BACKOFF="0.3", VLM_OPERATOR_RETRY_BACKOFF_MAX="5"):
            cluster.create_run("llama", spec(maxRetries=2, metrics={"port": metrics.port, "podMonitor": False}))
            wait(lambda: cluster.job("llama-pretrain"), what="first job")
            cluster.add_pod("llama-pretrain", "llama", "pretrain", 0)
            cluster.set_job("llama-pretrain", "Running")
            metrics.train(steps=60, text=900, image=100, loss=3.1)
            metrics.commit(50, "s3://ckpt/runs/test/pretrain/step-00000050/", time.time())
            wait(lambda: (cluster.status("llama").get("lastCheckpoint") or {}).get("step") == 50, what="checkpoint in status")

            failed_at = time.monotonic()
            cluster.set_job("llama-pretrain", "Failed", "Error", "worker-1 exited with code 137")
            backoff = wait(lambda: cluster.condition("llama", "Progressing").get("reason") == "RetryBackoff"
                           and cluster.status("llama"), what="backoff")
            assert backoff["phase"] == "Pending" and cluster.condition("llama", "Degraded")["reason"] == "JobFailed"
            wait(lambda: cluster.job("llama-pretrain-r1"), what="retry 1")
            assert time.monotonic() - failed_at >= 0.3  # the backoff was honoured
            status = wait(lambda: cluster.status("llama").get("attempt") == 1 and cluster.status("llama"), what="attempt 1")
            assert status["jobName"] == "llama-pretrain-r1"
            (retry,) = [e for e in cluster.wait_events("llama", "StageRetry") if e["reason"] == "StageRetry"]
            assert "s3://ckpt/runs/test/pretrain/step-00000050/" in retry["message"] and retry["type"] == "Warning"
            # A retry is the same stage config: the trainer resumes from its newest committed checkpoint.
            r1 = cluster.job("llama-pretrain-r1")
            assert r1["metadata"]["labels"]["pretrain.vlm.dev/attempt"] == "1"
            assert r1["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == "llama-pretrain-config"

            failed_at = time.monotonic()
            cluster.set_job("llama-pretrain-r1", "Failed", "Error", "NCCL timeout")
            wait(lambda: cluster.job("llama-pretrain-r2"), what="retry 2")
            assert time.monotonic() - failed_at >= 0.6  # doubled
            cluster.set_job("llama-pretrain-r2", "Failed", "Error", "NCCL timeout again")
            failed = cluster.wait_phase("llama", "Failed")
            cluster.wait_events("llama", "RunFailed")
            time.sleep(0.3)  # a would-be third retry (backoff 1.2 s) is not due yet; nothing else may happen
    finally:
        metrics.close()
    assert failed["attempt"] == 2 and "completionTime" not in failed
    ready = cluster.condition("llama", "Ready")
    assert ready["reason"] == "RetriesExhausted" and "NCCL timeout again" in ready["message"]
    assert cluster.names(JOBS) == ["llama-pretrain", "llama-pretrain-r1", "llama-pretrain-r2"]
    assert cluster.names("v1/configmaps") == ["llama-pretrain-config"]
    assert len(cluster.events("llama", "RunFailed")) == 1


def test_invalid_run_is_marked_with_an_event_and_gets_no_child(cluster):
    bad = spec()
    bad["stages"][0]["mixture"] = {"text": 0.5, "caps": 0.2}
    with cluster.operator():
        cluster.create_run("broken", bad)
        status = cluster.wait_phase("broken", "Invalid")
        ready = cluster.condition("broken", "Ready")
        assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
        assert "spec.stages[0].mixture" in ready["message"] and "sum to 1" in ready["message"]
        (event,) = wait(lambda: cluster.events("broken", "InvalidSpec"), what="the Warning event")
        assert event["type"] == "Warning" and "spec.stages[0].mixture" in event["message"]
        time.sleep(0.5)  # PermanentError: no retry storm
        writes = [r for r in cluster.kube.request_log if r.name == "broken" and r.verb == "patch" and r.subresource == "status"]
        assert len(writes) == 1
        assert children(cluster) == {"configmaps": [], "pytorchjobs": [], "podmonitors": []}

        # Fixing the spec (what a user does after reading the event) starts the run.
        cluster.patch_spec("broken", {"stages": spec()["stages"]})
        wait(lambda: cluster.job("broken-pretrain"), what="children after the fix")
        fixed = cluster.wait_phase("broken", "Pending")
    assert fixed["observedGeneration"] == 2
    assert cluster.condition("broken", "Degraded")["status"] == "False"
    assert status["observedGeneration"] == 1

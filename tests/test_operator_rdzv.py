"""The rendezvous store per attempt with the real operator against the emulator:
with ``spec.elastic.externalStore`` the operator creates the store Deployment + Service
(owned by the run, valid against the Kubernetes schemas), the PyTorchJob rendezvouses
through the Service with ``is_host=false``, and ``RendezvousReady`` follows the
Deployment's ``status.readyReplicas`` (written here as the kubelet / deployment controller
would). Every attempt has its own store (and rendezvous id); the operator removes a store
when its attempt or stage ends, and every store when the run ends."""

from __future__ import annotations

import pytest

from tests.support.operator_harness import JOBS, crd_errors, spec, wait
from tests.support.schemas import core_errors
from vlm_api import launch, render
from vlm_operator.registry import REGISTRY

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")


def _elastic_spec() -> dict:
    body = spec()
    body["elastic"] = {**(body.get("elastic") or {}), "externalStore": True}
    return body


def test_store_deployment_and_service_per_stage(cluster):
    with cluster.operator():
        run = cluster.create_run("llama", _elastic_spec())
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        store = render.store_name("llama", "pretrain")
        dep = wait(lambda: cluster.get("apps/v1/deployments", store), what="store deployment")
        svc = cluster.get("v1/services", store)
        assert svc is not None
        uid = run["metadata"]["uid"]
        for obj in (dep, svc):
            assert obj["metadata"]["ownerReferences"] == [{
                "apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun", "name": "llama", "uid": uid,
                "controller": True, "blockOwnerDeletion": True}]
            assert obj["metadata"]["labels"]["pretrain.vlm.dev/stage"] == "pretrain"
            body = {k: v for k, v in obj.items() if k != "status"}
            body["metadata"] = {k: v for k, v in obj["metadata"].items()
                                if k in ("name", "namespace", "labels", "annotations", "ownerReferences")}
            assert core_errors(body) == [], obj["kind"]
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["vlmpretrain", "rendezvous-store"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["securityContext"]["runAsNonRoot"] is True
        assert dep["spec"]["replicas"] == 1
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

        job = cluster.job("llama-pretrain")
        assert crd_errors({k: v for k, v in job.items() if k != "status"}) == []
        pol = job["spec"]["elasticPolicy"]
        assert pol["rdzvHost"] == store and pol["rdzvPort"] == launch.DEFAULT_RDZV_PORT
        conf = {c["key"]: c["value"] for c in pol.get("rdzvConf") or []}
        assert conf.get("is_host") == "false"

        # RendezvousReady follows the Deployment's readyReplicas, read from the watch (the
        # informer cache), never by GET; the store's first event (no ready replica) is what
        # the status already says, so it costs no status write.
        cond = wait(lambda: next((c for c in cluster.status("llama").get("conditions", [])
                                  if c["type"] == "RendezvousReady"), None), what="RendezvousReady")
        assert cond["status"] == "False" and cond["reason"] == "StoreNotReady"
        wait(lambda: ("ns1", store) in REGISTRY.stores, what="the store's watch event")
        status_writes = [r for r in cluster.kube.request_log if r.resource == "vlmpretrainruns" and r.subresource == "status"]
        cluster.merge("apps/v1/deployments", store, {"status": {"replicas": 1, "readyReplicas": 1}}, sub="status")
        wait(lambda: cluster.condition("llama", "RendezvousReady").get("status") == "True",
             what="RendezvousReady=True")
        assert cluster.condition("llama", "RendezvousReady")["reason"] == "StoreReady"
        assert len(status_writes) == 1  # the create's: the store's ADDED echo changed nothing
        assert not [r for r in cluster.kube.request_log if r.resource == "deployments" and r.verb == "get"]
        # only our stores come down the Deployment watch (server-side selector)
        reads = [r for r in list(cluster.kube.emulator._requests) if r.resource is not None
                 and r.resource.plural == "deployments" and r.method.value.upper() == "GET" and not r.name]
        assert reads and all("app.kubernetes.io/component=rendezvous-store" in r.params.get("labelSelector", "")
                             for r in reads)
        cluster.merge("apps/v1/deployments", store, {"status": {"readyReplicas": 0}}, sub="status")
        wait(lambda: cluster.condition("llama", "RendezvousReady").get("status") == "False",
             what="RendezvousReady=False")

        # The next stage gets its own store; the finished stage's store, Service and PDB go.
        assert cluster.get("policy/v1/poddisruptionbudgets", store) is not None
        cluster.set_job("llama-pretrain", "Succeeded")
        wait(lambda: cluster.job("llama-sft"), what="next stage job")
        sft_store = render.store_name("llama", "sft")
        wait(lambda: cluster.get("apps/v1/deployments", sft_store), what="sft store")
        assert cluster.get("v1/services", sft_store)["metadata"]["ownerReferences"][0]["uid"] == uid
        assert cluster.job("llama-sft")["spec"]["elasticPolicy"]["rdzvHost"] == sft_store
        for resource in ("apps/v1/deployments", "v1/services", "policy/v1/poddisruptionbudgets"):
            wait(lambda: cluster.get(resource, store) is None, what=f"the finished stage's {resource} removed")

        # A failed attempt's store goes once its retry (with a store and rendezvous id of its own) exists.
        cluster.set_job("llama-sft", "Failed", "PyTorchJobFailed", "torchrun's restarts are spent")
        retry = wait(lambda: cluster.job("llama-sft-r1"), what="retry job")
        retry_store = render.store_name("llama", "sft", 1)
        assert retry["spec"]["elasticPolicy"]["rdzvHost"] == retry_store != sft_store
        assert retry["spec"]["elasticPolicy"]["rdzvId"] != cluster.job("llama-sft")["spec"]["elasticPolicy"]["rdzvId"]
        assert cluster.get("apps/v1/deployments", retry_store) is not None
        wait(lambda: cluster.get("apps/v1/deployments", sft_store) is None, what="the failed attempt's store removed")

        # The run ends: no store is left running.
        cluster.set_job("llama-sft-r1", "Succeeded")
        cluster.wait_phase("llama", "Succeeded")
        wait(lambda: cluster.names("apps/v1/deployments") == [], what="every store removed")
        assert cluster.names("v1/services") == [] and cluster.names("policy/v1/poddisruptionbudgets") == []


def test_no_store_without_external_store(cluster):
    body = spec()
    body["elastic"] = {**(body.get("elastic") or {}), "externalStore": False}
    with cluster.operator():
        cluster.create_run("llama", body)
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        assert cluster.names("apps/v1/deployments") == [] and cluster.names("v1/services") == []
        assert "rdzvHost" not in cluster.job("llama-pretrain")["spec"]["elasticPolicy"]
        status = wait(lambda: cluster.status("llama").get("phase") == "Pending" and cluster.status("llama"), what="status")
        assert "RendezvousReady" not in {c["type"] for c in status["conditions"]}

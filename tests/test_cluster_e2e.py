"""A run end to end on the faithful cluster (tests/support/faithful_cluster.py): `kubectl`
as the client, the real `vlmpretrain operator` process, the Kubeflow v1.9 PyTorchJob rules
(tests/support/kubeflow_controller.py), a kubelet that runs every pod's rendered command
(torchrun + the trainer, the rendezvous store) as real processes in their own network
namespaces, and checkpoints on moto's S3 server.

1. Two stages survive an agent container killed (the controller replaces the pod: exit 137
   is retryable under `restartPolicy: ExitCode`), a lost node (pod deleted) and an operator
   restart mid-pipeline; the run ends Succeeded, stage 2 starts from stage 1's final
   checkpoint as the trainer confirmed it, and no committed checkpoint is lost (every
   recovery resumes at or after the newest checkpoint committed before the fault).
2. An attempt whose torchrun restarts are spent (a worker killed with `maxRestarts: 0`: the
   agent exits 1, permanent, the job fails) is retried by the operator as a new attempt with
   its own rendezvous, which trains on from the newest committed checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from tests.support.faithful_cluster import FaithfulCluster
from tests.support.operator_harness import FAST_ENV
from tests.support.s3 import free_port
from vlm_api import render

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-local.yaml"
RUNS = "pretrain.vlm.dev/v1alpha1/vlmpretrainruns"
PODS = "v1/pods"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
PRETRAIN_STEPS = 80  # long enough that both faults land inside stage 1 on a 2-core machine


@pytest.fixture
def cluster(tmp_path):
    with FaithfulCluster(tmp_path / "cluster") as c:
        yield c


@pytest.fixture
def s3(cluster, tmp_path, monkeypatch):
    """moto's S3 server where the pods reach it (the bridge's address), with the tiny data."""
    import boto3
    from moto.server import ThreadedMotoServer

    from vlm_trainer.data import synthdata

    for key, value in {**CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address=cluster.host_ip, port=port, verbose=False)
    server.start()
    endpoint = f"http://{cluster.host_ip}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint)
    for bucket in ("tiny-data", "ckpt"):
        client.create_bucket(Bucket=bucket)
    data = tmp_path / "tiny-data"
    synthdata.generate(data, samples_per_shard=64, image_size=32,
                       shards={"text": 1, "captions": 2, "instruct": 1, "text-instruct": 1})
    for path in data.rglob("*.tar"):
        client.upload_file(str(path), "tiny-data", str(path.relative_to(data)))
    yield endpoint
    server.stop()


def _manifest(name: str, endpoint: str, *, steps: tuple[int, ...], nodes: dict, elastic: dict,
              max_retries: int = 2) -> dict:
    """tests/data/tiny-local.yaml as a cluster recipe: data and checkpoints on S3."""
    doc = yaml.safe_load(TINY.read_text())
    doc["metadata"] = {"name": name, "namespace": "default"}
    spec = doc["spec"]
    spec["image"] = "ghcr.io/acme/vlm-trainer:test"  # the kubelet runs the rendered command from this checkout
    for src in spec["data"]["sources"]:
        for key in ("uri", "validationUri"):
            if key in src:
                src[key] = src[key].replace("./tiny-data/", "s3://tiny-data/")
    spec["stages"] = spec["stages"][: len(steps)]
    for st, n in zip(spec["stages"], steps):
        st.update(steps=n, globalBatchTokens=256, microBatchSize=4)
    spec["stages"][0]["optimizer"]["warmupSteps"] = 2
    spec["resources"] = {"nodes": nodes, "gpusPerNode": 0}
    spec["elastic"] = {"processGroupTimeout": 20, "externalStore": True, "shutdownTimeout": 20, **elastic}
    spec["checkpoint"] = {"uri": f"s3://ckpt/runs/{name}/", "endpoint": endpoint, "interval": 2, "keep": 100,
                          "credentialsSecret": "s3-credentials"}
    spec["metrics"] = {"port": 9400, "podMonitor": False}
    spec["maxRetries"] = max_retries
    return doc


class Operator:
    """`vlmpretrain operator` as a process of its own (restartable), logging to a file."""

    def __init__(self, cluster: FaithfulCluster, log: Path):
        self.cluster, self.log, self.proc = cluster, log, None
        self.env = {**os.environ, **FAST_ENV, "KUBECONFIG": str(cluster.kubeconfig),
                    "VLM_OPERATOR_SCRAPE_INTERVAL": "0.5", "VLM_OPERATOR_RETRY_BACKOFF": "1"}

    def start(self) -> None:
        fh = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "vlm_api.cli", "operator", "-A", "--log-format", "plain"],
                                     env=self.env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        fh.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def operator(cluster, tmp_path):
    op = Operator(cluster, tmp_path / "operator.log")
    yield op
    op.stop()


def _apply(cluster: FaithfulCluster, doc: dict, tmp_path: Path) -> None:
    cluster.kubectl("apply", "--validate=false", "-f", str(REPO / "crds" / "pretrain.vlm.dev_vlmpretrainruns.yaml"))
    secret = cluster.kubectl("create", "secret", "generic", "s3-credentials", "--dry-run=client", "-o", "yaml",
                             *[f"--from-literal={k}={v}" for k, v in CREDENTIALS.items()]).stdout
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=secret)
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    cluster.kubectl("apply", "--validate=false", "-f", str(path))


def _status(cluster: FaithfulCluster, name: str) -> dict:
    return (cluster.get(RUNS, name) or {}).get("status") or {}


def _committed(endpoint: str, name: str, stage: str) -> list[int]:
    from vlm_trainer.checkpoint import open_store

    return sorted(ref.step for ref in open_store(f"s3://ckpt/runs/{name}/", endpoint_url=endpoint).committed(stage))


def _resumed_steps(cluster: FaithfulCluster, job: str) -> list[int]:
    """Steps every restore of the job's pods resumed from ('resume from URI (step N, ...')."""
    steps = []
    for pod in cluster.list(PODS, **{"training.kubeflow.org/job-name": job}):
        for previous in (False, True):
            try:
                text = cluster.logs(pod["metadata"]["name"], previous=previous)
            except Exception:  # noqa: BLE001 - no previous container
                continue
            steps += [int(m) for m in re.findall(r"resume from \S+ \(step (\d+),", text)]
    return steps


def _running(cluster: FaithfulCluster, pod: str) -> dict:
    return cluster.wait_pod_phase(pod, "Running", timeout=120)


def _committed_past(cluster: FaithfulCluster, endpoint: str, name: str, step: int) -> int:
    """Wait (at pod and job events) for a committed checkpoint past `step`; its step."""
    def newest() -> int | None:
        steps = _committed(endpoint, name, "pretrain")
        return steps[-1] if steps and steps[-1] > step else None
    return cluster.wait_for(newest, timeout=240, what=f"a checkpoint committed after step {step}")


def _resumed_at_or_after(cluster: FaithfulCluster, job: str, step: int) -> None:
    cluster.wait_for(lambda: any(s >= step for s in _resumed_steps(cluster, job)), timeout=240,
                     what=f"a restore at or after step {step} (committed before the fault)")


def test_two_stages_survive_agent_kill_node_loss_and_operator_restart(cluster, s3, operator, tmp_path):
    name = "e2e"
    doc = _manifest(name, s3, steps=(PRETRAIN_STEPS, 4), nodes={"min": 1, "max": 2}, elastic={})
    _apply(cluster, doc, tmp_path)
    operator.start()
    job = render.job_name(name, "pretrain")
    w0, w1 = f"{job}-worker-0", f"{job}-worker-1"

    # An agent container dies (SIGKILL: exit 137, retryable): the controller replaces the pod.
    first = _running(cluster, w0)
    _running(cluster, w1)
    before = _committed_past(cluster, s3, name, 2)
    cluster.kill_container(w0)
    replaced = cluster.wait_pod_replaced(w0, first["metadata"]["uid"], timeout=60)
    _resumed_at_or_after(cluster, job, before)
    assert cluster.job_condition(job, "Failed") is None

    # The operator restarts mid-pipeline, and while it is away a node is lost.
    operator.stop()
    lost_at = _committed_past(cluster, s3, name, before + 4)
    lost = cluster.snapshot(PODS, w1)
    cluster.lose_node(w1)
    operator.start()
    cluster.wait_pod_replaced(w1, lost["metadata"]["uid"], timeout=60)
    _resumed_at_or_after(cluster, job, lost_at)
    assert lost_at < PRETRAIN_STEPS, "the faults must land inside stage 1"

    done = cluster.wait_for(lambda: _status(cluster, name).get("phase") in ("Succeeded", "Failed")
                            and _status(cluster, name), timeout=420, what="the run to finish")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1) + operator.log.read_text()[-3000:]
    assert replaced["metadata"]["uid"] != first["metadata"]["uid"]

    # Stage 2 started from stage 1's final checkpoint as the trainer confirmed it.
    final = done["finalCheckpoints"]["pretrain"]
    assert final["step"] == PRETRAIN_STEPS and final["uri"].startswith(f"s3://ckpt/runs/{name}/pretrain/step-")
    assert final["tokens"] > 0 and done["finalCheckpoints"]["sft"]["step"] == 4
    sft_config = yaml.safe_load(cluster.get("v1/configmaps", render.config_name(name, "sft"))["data"]["config.yaml"])
    assert sft_config["initFrom"] == final["uri"]
    sft_logs = "".join(cluster.logs(p["metadata"]["name"]) for p in cluster.list(
        PODS, **{"training.kubeflow.org/job-name": render.job_name(name, "sft")}))
    assert f"init from {final['uri']}" in sft_logs
    # No committed checkpoint was lost (keep: 100 keeps them all) or written over by another group.
    from vlm_trainer.checkpoint import open_store

    store = open_store(f"s3://ckpt/runs/{name}/", endpoint_url=s3)
    assert {before, lost_at, PRETRAIN_STEPS} <= set(_committed(s3, name, "pretrain"))
    assert [ref.step for ref in store.committed("pretrain") if store.verify(ref)] == []
    # kubectl shows what happened; no rendezvous store is left running.
    header, row = cluster.kubectl("get", "vlmrun", name).stdout.splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "STAGE", "STEP"], header
    cells = dict(zip(header.split(), row.split()))
    assert (cells["PHASE"], cells["STAGE"], cells["STEP"], cells["CHECKPOINT"]) == ("Succeeded", "sft", "4", "4"), row
    assert float(cells["LOSS"]) > 0
    assert cluster.list("apps/v1/deployments") == []


def test_an_attempt_with_torchrun_s_restarts_spent_is_retried_with_a_fresh_rendezvous(cluster, s3, operator, tmp_path):
    name = "retry"
    doc = _manifest(name, s3, steps=(16,), nodes={"min": 1, "max": 1}, elastic={"maxRestarts": 0})
    _apply(cluster, doc, tmp_path)
    operator.start()
    job = render.job_name(name, "pretrain")
    pod = _running(cluster, f"{job}-worker-0")
    before = _committed_past(cluster, s3, name, 2)
    agent = cluster.kubelet.container_pid(pod["metadata"]["name"], "pytorch", pod["metadata"]["namespace"])
    workers = psutil.Process(agent).children()
    assert workers, "torchrun has no worker process"
    for w in workers:
        w.kill()  # torchrun (maxRestarts 0) gives up: exit 1, permanent under ExitCode -> the job fails

    cluster.wait_job_condition(job, "Failed", timeout=60)
    retry = render.job_name(name, "pretrain", 1)
    done = cluster.wait_for(lambda: _status(cluster, name).get("phase") in ("Succeeded", "Failed")
                            and _status(cluster, name), timeout=300, what="the run to finish")
    assert done["phase"] == "Succeeded", json.dumps(done, indent=1) + operator.log.read_text()[-3000:]
    assert done["attempt"] == 1 and done["jobName"] == retry
    old, new = cluster.get("kubeflow.org/v1/pytorchjobs", job), cluster.get("kubeflow.org/v1/pytorchjobs", retry)
    assert old["spec"]["elasticPolicy"]["rdzvId"] != new["spec"]["elasticPolicy"]["rdzvId"]
    assert old["spec"]["elasticPolicy"]["rdzvHost"] != new["spec"]["elasticPolicy"]["rdzvHost"]
    assert min(_resumed_steps(cluster, retry)) >= before
    assert done["finalCheckpoints"]["pretrain"]["step"] == 16
    assert cluster.list("apps/v1/deployments") == []  # both attempts' stores removed

"""Status from a real metrics endpoint, the operator's own metrics, and `vlmpretrain operator`
as a process (kubeconfig login, liveness endpoint, /metrics, JSON logs)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.operator_harness import FAST_ENV, JOBS, TrainerMetrics, spec, wait
from vlm_operator import metrics as opmetrics

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheaders:DeprecationWarning")


@pytest.fixture
def trainer():
    endpoint = TrainerMetrics()
    yield endpoint
    endpoint.close()


def test_status_is_fed_from_rank0_metrics(cluster, trainer):
    with cluster.operator():
        cluster.create_run("llama", spec(metrics={"port": trainer.port, "podMonitor": True}))
        wait(lambda: cluster.job("llama-pretrain"), what="job")
        # worker-1 is listed first and has an IP where nothing listens: worker-0 (rank 0) is tried first.
        cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=1, ip="127.0.0.2")
        cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=0, ip="127.0.0.1")
        cluster.set_job("llama-pretrain", "Running")
        trainer.train(steps=40, text=85_000, image=15_000, loss=2.5, world=16, restarts=1)
        trainer.commit(30, "s3://ckpt/runs/test/pretrain/step-00000030/", 1_700_000_000)
        status = wait(lambda: cluster.status("llama").get("step") == 40 and cluster.status("llama"), what="scraped step")
        assert status["tokens"] == 100_000 and status["loss"] == 2.5
        assert status["imageTokenFraction"] == pytest.approx(0.15)
        assert status["worldSize"] == 16 and status["restarts"] == 1
        assert status["nodes"] == 2  # 16 processes at 8 per node: the nodes in the rendezvous
        assert status["lastCheckpoint"] == {"uri": "s3://ckpt/runs/test/pretrain/step-00000030/", "step": 30,
                                            "time": "2023-11-14T22:13:20Z", "stage": "pretrain"}
        assert status["phase"] == "Running"

        trainer.train(steps=60, text=10, image=0, loss=2.25)
        trainer.commit(100, "s3://ckpt/runs/test/pretrain/step-00000100/", 1_700_000_600)
        wait(lambda: cluster.status("llama").get("step") == 100, what="the next scrape")

        # A scrape failure changes a message, nothing else.
        trainer.close()
        progressing = wait(lambda: "metrics:" in cluster.condition("llama", "Progressing").get("message", "")
                           and cluster.condition("llama", "Progressing"), what="scrape failure noted")
        assert progressing["status"] == "True" and progressing["reason"] == "Training"
        after = cluster.status("llama")
        assert after["phase"] == "Running" and after["step"] == 100 and after["loss"] == 2.25
        assert cluster.condition("llama", "Ready")["status"] == "True"
        assert cluster.condition("llama", "Degraded")["status"] == "False"

        # The stage ends at its final step (100 of 100): the exact checkpoint initialises the next stage.
        cluster.set_job("llama-pretrain", "Succeeded")
        wait(lambda: cluster.job("llama-sft") and cluster.status("llama").get("stage") == "sft", what="next stage")
        import yaml

        sft = yaml.safe_load(cluster.get("v1/configmaps", "llama-sft-config")["data"]["config.yaml"])
        final = cluster.status("llama")["finalCheckpoints"]["pretrain"]
    assert sft["initFrom"] == final["uri"] == "s3://ckpt/runs/test/pretrain/step-000000100/"  # as confirmed
    assert final["step"] == 100
    assert "step" not in cluster.status("llama")  # per-stage counters restart with the stage


def test_rank0_is_found_past_other_nodes_endpoints(cluster, trainer):
    """After an elastic restart global rank 0 can live on any Worker pod; the others answer
    on the same port with only `vlmtrain_node_info` (VLM_METRICS_EVERY_NODE). The operator
    passes over those and reads rank 0's series."""
    from prometheus_client import start_http_server

    from vlm_trainer.metrics import node_registry

    node, _ = start_http_server(trainer.port, addr="127.0.0.2", registry=node_registry(rank=0, group_rank="1"))
    try:
        with cluster.operator():
            cluster.create_run("llama", spec(metrics={"port": trainer.port, "podMonitor": True}))
            wait(lambda: cluster.job("llama-pretrain"), what="job")
            cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=0, ip="127.0.0.2")  # tried first
            cluster.add_pod("llama-pretrain", "llama", "pretrain", 0, index=1, ip="127.0.0.1")  # holds rank 0
            cluster.set_job("llama-pretrain", "Running")
            trainer.train(steps=7, text=900, image=100, loss=3.0, world=16)
            status = wait(lambda: cluster.status("llama").get("step") == 7 and cluster.status("llama"), what="scraped step")
            assert status["tokens"] == 1000 and status["worldSize"] == 16
            assert "metrics:" not in cluster.condition("llama", "Progressing").get("message", "")
    finally:
        node.shutdown()
        node.server_close()


def test_operator_exports_its_own_metrics(cluster):
    success = opmetrics.value("vlmoperator_reconciles_total", {"result": "success"})
    invalid = opmetrics.value("vlmoperator_reconciles_total", {"result": "invalid"})
    with cluster.operator():
        cluster.create_run("good")
        cluster.create_run("bad", spec(stages=[]))
        cluster.wait_phase("bad", "Invalid")
        wait(lambda: cluster.job("good-pretrain"), what="job")
        cluster.set_job("good-pretrain", "Running")
        cluster.wait_phase("good", "Running")
        from prometheus_client import generate_latest

        # Phases are read from the operator's informer cache, which sees the status write a
        # watch event after the API server does: wait for it, as a scrape would.
        running = 'vlmoperator_run_phase{name="good",namespace="ns1",phase="Running"} 1.0'
        def scraped_running():
            text = generate_latest(opmetrics.REGISTRY).decode()
            return text if running in text else None

        text = wait(scraped_running, what="the Running phase in the operator's metrics")
    assert opmetrics.value("vlmoperator_reconciles_total", {"result": "success"}) > success
    assert opmetrics.value("vlmoperator_reconciles_total", {"result": "invalid"}) > invalid
    assert running in text
    assert 'vlmoperator_run_phase{name="bad",namespace="ns1",phase="Invalid"} 1.0' in text
    assert 'vlmoperator_runs{phase="Running"} 1.0' in text and 'vlmoperator_runs{phase="Failed"} 0.0' in text
    assert "vlmoperator_handler_duration_seconds_bucket" in text and "vlmoperator_api_errors_total" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except OSError:
        return 0, ""


def test_vlmpretrain_operator_command(cluster, tmp_path):
    """The production entry point as a process: kubeconfig like kubectl, liveness, metrics, JSON logs."""
    live, prom = _free_port(), _free_port()
    env = {**os.environ, **FAST_ENV, "KUBECONFIG": str(cluster.kubeconfig), "HOME": str(tmp_path)}
    log = open(tmp_path / "operator.log", "w+")
    cmd = [sys.executable, "-c", "from vlm_api.cli import main; raise SystemExit(main())", "operator",
           "--all-namespaces", f"--liveness=http://127.0.0.1:{live}/healthz", f"--metrics-port={prom}"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: _get(f"http://127.0.0.1:{live}/healthz")[0] == 200, timeout=30, what="liveness endpoint")
        cluster.create_run("cli-run")
        wait(lambda: cluster.job("cli-run-pretrain"), timeout=15, what="children from the CLI operator")
        text = wait(lambda: 'vlmoperator_run_phase{name="cli-run",namespace="ns1",phase="Pending"} 1.0'
                    in _get(f"http://127.0.0.1:{prom}/metrics")[1] and _get(f"http://127.0.0.1:{prom}/metrics")[1],
                    what="operator metrics")
        assert 'vlmoperator_runs{phase="Pending"} 1.0' in text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log.seek(0)
    lines = [json.loads(line) for line in log.read().splitlines() if line.startswith("{")]
    assert any((rec.get("object") or {}).get("name") == "cli-run" and "StageStarted" in rec.get("message", "") for rec in lines), lines[-5:]
    assert proc.returncode == 0
    assert cluster.names(JOBS) == ["cli-run-pretrain"]

"""Every Grafana panel query against a real Prometheus scraping a real local run.

A real Prometheus (Debian's ``prometheus`` package, unpacked by tests/support/prometheus_bin.py)
scrapes, every second:

- a short real training run (``vlmpretrain local`` on tests/data/tiny-local.yaml, renamed, one
  process, validation and a committed checkpoint every 10 steps), rank 0's metrics port, with the
  target labels the run's PodMonitor relabelling gives (``vlmrun``, ``stage``, ``namespace``,
  ``pod``, ``job=<namespace>/<podmonitor>``, see ``vlm_api.render.build_podmonitor``);
- the operator's own metrics: ``vlmpretrain operator`` as a process against the kmock emulator,
  which holds a VLMPretrainRun of the same name (so ``vlmoperator_run_phase{name=<run>}`` exists),
  labelled like manifests/monitoring/servicemonitor.yaml's target (``job`` = the Service name,
  ``honor_labels`` so the run's ``namespace`` survives).

It also loads the PrometheusRule's ``spec.groups`` as a rule file. The test then polls
``/api/v1/query`` (one evaluation time per round, while the run trains) until every dashboard
panel query that can have data locally returns at least one series, and checks that the run
selector (``label_values(vlmtrain_steps_total, vlmrun)``) lists the run and that every rule
group loaded without errors.

Exempt locally (``PanelQuery.exempt_locally``): the GPU-utilisation panel, which joins DCGM
exporter series with kube-state-metrics' ``kube_pod_labels``; neither exporter runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.dashboard_queries import dashboard_queries, load_dashboard
from tests.support.kube_emulator import KubeServer
from tests.support.operator_harness import FAST_ENV, NS, Cluster, spec, wait
from tests.support.prometheus_bin import PrometheusUnavailable, prometheus_binaries

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "data" / "tiny-local.yaml"
PROMETHEUS_RULE = REPO / "manifests" / "monitoring" / "prometheusrule.yaml"
VLM = [sys.executable, "-m", "vlm_api.cli"]
RUN = "dashrun"
STAGE = "pretrain"
OPERATOR_JOB = "vlm-pretrain-operator-metrics"  # the ServiceMonitor's job label: the Service's name
DEADLINE_S = 150

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5) -> dict | None:
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except (OSError, ValueError):
        return None


class Prom:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> dict | None:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        return _get_json(url)

    def query(self, expr: str, at: float) -> list[dict] | str:
        """The result vector, or an error string."""
        body = self.api("query", query=expr, time=f"{at:.3f}")
        if body is None:
            return "no answer"
        if body.get("status") != "success":
            return f"{body.get('errorType')}: {body.get('error')}"
        data = body["data"]
        if data["resultType"] in ("vector", "matrix"):
            return data["result"]
        return [{"metric": {}, "value": data["result"]}]  # scalar / string

    def targets_up(self) -> dict[str, str]:
        body = self.api("targets") or {}
        return {t["labels"].get("job", "?"): t["health"] for t in (body.get("data") or {}).get("activeTargets", [])}


def _tiny_manifest(path: Path, metrics_port: int) -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["metadata"]["name"] = RUN
    pretrain = doc["spec"]["stages"][0]
    assert pretrain["name"] == STAGE
    pretrain["evalInterval"] = 10
    pretrain["visualIntroduceAt"] = 0.0  # image tokens from the first step: the image series move at once
    doc["spec"]["checkpoint"]["interval"] = 10
    doc["spec"]["metrics"]["port"] = metrics_port
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _prometheus_config(path: Path, trainer_port: int, operator_port: int, rules: Path) -> None:
    trainer_labels = {  # what the PodMonitor (render.build_podmonitor) and prometheus-operator attach
        "job": f"{NS}/{RUN}", "namespace": NS, "pod": f"{RUN}-{STAGE}-worker-0", "container": "pytorch",
        "endpoint": "metrics", "vlmrun": RUN, "stage": STAGE,
    }
    operator_labels = {  # what the ServiceMonitor gives: job = Service name; honorLabels keeps the run's namespace
        "job": OPERATOR_JOB, "namespace": "vlm-system", "service": OPERATOR_JOB, "endpoint": "metrics",
    }
    cfg = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "trainer", "metrics_path": "/metrics",
             "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"], "labels": trainer_labels}]},
            {"job_name": "operator", "metrics_path": "/metrics", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"], "labels": operator_labels}]},
        ],
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    try:
        return prometheus_binaries()[0]
    except PrometheusUnavailable as err:
        if shutil.which("apt-get") is None:
            pytest.skip(f"prometheus unavailable on a non-Debian machine: {err}")  # ok: Debian (CI) fetches it or fails
        raise


@pytest.mark.slow
def test_every_dashboard_panel_has_data_from_a_real_run(prometheus_bin, tmp_path):
    from vlm_local.processes import ProcessTracker
    from vlm_trainer.data import synthdata

    started = time.monotonic()
    synthdata.generate(tmp_path / "tiny-data", samples_per_shard=160, image_size=32,
                       shards={"text": 1, "captions": 2, "instruct": 1, "text-instruct": 1})
    trainer_port, operator_port, prom_port, live_port = (_free_port() for _ in range(4))
    manifest = tmp_path / f"{RUN}.yaml"
    _tiny_manifest(manifest, trainer_port)
    rules = tmp_path / "vlm-pretrain.rules.yaml"
    groups = yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"]
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    config = tmp_path / "prometheus.yml"
    _prometheus_config(config, trainer_port, operator_port, rules)

    queries = dashboard_queries(RUN, rate_interval="1m")
    live = [q for q in queries if not q.exempt_locally]
    exempt = [q for q in queries if q.exempt_locally]
    assert live, "the dashboard has no queries"
    assert all(q.needs_gpu_exporter for q in exempt), [q.panel_title for q in exempt]  # only the DCGM join

    prom_log, op_log, run_log = (open(tmp_path / n, "w+") for n in ("prometheus.log", "operator.log", "local.log"))
    prom_proc = op_proc = runner = None
    tracker = ProcessTracker()
    with KubeServer() as server:
        cluster = Cluster(server, tmp_path)
        try:
            prom_proc = subprocess.Popen(
                [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h",
                 "--web.console.templates=/nonexistent", "--web.console.libraries=/nonexistent"],
                cwd=tmp_path, stdout=prom_log, stderr=subprocess.STDOUT)
            prom = Prom(prom_port)

            env = {**os.environ, **FAST_ENV, "KUBECONFIG": str(cluster.kubeconfig), "HOME": str(tmp_path)}
            op_proc = subprocess.Popen(
                VLM + ["operator", "--all-namespaces", f"--liveness=http://127.0.0.1:{live_port}/healthz",
                       f"--metrics-port={operator_port}"],
                env=env, cwd=tmp_path, stdout=op_log, stderr=subprocess.STDOUT)
            cluster.create_run(RUN, spec(metrics={"port": trainer_port, "podMonitor": True}))

            runner = subprocess.Popen(
                VLM + ["local", str(manifest), "--nproc", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--metrics-port", str(trainer_port), "--max-steps", "600", "--progress", "plain"],
                cwd=tmp_path, stdout=run_log, stderr=subprocess.STDOUT)
            tracker.set_roots([runner.pid])

            # The operator's side: the stage's job runs, worker-0 is this machine (the operator
            # scrapes the same rank-0 endpoint Prometheus does).
            wait(lambda: cluster.job(f"{RUN}-{STAGE}"), timeout=60, what="the operator's PyTorchJob")
            cluster.add_pod(f"{RUN}-{STAGE}", RUN, STAGE, 0, index=0, ip="127.0.0.1")
            cluster.set_job(f"{RUN}-{STAGE}", "Running")

            # Poll: one evaluation time per round, every live panel query at that time.
            deadline = time.monotonic() + DEADLINE_S
            missing: list[tuple] = []
            while True:
                tracker.poll()
                assert prom_proc.poll() is None, "prometheus exited:\n" + _tail(tmp_path / "prometheus.log")
                assert op_proc.poll() is None, "the operator exited:\n" + _tail(tmp_path / "operator.log")
                at = time.time()
                missing = []
                for q in live:
                    result = prom.query(q.expr, at)
                    if isinstance(result, str):
                        missing.append((q, result))
                    elif not result:
                        missing.append((q, "no series"))
                if not missing:
                    break
                if time.monotonic() > deadline or runner.poll() is not None:
                    break  # the run ended (it is capped) or the time is up: report what is missing
                time.sleep(0.5)  # a poll interval; the loop's exit is the API's answer
            if missing:
                lines = [f"  [{q.panel_title} / {q.ref_id}] {why}: {q.expr}" for q, why in missing]
                pytest.fail(f"{len(missing)} of {len(live)} dashboard queries returned no data "
                            f"(run exit code {runner.poll()}, {DEADLINE_S}s deadline); targets {prom.targets_up()}\n" + "\n".join(lines)
                            + "\n--- local run:\n" + _tail(tmp_path / "local.log", 1500))

            # The same round's values, for the record (and a few sanity checks on what the run did).
            values = {f"{q.panel_title} / {q.ref_id}": [r["value"][1] for r in prom.query(q.expr, at)] for q in live}
            print(json.dumps(values, indent=1))
            assert float(prom.query(f'max(vlmtrain_checkpoint_last_step{{vlmrun="{RUN}"}})', at)[0]["value"][1]) >= 10
            assert prom.query(f'vlmtrain_validation_loss{{vlmrun="{RUN}",modality="image-text"}}', at)
            phase = prom.query(f'vlmoperator_run_phase{{namespace="{NS}",name="{RUN}"}} == 1', at)
            assert [r["metric"]["phase"] for r in phase] == ["Running"], phase

            # The run selector: label_values(vlmtrain_steps_total, vlmrun).
            var = load_dashboard()["templating"]["list"]
            assert any(v.get("definition") == "label_values(vlmtrain_steps_total, vlmrun)" for v in var)
            values_api = prom.api("label/vlmrun/values", **{"match[]": "vlmtrain_steps_total"})
            assert values_api and RUN in values_api["data"], values_api

            # Both targets up, with the labels the monitors would give.
            assert prom.targets_up() == {f"{NS}/{RUN}": "up", OPERATOR_JOB: "up"}, prom.targets_up()

            # The PrometheusRule's groups: all loaded, every rule evaluated without error.
            want = {g["name"]: len(g["rules"]) for g in groups}

            def rules_evaluated():
                body = prom.api("rules") or {}
                got = (body.get("data") or {}).get("groups", [])
                done = {g["name"]: g for g in got}
                if set(done) != set(want):
                    return None
                if any(r.get("health") == "unknown" for g in got for r in g["rules"]):
                    return None  # not evaluated yet
                return got

            loaded = wait(rules_evaluated, timeout=90, interval=0.5, what="every rule group evaluated")
            assert {g["name"]: len(g["rules"]) for g in loaded} == want
            bad = [(g["name"], r["name"], r.get("lastError")) for g in loaded for r in g["rules"]
                   if r.get("health") != "ok" or r.get("lastError")]
            assert bad == [], bad
        finally:
            if runner is not None and runner.poll() is None:
                runner.send_signal(signal.SIGINT)  # the runner stops its torchrun agents and workers
                try:
                    runner.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    runner.kill()
                    runner.wait(timeout=10)
            tracker.poll()
            leftover = tracker.signal_all(signal.SIGKILL)  # workers in their own sessions, by pid
            _stop(op_proc)
            _stop(prom_proc)
            for f in (prom_log, op_log, run_log):
                f.close()
    assert leftover == [], f"trainer processes outlived the runner: {leftover}"
    print(f"exempt locally (no DCGM exporter / kube-state-metrics here): "
          f"{[f'{q.panel_title} / {q.ref_id}' for q in exempt]}; {len(live)} queries had data; "
          f"{time.monotonic() - started:.1f}s")

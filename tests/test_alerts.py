"""The PrometheusRule in manifests/monitoring/ checked and unit-tested with promtool 2.42
(from Debian's prometheus package, unpacked on demand by tests/support/prometheus_bin.py).

promtool wants plain rule files, so `spec.groups` is extracted from the PrometheusRule.
The unit tests in tests/promtool/*.yaml show every alert firing for a bad series and
staying silent for a healthy one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.prometheus_bin import PrometheusUnavailable, prometheus_binaries

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_RULE = REPO_ROOT / "manifests" / "monitoring" / "prometheusrule.yaml"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"
RULES_NAME = "vlm-pretrain.rules.yaml"  # what the files in tests/promtool/ load

EXPECTED_ALERTS = {
    "VLMTrainingStalled",
    "VLMLossNotFinite",
    "VLMCheckpointTooOld",
    "VLMElasticRestartsSpiking",
    "VLMRunFailed",
    "VLMOperatorDown",
}


@pytest.fixture(scope="module")
def promtool() -> str:
    try:
        return prometheus_binaries()[1]
    except PrometheusUnavailable as err:
        if shutil.which("apt-get") is None:
            pytest.skip(f"promtool unavailable on a non-Debian machine: {err}")  # ok: Debian (CI) fetches it or fails
        raise


def load_rule() -> dict:
    return yaml.safe_load(PROMETHEUS_RULE.read_text())


def rule_groups() -> dict:
    return {"groups": load_rule()["spec"]["groups"]}


@pytest.fixture()
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / RULES_NAME).write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    return tmp_path


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_promtool_is_2_42(promtool):
    out = subprocess.run([promtool, "--version"], capture_output=True, text=True, timeout=60)
    assert re.search(r"version 2\.42\.", out.stdout + out.stderr), out.stdout + out.stderr


def test_prometheusrule_shape():
    rule = load_rule()
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["kind"] == "PrometheusRule"
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, a["alert"]
        assert a["annotations"].get("summary") and a["annotations"].get("description"), a["alert"]
        if a["alert"] != "VLMOperatorDown":
            text = a["annotations"]["summary"] + a["annotations"]["description"]
            assert "$labels.vlmrun" in text or "$labels.name" in text, f"{a['alert']} does not name the run"


def test_promtool_check_rules(promtool, rules_dir):
    res = _promtool(promtool, "check", "rules", RULES_NAME, cwd=rules_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in res.stdout, res.stdout


def _test_files() -> list[Path]:
    return sorted(PROMTOOL_TESTS.glob("*.yaml"))


def test_every_alert_has_firing_and_silent_unit_tests():
    firing, silent = set(), set()
    for f in _test_files():
        doc = yaml.safe_load(f.read_text())
        assert doc["rule_files"] == [RULES_NAME], f
        for t in doc["tests"]:
            for case in t.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    assert firing == EXPECTED_ALERTS, f"alerts never shown firing: {EXPECTED_ALERTS - firing}"
    assert silent == EXPECTED_ALERTS, f"alerts never shown silent: {EXPECTED_ALERTS - silent}"


def test_stall_alert_covers_the_vanished_series():
    doc = yaml.safe_load((PROMTOOL_TESTS / "stalled.yaml").read_text())
    names = {t["name"] for t in doc["tests"]}
    assert {"step series vanished", "step series never appeared"} <= names


@pytest.mark.parametrize("test_file", _test_files(), ids=lambda p: p.stem)
def test_promtool_test_rules(promtool, rules_dir, test_file):
    shutil.copy(test_file, rules_dir / test_file.name)
    res = _promtool(promtool, "test", "rules", test_file.name, cwd=rules_dir)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_tests_fail_against_broken_rules(promtool, rules_dir):
    """The unit tests are not vacuous: with every alert expression replaced by one that
    never fires, each file fails."""
    broken = rule_groups()
    for g in broken["groups"]:
        for r in g["rules"]:
            r["expr"] = "vector(0) == 1"
    (rules_dir / RULES_NAME).write_text(yaml.safe_dump(broken, sort_keys=False))
    for f in _test_files():
        shutil.copy(f, rules_dir / f.name)
        res = _promtool(promtool, "test", "rules", f.name, cwd=rules_dir)
        assert res.returncode != 0, f"{f.name} passes even when no alert can fire"


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """Every Grafana panel query (variables substituted) parses: each is checked as a
    recording rule by `promtool check rules`."""
    from tests.support.dashboard_queries import dashboard_queries

    queries = dashboard_queries("demo")
    assert queries
    rules = [{"record": f"dashboard:panel_{q.panel_id}_{q.ref_id}", "expr": q.expr} for q in queries]
    (tmp_path / "dashboard.rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = _promtool(promtool, "check", "rules", "dashboard.rules.yaml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr + "\n" + json.dumps([q.expr for q in queries], indent=1)

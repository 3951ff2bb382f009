"""The kustomize base in manifests/ and its namespaced overlay: they build, every object
validates against real schemas, and the operator is deployed hardened and with least
privilege: its RBAC grants exactly the calls it makes (derived from the calls, below).

- core kinds: kubernetes-validate (schemas of Kubernetes K8S_VERSION), strict
- monitoring.coreos.com kinds: the vendored prometheus-operator CRDs
  (tests/data/upstream-schemas/, or UPSTREAM_CRDS_DIR), with unknown fields rejected
- the Grafana dashboard and the Argo CD health check
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from tests.support.schemas import upstream_crds_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = REPO_ROOT / "manifests"
CRD_FILE = REPO_ROOT / "crds" / "pretrain.vlm.dev_vlmpretrainruns.yaml"
DASHBOARD = MANIFESTS / "grafana" / "vlm-training.json"
PROMETHEUS_RULE = MANIFESTS / "monitoring" / "prometheusrule.yaml"
ARGO_LUA = MANIFESTS / "argocd" / "health-vlmpretrainrun.lua"
README = MANIFESTS / "README.md"
K8S_VERSION = "1.32"
NAMESPACE = "vlm-system"
OPERATOR_IMAGE = "ghcr.io/vlm-pretrain-operator/operator:0.1.0"


# --------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH: scripts/test.sh installs it (scripts/kubectl.sh)"
    assert CRD_FILE.is_file(), f"{CRD_FILE.relative_to(REPO_ROOT)} is missing: generate it with `vlmpretrain crd`"
    res = subprocess.run([kubectl, "kustomize", str(MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize manifests/ failed:\n{res.stderr}"
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert docs, "kustomize produced no objects"
    return docs


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected exactly one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def test_kustomize_builds_the_whole_base(objects):
    kinds = sorted({o["kind"] for o in objects})
    assert set(kinds) >= {
        "CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
        "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap",
    }, kinds
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "duplicate objects"


def test_crd_is_the_vlmpretrainrun_crd_and_applied_first(objects):
    crds = {o["metadata"]["name"]: o for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == ["vlmpretrainruns.pretrain.vlm.dev", "vlmpretrainsweeps.pretrain.vlm.dev"]
    assert crds["vlmpretrainruns.pretrain.vlm.dev"]["spec"]["names"]["kind"] == "VLMPretrainRun"
    assert crds["vlmpretrainsweeps.pretrain.vlm.dev"]["spec"]["names"]["kind"] == "VLMPretrainSweep"
    waves = {o["kind"]: int(o["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0")) for o in objects}
    assert waves["CustomResourceDefinition"] < waves["Namespace"] <= waves["ClusterRole"] < waves["Deployment"], waves
    assert waves["CustomResourceDefinition"] == min(waves.values())


def test_namespaced_objects_live_in_vlm_system(objects):
    cluster_scoped = {"CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"}
    for o in objects:
        if o["kind"] in cluster_scoped:
            assert "namespace" not in o["metadata"], o["metadata"]
        else:
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"])
    assert one(objects, "Namespace")["metadata"]["name"] == NAMESPACE


# --------------------------------------------------------------------------- schemas


def _short(err: Exception) -> str:
    msg = getattr(err, "message", None) or str(err)
    path = "/".join(str(p) for p in getattr(err, "absolute_path", []) or [])
    return f"{path}: {msg}" if path else msg.splitlines()[0]


def test_core_objects_validate_with_kubernetes_validate(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for o in objects:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {_short(err)}")
        checked += 1
    assert checked >= 8


def _strict(schema: dict) -> dict:
    """Reject unknown fields like the API server's strict field validation would:
    additionalProperties: false on every object schema that lists properties,
    unless it preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if not isinstance(s, dict):
            return
        if (
            s.get("type") == "object"
            and "properties" in s
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
        for key in ("properties", "patternProperties", "definitions"):
            for sub in (s.get(key) or {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(s.get(key), dict):
                walk(s[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in s.get(key) or []:
                walk(sub)

    walk(schema)
    # metadata is only `type: object` in CRD schemas; apiVersion/kind/metadata are always allowed.
    return schema


def _crd_schema(group: str, version: str, kind: str) -> dict:
    d = upstream_crds_dir()
    if not d.is_dir():
        pytest.fail(f"upstream CRDs not found at {d} (set UPSTREAM_CRDS_DIR)")
    for f in sorted(d.glob("*.yaml")):
        for crd in yaml.safe_load_all(f.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            if spec["group"] != group or spec["names"]["kind"] != kind:
                continue
            for v in spec["versions"]:
                if v["name"] == version:
                    assert v.get("served", True), f"{kind} {version} is not served"
                    return v["schema"]["openAPIV3Schema"]
    pytest.fail(f"no CRD for {group}/{version} {kind} in {d}")


def test_monitoring_objects_validate_against_vendored_crds(objects):
    jsonschema = pytest.importorskip("jsonschema")
    monitoring = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in monitoring} == {"ServiceMonitor", "PrometheusRule"}
    for o in monitoring:
        group, version = o["apiVersion"].split("/")
        schema = _strict(_crd_schema(group, version, o["kind"]))
        validator = jsonschema.Draft4Validator(schema)
        errors = sorted(validator.iter_errors(o), key=lambda e: list(e.absolute_path))
        assert not errors, f"{o['kind']}/{o['metadata']['name']}: " + "; ".join(_short(e) for e in errors)


def test_strict_crd_validation_rejects_unknown_fields():
    """The CRD check above is not vacuous: a misspelt field and a wrong type fail."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _strict(_crd_schema("monitoring.coreos.com", "v1", "ServiceMonitor"))
    good = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "x"},
            "spec": {"selector": {}, "endpoints": [{"port": "metrics"}]}}
    assert not list(jsonschema.Draft4Validator(schema).iter_errors(good))
    typo = copy.deepcopy(good)
    typo["spec"]["endpoints"][0]["honourLabels"] = True
    assert list(jsonschema.Draft4Validator(schema).iter_errors(typo))
    wrong = copy.deepcopy(good)
    wrong["spec"]["endpoints"] = {"port": "metrics"}
    assert list(jsonschema.Draft4Validator(schema).iter_errors(wrong))


# --------------------------------------------------------------------------- operator Deployment


def test_operator_deployment_is_hardened(objects):
    dep = one(objects, "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    psc = pod.get("securityContext", {})
    assert psc.get("runAsNonRoot") is True
    assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    (c,) = pod["containers"]
    assert c["image"] == OPERATOR_IMAGE
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001 and psc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert not sc.get("privileged")
    assert sc.get("seccompProfile", psc.get("seccompProfile"))["type"] == "RuntimeDefault"
    # a writable /tmp on a read-only root filesystem
    tmp_mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    assert tmp_mounts, "no /tmp mount"
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    assert "emptyDir" in vols[tmp_mounts[0]["name"]]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), c["resources"]
    argv = c.get("command", []) + c.get("args", [])
    assert argv[:2] == ["vlmpretrain", "operator"] and "--all-namespaces" in argv, argv


def test_liveness_probe_targets_kopf_liveness_endpoint(objects):
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    argv = c.get("command", []) + c.get("args", [])
    (flag,) = [a for a in argv if a.startswith("--liveness=")]
    url = urlparse(flag.split("=", 1)[1])
    probe = c["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    port = probe["port"] if isinstance(probe["port"], int) else ports[probe["port"]]
    assert (url.port, url.path) == (port, probe["path"]) == (8081, "/healthz")
    assert ports["metrics"] == 8080


# --------------------------------------------------------------------------- RBAC

# RBAC is derived from the calls, not pinned by hand: tests.support.operator_calls runs the
# real operator through every API path against the emulator (cluster-wide with -A, and
# namespaced with --namespace) and the tests below compare its request log with the roles
# both ways. A verb may be granted without a scenario making the call only when it is
# listed here with its reason (none is needed today).
UNEXERCISED_GRANTS: dict[tuple[str, str, str], str] = {}


def granted(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                out.setdefault((g, res), set()).update(r.get("verbs", []))
    return out


def test_clusterrole_is_least_privilege(objects):
    role = one(objects, "ClusterRole")
    rules = role["rules"]
    for r in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert not any("*" in str(v) for v in r.get(field, [])), f"wildcard in {r}"
        assert not r.get("nonResourceURLs"), r
        assert "secrets" not in r.get("resources", []), f"operator must not touch Secrets: {r}"
        assert not {"escalate", "bind", "impersonate"} & set(r.get("verbs", [])), r
    assert "aggregationRule" not in role
    # no rights the code never exercises (issue 21: update, pytorchjob delete, cluster-wide
    # configmap/service lists, namespaces, ...)
    for verb, group, resource in (("update", "pretrain.vlm.dev", "vlmpretrainruns"),
                                  ("delete", "kubeflow.org", "pytorchjobs"), ("list", "", "configmaps"),
                                  ("list", "", "services"), ("list", "", "namespaces"), ("get", "", "secrets")):
        assert verb not in granted(rules).get((group, resource), set()), (verb, group, resource)


def test_clusterrolebinding_binds_the_operator_serviceaccount(objects):
    crb, role, sa = one(objects, "ClusterRoleBinding"), one(objects, "ClusterRole"), one(objects, "ServiceAccount")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]


# --------------------------------------------------------------------------- metrics wiring


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_and_servicemonitor_reach_the_operator_metrics_port(objects):
    dep = one(objects, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"]: p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    svc = one(objects, "Service")
    assert _selects(svc["spec"]["selector"], pod_labels)
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8080 and container_ports[port["targetPort"]] == 8080
    sm = one(objects, "ServiceMonitor")
    assert _selects(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert NAMESPACE in sm["spec"].get("namespaceSelector", {}).get("matchNames", [NAMESPACE])
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] == port["name"] and ep.get("path", "/metrics") == "/metrics"
    # vlmoperator_run_phase's own `namespace` label must survive the scrape (the alerts join on it)
    assert ep.get("honorLabels") is True
    # the VLMOperatorDown alert matches the job label, which is the Service name
    rules = yaml.safe_load(PROMETHEUS_RULE.read_text())
    down = [r for g in rules["spec"]["groups"] for r in g["rules"] if r.get("alert") == "VLMOperatorDown"][0]
    job_re = re.search(r'up\{job=~"([^"]+)"\}', down["expr"]).group(1)
    assert re.fullmatch(job_re, svc["metadata"]["name"])


def test_prometheus_operator_objects_carry_the_release_label(objects):
    for kind in ("ServiceMonitor", "PrometheusRule"):
        assert "release" in one(objects, kind)["metadata"].get("labels", {}), kind
    env = {e["name"]: e.get("value") for e in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env.get("VLM_PODMONITOR_LABELS", "").startswith("release=")


# --------------------------------------------------------------------------- Grafana


def test_dashboard_configmap_is_generated_for_the_grafana_sidecar(objects):
    cms = [o for o in by_kind(objects, "ConfigMap") if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(cms) == 1
    (cm,) = cms
    assert cm["metadata"]["name"] == "vlm-training-dashboard"  # no hash suffix
    assert json.loads(cm["data"]["vlm-training.json"]) == json.loads(DASHBOARD.read_text())


def _panels(dash: dict):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", []) or []


def test_dashboard_json_panels_have_datasource_and_queries():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    run = variables["vlmrun"]
    query = run["query"]["query"] if isinstance(run["query"], dict) else run["query"]
    assert query == "label_values(vlmtrain_steps_total, vlmrun)"
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    panels = [p for p in _panels(dash) if p["type"] != "row"]
    assert len(panels) >= 12
    for p in panels:
        assert p.get("datasource", {}).get("uid") == "${datasource}", p["title"]
        assert p.get("targets"), f"panel {p['title']!r} has no targets"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} target {t.get('refId')} has no expr"
            assert t.get("datasource", p["datasource"])["uid"] == "${datasource}"
            assert t.get("refId")
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])


REQUIRED_PANEL_METRICS = {
    "loss": ["vlmtrain_loss", "vlmtrain_validation_loss"],
    "tokens/s": ["rate(vlmtrain_tokens_total"],
    "image-token fraction": ["vlmtrain_image_token_ratio", "vlmtrain_image_token_target_ratio"],
    "mfu": ["vlmtrain_mfu_ratio"],
    "step time": ["histogram_quantile(0.5", "histogram_quantile(0.95", "vlmtrain_step_duration_seconds_bucket"],
    "data wait": ["vlmtrain_data_wait_seconds_total", "vlmtrain_step_duration_seconds_sum"],
    "checkpoint": ["vlmtrain_checkpoint_last_success_timestamp_seconds", "vlmtrain_checkpoint_save_duration_seconds_bucket",
                   "vlmtrain_checkpoint_upload_duration_seconds_bucket", "vlmtrain_checkpoint_bytes"],
    "restarts": ["vlmtrain_elastic_restart_count", "vlmtrain_world_size"],
    "gpu": ["DCGM_FI_PROF_GR_ENGINE_ACTIVE"],
    "operator": ["vlmoperator_reconciles_total"],
}


def test_dashboard_covers_the_required_views():
    dash = json.loads(DASHBOARD.read_text())
    all_exprs = "\n".join(t["expr"] for p in _panels(dash) for t in p.get("targets", []))
    for view, needles in REQUIRED_PANEL_METRICS.items():
        for n in needles:
            assert n in all_exprs, f"dashboard lacks {view}: {n}"
    # the GPU panel joins DCGM series to the run's pods by pod
    gpu = [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if "DCGM_" in t["expr"]]
    assert gpu and all(re.search(r"on\s*\([^)]*\bpod\b", e) for e in gpu)


# Metric names fixed by the trainer / operator contract (issue 4, issue 7).
CONTRACT_METRICS = {
    "vlmtrain_steps_total", "vlmtrain_tokens_total", "vlmtrain_samples_total", "vlmtrain_loss",
    "vlmtrain_validation_loss", "vlmtrain_image_token_ratio", "vlmtrain_image_token_target_ratio",
    "vlmtrain_stage_info", "vlmtrain_learning_rate", "vlmtrain_grad_norm", "vlmtrain_step_duration_seconds",
    "vlmtrain_data_wait_seconds_total", "vlmtrain_mfu_ratio", "vlmtrain_world_size",
    "vlmtrain_elastic_restart_count", "vlmtrain_checkpoint_last_step",
    "vlmtrain_checkpoint_last_success_timestamp_seconds", "vlmtrain_checkpoint_interval_seconds",
    "vlmtrain_checkpoint_save_duration_seconds", "vlmtrain_checkpoint_upload_duration_seconds",
    "vlmtrain_checkpoint_bytes", "vlmtrain_checkpoint_failures_total", "vlmtrain_build_info",
    "vlmoperator_reconciles_total", "vlmoperator_runs", "vlmoperator_api_errors_total",
    "vlmoperator_handler_duration_seconds", "vlmoperator_run_phase",
}
_METRIC_RE = re.compile(r"\b(vlm(?:train|operator)_[a-z0-9_]+)")


def _metric_names(expr: str) -> set[str]:
    names = set()
    for m in _METRIC_RE.findall(expr):
        for suffix in ("_bucket", "_sum", "_count"):
            base = m[: -len(suffix)]
            if m.endswith(suffix) and base in CONTRACT_METRICS:
                m = base
        names.add(m)
    return names


def test_dashboard_and_alerts_use_only_contract_metric_names():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    rules = yaml.safe_load(PROMETHEUS_RULE.read_text())
    exprs += [r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]]
    used = set().union(*(_metric_names(e) for e in exprs))
    assert used <= CONTRACT_METRICS, f"unknown metric names: {sorted(used - CONTRACT_METRICS)}"


def test_dashboard_queries_helper_substitutes_variables():
    from tests.support.dashboard_queries import dashboard_queries

    queries = dashboard_queries("llama1b-intro80")
    dash = json.loads(DASHBOARD.read_text())
    assert len(queries) == sum(len(p.get("targets", [])) for p in _panels(dash))
    for q in queries:
        # "$1": label_replace's capture group (the sweep panel), no Grafana variable (none is named 1)
        assert "$" not in q.expr.replace('"$1"', ""), q.expr
        if "$vlmrun" in q.raw_expr:
            assert "llama1b-intro80" in q.expr
        if "$__rate_interval" in q.raw_expr:
            assert "[1m]" in q.expr
    assert any(q.needs_gpu_exporter for q in queries)
    assert all(not q.needs_gpu_exporter for q in queries if "DCGM_" not in q.expr)


# --------------------------------------------------------------------------- Argo CD


def _run_health_lua(obj: dict) -> dict:
    lupa = pytest.importorskip("lupa")
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(ARGO_LUA.read_text())
    return {"status": result["status"], "message": result["message"]}


def _run(phase=None, generation=1, observed=1, conditions=None, **status):
    obj = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun",
           "metadata": {"name": "r", "namespace": "n", "generation": generation}}
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed, "conditions": conditions or [], **status}
    return obj


def test_argocd_health_check_is_shipped_and_documented():
    assert ARGO_LUA.is_file()
    readme = README.read_text()
    assert "health-vlmpretrainrun.lua" in readme
    assert "resource.customizations.health.pretrain.vlm.dev_VLMPretrainRun" in readme
    assert "sync-wave" in readme


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (_run(None), "Progressing"),
        (_run("Pending"), "Progressing"),
        (_run("Running", stage="pretrain", step=1200), "Progressing"),
        (_run("Running", conditions=[{"type": "Degraded", "status": "True", "reason": "Restarting", "message": "rank 3 lost"}]), "Degraded"),
        (_run("Running", conditions=[{"type": "Degraded", "status": "False"}]), "Progressing"),
        (_run("Succeeded"), "Healthy"),
        (_run("Failed"), "Degraded"),
        (_run("Invalid", conditions=[{"type": "Ready", "status": "False", "reason": "Invalid", "message": "mixture sums to 0.9"}]), "Degraded"),
        (_run("Suspended"), "Suspended"),
        (_run("Running", generation=3, observed=2), "Progressing"),
        (_run("Succeeded", generation=3, observed=2), "Healthy"),
        (_run("Exploded"), "Unknown"),
    ],
)
def test_argocd_health_check_maps_phases(obj, expected):
    hs = _run_health_lua(obj)
    assert hs["status"] == expected, hs
    assert hs["message"]


def test_argocd_health_messages_name_the_problem():
    hs = _run_health_lua(_run("Invalid", conditions=[{"type": "Ready", "status": "False", "reason": "Invalid", "message": "mixture sums to 0.9"}]))
    assert "mixture sums to 0.9" in hs["message"]
    hs = _run_health_lua(_run("Running", stage="sft", step=42))
    assert "sft" in hs["message"] and "42" in hs["message"]


def test_readme_documents_the_monitoring_release_label():
    readme = README.read_text()
    for needle in ("release:", "PodMonitor", "ServiceMonitor", "PrometheusRule", "grafana_dashboard"):
        assert needle in readme, needle


# --------------------------------------------------------------------------- RBAC against real calls


@pytest.fixture(scope="module")
def cluster_calls(tmp_path_factory):
    from tests.support import operator_calls

    return operator_calls.exercise_scoped(tmp_path_factory.mktemp("rbac-cluster"))


def _both_ways(calls: set, rules: list[dict], what: str) -> None:
    """Every call allowed by `rules`, every grant of `rules` called (or listed in
    UNEXERCISED_GRANTS with a reason)."""
    from tests.support import operator_calls

    plain = {c[:3] for c in calls}
    assert operator_calls.missing(plain, {"rules": rules}) == [], f"{what}: calls the role does not allow"
    grants = operator_calls.granted(rules)
    unused = grants - plain - set(UNEXERCISED_GRANTS)
    assert not unused, f"{what}: granted but never called by any scenario: {sorted(unused)}"


def test_clusterrole_grants_exactly_the_calls_the_operator_makes(objects, cluster_calls):
    """Derived from the emulator's request log: one scenario through every API path (children,
    409 re-reads, ChildConflict, scrape, rescale, suspend, config update, retry with store
    cleanup, next stage, invalid spec, Events, an unseen run's job), plus whatever the
    operator integration tests recorded earlier in this session (those must be allowed too,
    but cannot vouch for a grant: this test must hold on its own)."""
    from tests.support import operator_calls

    role = one(objects, "ClusterRole")
    calls = {c[:3] for c in cluster_calls}
    assert ("create", "kubeflow.org", "pytorchjobs") in calls and ("patch", "pretrain.vlm.dev", "vlmpretrainruns/status") in calls
    _both_ways(calls, role["rules"], "ClusterRole")
    assert operator_calls.missing(calls | operator_calls.recorded(), role) == []
    assert not set(UNEXERCISED_GRANTS) - operator_calls.granted(role["rules"]), "stale UNEXERCISED_GRANTS entries"
    # The check has teeth both ways: a role without configmap creation, or with a verb
    # nothing calls, is caught.
    weaker = {"rules": [r for r in role["rules"] if "configmaps" not in r.get("resources", [])]}
    assert operator_calls.missing(calls, weaker)
    wider = role["rules"] + [{"apiGroups": [""], "resources": ["pods"], "verbs": ["watch"]}]
    with pytest.raises(AssertionError, match="never called"):
        _both_ways(calls, wider, "wider")


# --------------------------------------------------------------------------- namespaced install

OVERLAY = MANIFESTS / "overlays" / "namespaced"


@pytest.fixture(scope="module")
def namespaced_objects() -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH: scripts/test.sh installs it (scripts/kubectl.sh)"
    res = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kubectl kustomize {OVERLAY.relative_to(REPO_ROOT)} failed:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _args(objects: list[dict]) -> list[str]:
    c = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return c.get("command", []) + c.get("args", [])


def _watched(objects: list[dict]) -> list[str]:
    return sorted(a.split("=", 1)[1] for a in _args(objects) if a.startswith("--namespace="))


def test_namespaced_overlay_builds_and_validates(namespaced_objects, objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    jsonschema = pytest.importorskip("jsonschema")
    for o in namespaced_objects:
        if o["apiVersion"].startswith("monitoring.coreos.com/"):
            group, version = o["apiVersion"].split("/")
            errors = list(jsonschema.Draft4Validator(_strict(_crd_schema(group, version, o["kind"]))).iter_errors(o))
            assert not errors, f"{o['kind']}/{o['metadata']['name']}: " + "; ".join(_short(e) for e in errors)
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {_short(err)}")
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in namespaced_objects]
    assert len(names) == len(set(names)), "duplicate objects"
    # Everything but RBAC and the operator's arguments is the cluster-wide install's.
    rbac = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    key = lambda o: (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])  # noqa: E731
    base = {key(o): o for o in objects if o["kind"] not in rbac}
    overlay = {key(o): o for o in namespaced_objects if o["kind"] not in rbac}
    assert set(base) == set(overlay)
    for k, o in overlay.items():
        if k[0] != "Deployment":
            assert o == base[k], k
    dep, base_dep = one(namespaced_objects, "Deployment"), one(objects, "Deployment")
    strip = lambda d: [a for a in _args([d]) if a != "--all-namespaces" and not a.startswith("--namespace=")]  # noqa: E731
    assert strip(dep) == strip(base_dep)


def test_namespaced_overlay_binds_a_role_in_every_watched_namespace(namespaced_objects, objects):
    argv = _args(namespaced_objects)
    watched = _watched(namespaced_objects)
    assert watched == ["team-a", "team-b"] and "--all-namespaces" not in argv and "-A" not in argv
    sa = one(namespaced_objects, "ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    roles = {o["metadata"]["namespace"]: o for o in by_kind(namespaced_objects, "Role")}
    bindings = {o["metadata"]["namespace"]: o for o in by_kind(namespaced_objects, "RoleBinding")}
    assert sorted(roles) == sorted(bindings) == watched
    for ns in watched:
        assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                           "name": roles[ns]["metadata"]["name"]}
        assert bindings[ns]["subjects"] == [subject]
    # The Role is the ClusterRole's rules for one namespace: cluster-scoped resources aside, the same.
    cluster_scoped = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}
    cluster_rules = {k: v for k, v in granted(one(objects, "ClusterRole")["rules"]).items() if k not in cluster_scoped}
    for ns in watched:
        assert granted(roles[ns]["rules"]) == cluster_rules, ns
    # No cluster-wide right over objects: the only ClusterRole reads the cluster's shape.
    (cr,) = by_kind(namespaced_objects, "ClusterRole")
    assert set(granted(cr["rules"])) <= cluster_scoped and all(v <= {"list", "watch"} for v in granted(cr["rules"]).values())
    (crb,) = by_kind(namespaced_objects, "ClusterRoleBinding")
    assert crb["roleRef"]["name"] == cr["metadata"]["name"] and crb["subjects"] == [subject]


def test_namespaced_roles_grant_exactly_the_calls_of_a_namespaced_operator(namespaced_objects, tmp_path):
    """The operator started as the overlay starts it (`--namespace`, here the harness's
    namespace) through the same scenario: every namespaced call is made in a watched
    namespace and allowed by the Role; every other call by the read-only ClusterRole; and
    each grants nothing the operator does not call."""
    from tests.support import operator_calls
    from tests.support.operator_harness import NS

    calls = operator_calls.exercise_scoped(tmp_path, [NS])
    assert ("create", "kubeflow.org", "pytorchjobs", NS) in calls
    namespaced = {c for c in calls if c[3] is not None}
    cluster_wide = {c for c in calls if c[3] is None}
    assert {c[3] for c in namespaced} == {NS}, "calls outside the watched namespace"
    role = by_kind(namespaced_objects, "Role")[0]
    (cr,) = by_kind(namespaced_objects, "ClusterRole")
    _both_ways(namespaced, role["rules"], "Role")
    _both_ways(cluster_wide, cr["rules"], "ClusterRole (namespaced install)")


# --------------------------------------------------------------------------- the operator's NetworkPolicy


def test_operator_namespace_admits_only_monitoring_to_the_metrics_port(objects):
    (np_,) = [o for o in by_kind(objects, "NetworkPolicy")]
    assert np_["metadata"]["namespace"] == NAMESPACE
    spec = np_["spec"]
    assert spec["podSelector"] == {} and spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    (expr,) = peer["namespaceSelector"]["matchExpressions"]
    assert set(peer) == {"namespaceSelector"} and expr["key"] == "kubernetes.io/metadata.name"
    dep = one(objects, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    # the same namespaces every run's NetworkPolicy admits to the workers' metrics port
    assert sorted(expr["values"]) == sorted(env["VLM_OPERATOR_METRICS_NAMESPACES"].split(","))
    assert rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    assert "metrics" in {p["name"] for p in c["ports"]}
    assert env.get("POD_NAMESPACE") is None and any(e["name"] == "POD_NAMESPACE" for e in c["env"])


def test_the_carried_upstream_schemas_are_structure_only():
    """tests/data/upstream-schemas/ (scripts/vendor_schemas.py): no schema description is left,
    a property *named* description is kept, and the structure the tests rely on is there."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vendor_schemas", REPO_ROOT / "scripts" / "vendor_schemas.py")
    vendor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vendor)
    assert vendor.strip({"description": "d", "properties": {"description": {"type": "string", "description": "x"}}}) \
        == {"properties": {"description": {"type": "string"}}}
    carried = REPO_ROOT / "tests" / "data" / "upstream-schemas"
    assert set(vendor.SOURCES) | {"SOURCES.md"} == {p.name for p in carried.iterdir()}
    for name in vendor.SOURCES:
        crd = yaml.safe_load((carried / name).read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert vendor.strip(schema) == schema, name
    job = yaml.safe_load((carried / "kubeflow.org_pytorchjobs.yaml").read_text())
    spec_props = job["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert {"elasticPolicy", "pytorchReplicaSpecs", "runPolicy", "nprocPerNode"} <= set(spec_props)

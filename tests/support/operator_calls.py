"""Which API calls the operator makes, for checking them against its ClusterRole.

The emulator logs every request; the operator's are the ones sent with kopf's or the
operator's own User-Agent (`kopf/...`, `vlm-pretrain-operator/...`), so the test's own
calls (playing the user and the Kubeflow controller) are left out.

Three ways to use it:
- `calls(kube)`: the (verb, apiGroup, resource) triples of one emulator's log, where
  resource is `plural` or `plural/subresource` as RBAC names them;
- `record(kube, name)` / `recorded()`: the operator tests write their calls to
  `tests/.artifacts/operator-calls-<name>.json`; `recorded()` is the union of those files;
- `exercise(workdir)`: runs one representative scenario (every code path that talks to the
  API: children with a PodMonitor, scrape, rescale, suspend, config update, next stage,
  retry, invalid spec, Events) against a fresh emulator and returns its calls. An RBAC
  test can call it directly, independent of which other tests ran.

`missing(calls, clusterrole)` lists the calls a ClusterRole (a dict, e.g. loaded from
manifests/rbac/clusterrole.yaml) does not allow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tests.support.kube_emulator import KubeServer, _verb

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / ".artifacts"
OPERATOR_AGENTS = ("kopf/", "vlm-pretrain-operator/")

Call = tuple[str, str, str]  # (verb, apiGroup, resource[/subresource])


def _agent(request) -> str:
    headers = getattr(request, "headers", {}) or {}
    return next((v for k, v in headers.items() if k.lower() == "user-agent"), "")


def calls(kube: KubeServer) -> set[Call]:
    out: set[Call] = set()
    for r in list(kube.emulator._requests):
        if r.resource is None or not r.resource.plural or not _agent(r).startswith(OPERATOR_AGENTS):
            continue
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        out.add((_verb(r), r.resource.group or "", resource))
    return out


def record(kube: KubeServer, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"operator-calls-{name}.json"
    path.write_text(json.dumps(sorted(calls(kube)), indent=1))
    return path


def recorded() -> set[Call]:
    out: set[Call] = set()
    for path in sorted(ARTIFACTS.glob("operator-calls-*.json")):
        out |= {tuple(c) for c in json.loads(path.read_text())}
    return out


def missing(found: Iterable[Call], clusterrole: dict) -> list[Call]:
    rules = clusterrole.get("rules") or []

    def allowed(call: Call) -> bool:
        verb, group, resource = call
        return any(
            (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
            and (resource in r.get("resources", []) or "*" in r.get("resources", []))
            and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
            for r in rules
        )

    return sorted(c for c in found if not allowed(c))


def exercise(workdir: Path) -> set[Call]:
    """One scenario through every API-touching path of the operator; returns its calls."""
    from tests.support.operator_harness import JOBS, Cluster, spec, wait

    with KubeServer() as kube:
        cluster = Cluster(kube, workdir)
        with cluster.operator():
            cluster.create_run("rbac", spec(maxRetries=1))
            wait(lambda: cluster.job("rbac-pretrain"), what="first job")
            cluster.set_job("rbac-pretrain", "Running")
            cluster.add_pod("rbac-pretrain", "rbac", "pretrain", 0, ip="127.0.0.1")
            cluster.wait_phase("rbac", "Running")
            wait(lambda: cluster.status("rbac").get("conditions") and "metrics:" in cluster.condition("rbac", "Progressing")["message"],
                 what="a scrape attempt")
            cluster.patch_spec("rbac", {"resources": {"nodes": {"min": 1, "max": 3}}, "checkpoint": {"keep": 5}})
            wait(lambda: cluster.job("rbac-pretrain")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3, what="rescale")
            cluster.patch_spec("rbac", {"suspend": True})
            cluster.wait_phase("rbac", "Suspended")
            cluster.patch_spec("rbac", {"suspend": False})
            cluster.set_job("rbac-pretrain", "Failed", "Error", "worker exited 1")
            wait(lambda: cluster.job("rbac-pretrain-r1"), what="retry")
            cluster.set_job("rbac-pretrain-r1", "Succeeded")
            wait(lambda: cluster.get(JOBS, "rbac-sft"), what="next stage")
            cluster.create_run("rbac-bad", spec(stages=[]))
            cluster.wait_phase("rbac-bad", "Invalid")
            cluster.wait_events("rbac-bad", "InvalidSpec")
            cluster.wait_events("rbac", "StageRetry", "StageStarted", "StageStarted")
        return calls(kube)

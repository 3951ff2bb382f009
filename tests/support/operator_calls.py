"""Which API calls the operator makes, for checking them against its ClusterRole.

The emulator logs every request; the operator's are the ones sent with kopf's or the
operator's own User-Agent (`kopf/...`, `vlm-pretrain-operator/...`), so the test's own
calls (playing the user and the Kubeflow controller) are left out.

Three ways to use it:
- `calls(kube)`: the (verb, apiGroup, resource) triples of one emulator's log, where
  resource is `plural` or `plural/subresource` as RBAC names them;
- `record(kube, name)` / `recorded()`: the operator tests write their calls to
  `tests/.artifacts/operator-calls-<name>.json`; `recorded()` is the union of those files;
- `exercise(workdir)` / `exercise_scoped(workdir, namespaces)`: runs one representative
  scenario (every code path that talks to the API: children with a PodMonitor and a
  NetworkPolicy, 409 re-reads, a ChildConflict, scrape, rescale, suspend, config update,
  retry with the ended store's removal, next stage, invalid spec, Events, the job of a
  run not seen yet, a sweep creating and suspending its run, a Kueue Workload deactivated) against a fresh emulator
  and returns its calls (with each call's namespace); `namespaces` runs the operator
  with `--namespace` as the namespaced install does. An RBAC test calls it directly, independent of which other tests ran.

`missing(calls, clusterrole)` lists the calls a role (a dict, e.g. loaded from
manifests/rbac/clusterrole.yaml) does not allow; `granted(rules)` is what rules grant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tests.support.kube_emulator import KubeServer, _verb, resource_info

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / ".artifacts"
OPERATOR_AGENTS = ("kopf/", "vlm-pretrain-operator/")

Call = tuple[str, str, str]  # (verb, apiGroup, resource[/subresource])
ScopedCall = tuple[str, str, str, str | None]  # (verb, apiGroup, resource[/subresource], namespace or None)


def _agent(request) -> str:
    headers = getattr(request, "headers", {}) or {}
    return next((v for k, v in headers.items() if k.lower() == "user-agent"), "")


def scoped_calls(kube: KubeServer) -> set[ScopedCall]:
    """The operator's calls with the namespace each was made in (None: cluster-wide or a
    cluster-scoped resource), to check against namespaced Roles."""
    out: set[ScopedCall] = set()
    for r in list(kube.emulator._requests):
        if r.resource is None or not r.resource.plural or not _agent(r).startswith(OPERATOR_AGENTS):
            continue
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        out.add((_verb(r), r.resource.group or "", resource, r.namespace or None))
    return out


def calls(kube: KubeServer) -> set[Call]:
    return {c[:3] for c in scoped_calls(kube)}


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
    """The calls (verb, apiGroup, resource) a role (a dict with `rules`) does not allow."""
    rules = clusterrole.get("rules") or []
    return sorted(c for c in found if not role_allows(rules, c))


def exercise(workdir: Path, namespaces: list[str] | None = None) -> set[Call]:
    """One scenario through every API-touching path of the operator; returns its calls."""
    return {c[:3] for c in exercise_scoped(workdir, namespaces)}


def exercise_scoped(workdir: Path, namespaces: list[str] | None = None) -> set[ScopedCall]:
    """The scenario of `exercise`, with each call's namespace. `namespaces`: the operator
    runs with `--namespace` for each (the namespaced install) instead of `-A`; the runs
    live in the harness's namespace, which must then be among them."""
    from tests.support.operator_harness import JOBS, NS, RUNS, Cluster, spec, wait

    with KubeServer() as kube:
        cluster = Cluster(kube, workdir)
        for ns in namespaces or ():  # kopf serves a --namespace only once it has seen it exist
            cluster.create("v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, None)
        # A child name taken by someone else's object: ChildConflict, nothing adopted.
        cluster.create("v1/configmaps", {"apiVersion": "v1", "kind": "ConfigMap", "data": {},
                                         "metadata": {"name": "rbac-taken-pretrain-config", "namespace": NS}})
        # The first status write is refused: the next reconcile re-creates every child of the
        # first attempt (409 AlreadyExists) and reads each back to check it is the run's.
        kube.fail("patch", RUNS, 403, times=1, subresource="status", name="rbac")
        with cluster.operator(namespaces=namespaces):
            cluster.create_run("rbac", spec(maxRetries=1))
            wait(lambda: cluster.job("rbac-pretrain"), what="first job")
            wait(lambda: cluster.status("rbac").get("jobName") == "rbac-pretrain", what="status after the refused write")
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
            wait(lambda: cluster.get("apps/v1/deployments", "rbac-pretrain-rdzv") is None, what="the ended store removed")
            cluster.set_job("rbac-pretrain-r1", "Succeeded")
            wait(lambda: cluster.get(JOBS, "rbac-sft"), what="next stage")
            cluster.create_run("rbac-bad", spec(stages=[]))
            cluster.wait_phase("rbac-bad", "Invalid")
            cluster.wait_events("rbac-bad", "InvalidSpec")
            cluster.create_run("rbac-taken")
            cluster.wait_events("rbac-taken", "ChildConflict")
            # A PyTorchJob of a run this process has not seen (its run deleted, or after a
            # restart the job watch delivering first): the run is read by GET.
            cluster.create(JOBS, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "spec": {},
                                  "metadata": {"name": "rbac-ghost-pretrain", "namespace": NS,
                                               "labels": {"pretrain.vlm.dev/run": "rbac-ghost"}}})
            wait(lambda: any(r.resource == "vlmpretrainruns" and r.verb == "get" and r.name == "rbac-ghost"
                             for r in kube.request_log), what="the unseen run read")
            cluster.wait_events("rbac", "StageRetry", "StageStarted", "StageStarted")
            # A sweep: its runs created, suspended and resumed by patch, its status written.
            sweep = {"template": spec(), "parameters": [{"path": "stages[pretrain].visualIntroduceAt", "values": [0.1]}],
                     "objective": {"stage": "sft"}}
            cluster.create("pretrain.vlm.dev/v1alpha1/vlmpretrainsweeps", {
                "apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainSweep",
                "metadata": {"name": "rbac-sweep", "namespace": NS}, "spec": sweep})
            wait(lambda: any(n.startswith("rbac-sweep-") for n in cluster.names(RUNS)), what="the sweep's run")
            cluster.merge("pretrain.vlm.dev/v1alpha1/vlmpretrainsweeps", "rbac-sweep", {"spec": {"suspend": True}})
            wait(lambda: any(r["spec"].get("suspend") for r in cluster.objects(RUNS)
                             if r["metadata"]["name"].startswith("rbac-sweep-")), what="the sweep's run suspended")
            # A Kueue-managed run its user suspends: Kueue's Workload listed by label, deactivated.
            workloads = "kueue.x-k8s.io/v1beta1/workloads"
            kube.add_resource(workloads, resource_info("Workload"))
            cluster.create_run("rbac-queued", spec(scheduling={"queueName": "q"}))
            queued = wait(lambda: cluster.job("rbac-queued-pretrain"), what="the queued job")
            cluster.create(workloads, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload", "spec": {},
                                       "metadata": {"name": "rbac-queued-wl", "namespace": NS,
                                                    "labels": {"kueue.x-k8s.io/job-uid": queued["metadata"]["uid"]}}})
            cluster.patch_spec("rbac-queued", {"suspend": True})
            wait(lambda: cluster.get(workloads, "rbac-queued-wl")["spec"].get("active") is False,
                 what="the Workload deactivated")
        return scoped_calls(kube)


def role_allows(rules: list[dict], call: Call) -> bool:
    verb, group, resource = call
    return any(
        (group in r.get("apiGroups", []) or "*" in r.get("apiGroups", []))
        and (resource in r.get("resources", []) or "*" in r.get("resources", []))
        and (verb in r.get("verbs", []) or "*" in r.get("verbs", []))
        for r in rules
    )


def granted(rules: list[dict]) -> set[Call]:
    """Every (verb, apiGroup, resource) a role's rules grant (no wildcards expected)."""
    return {(v, g, res) for r in rules for g in r.get("apiGroups", []) for res in r.get("resources", [])
            for v in r.get("verbs", [])}

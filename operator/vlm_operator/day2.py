"""Pure day-2 diffs: the live stage objects vs what the spec renders now.

Mutable while running (DESIGN section 3): `resources.nodes` (rescale the live PyTorchJob in
place: elasticPolicy min/max and Worker replicas; torchrun re-rendezvouses, no restart from
scratch), `suspend` (the job's `runPolicy.suspend`) and `checkpoint.keep` (flows to the
trainer through the stage ConfigMap). Everything else that can change is in the
ConfigMap too; `model`, `data` and `stages` are immutable (CEL), see core.immutable_problems.
"""

from __future__ import annotations


def _get(obj: dict | None, *path: str):
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def job_patch(live: dict, desired: dict) -> dict | None:
    """A merge patch that brings the live job's scale and suspension to the desired ones."""
    spec: dict = {}
    for key in ("minReplicas", "maxReplicas"):
        want = _get(desired, "spec", "elasticPolicy", key)
        if want is not None and _get(live, "spec", "elasticPolicy", key) != want:
            spec.setdefault("elasticPolicy", {})[key] = want
    want = _get(desired, "spec", "pytorchReplicaSpecs", "Worker", "replicas")
    if want is not None and _get(live, "spec", "pytorchReplicaSpecs", "Worker", "replicas") != want:
        spec["pytorchReplicaSpecs"] = {"Worker": {"replicas": want}}
    want = bool(_get(desired, "spec", "runPolicy", "suspend"))
    if bool(_get(live, "spec", "runPolicy", "suspend")) != want:
        spec["runPolicy"] = {"suspend": want}
    return {"spec": spec} if spec else None


def describe(patch: dict, desired: dict) -> list[tuple[str, str]]:
    """(reason, message) Events for a job patch."""
    out = []
    spec = patch.get("spec", {})
    if "elasticPolicy" in spec or "pytorchReplicaSpecs" in spec:
        ep = _get(desired, "spec", "elasticPolicy") or {}
        replicas = _get(desired, "spec", "pytorchReplicaSpecs", "Worker", "replicas")
        out.append(("Rescaled", f"nodes {ep.get('minReplicas')}..{ep.get('maxReplicas')}, Worker replicas {replicas} (in place)"))
    if "runPolicy" in spec:
        out.append(("Suspended", "job suspended") if spec["runPolicy"]["suspend"] else ("Resumed", "job resumed"))
    return out


def configmap_patch(live: dict, desired: dict) -> dict | None:
    if (live.get("data") or {}) != (desired.get("data") or {}):
        return {"data": desired.get("data") or {}}
    return None

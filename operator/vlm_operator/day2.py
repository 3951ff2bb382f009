"""Pure day-2 diffs: the live stage objects vs what the spec renders now.

Mutable while running (README, "The API"): `resources.nodes` (rescale the live PyTorchJob in
place: elasticPolicy min/max and Worker replicas; torchrun re-rendezvouses, no restart from
scratch), `suspend` (the job's `runPolicy.suspend`) and `checkpoint.keep` (flows to the
trainer through the stage ConfigMap). Everything else that can change is in the
ConfigMap too; `model`, `data` and `stages` are immutable (CEL), see core.immutable_problems.

A Kueue-managed job (scheduling.queueName: the queue label) is the exception: its
`runPolicy.suspend` is Kueue's to write (admission sets it false, eviction and preemption
true), so no patch here ever touches it. `spec.suspend` goes to Kueue's Workload instead
(`workload_patch`): `spec.active: false` makes Kueue evict the job (suspend it) and keep
it out of the queue until `active` is true again, as `kueuectl stop workload` does;
suspending the job itself would not hold, as Kueue un-suspends a suspended job whose
Workload is admitted (jobframework/reconciler.go, ReconcileGenericJob step 7).
"""

from __future__ import annotations

from vlm_api.cluster import KUEUE_QUEUE_LABEL


# The live PyTorchJob fields a day-2 change touches: all `job_patch` compares, and all of a
# job's spec the watch cache keeps (registry.slim_job).
SCALE_PATHS = (("spec", "elasticPolicy", "minReplicas"), ("spec", "elasticPolicy", "maxReplicas"),
               ("spec", "pytorchReplicaSpecs", "Worker", "replicas"))
SUSPEND_PATH = ("spec", "runPolicy", "suspend")
LIVE_PATHS = (*SCALE_PATHS, SUSPEND_PATH)


def get_path(obj: dict | None, *path: str):
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def set_path(obj: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = value


def job_patch(live: dict, desired: dict) -> dict | None:
    """A merge patch that brings the live job's scale and suspension to the desired ones."""
    patch: dict = {}
    for path in SCALE_PATHS:
        want = get_path(desired, *path)
        if want is not None and get_path(live, *path) != want:
            set_path(patch, path, want)
    if kueue_managed(desired):
        return patch or None
    want = bool(get_path(desired, *SUSPEND_PATH))
    if bool(get_path(live, *SUSPEND_PATH)) != want:
        set_path(patch, SUSPEND_PATH, want)
    return patch or None


# Kueue labels the Workload it makes for a job with the job's uid (jobframework.ConstructWorkload).
KUEUE_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"


def workload_patch(workload: dict | None, suspend: bool) -> dict | None:
    """A merge patch that makes a Kueue Workload's `spec.active` follow `spec.suspend`."""
    if workload is None:
        return None
    active = get_path(workload, "spec", "active")
    active = True if active is None else bool(active)  # Kueue's default
    return {"spec": {"active": not suspend}} if active == suspend else None


def kueue_managed(job: dict | None) -> bool:
    return bool(get_path(job, "metadata", "labels", KUEUE_QUEUE_LABEL))


def describe(patch: dict, desired: dict) -> list[tuple[str, str]]:
    """(reason, message) Events for a job patch."""
    out = []
    spec = patch.get("spec", {})
    if "elasticPolicy" in spec or "pytorchReplicaSpecs" in spec:
        ep = get_path(desired, "spec", "elasticPolicy") or {}
        replicas = get_path(desired, "spec", "pytorchReplicaSpecs", "Worker", "replicas")
        out.append(("Rescaled", f"nodes {ep.get('minReplicas')}..{ep.get('maxReplicas')}, Worker replicas {replicas} (in place)"))
    if "runPolicy" in spec:
        out.append(("Suspended", "job suspended") if spec["runPolicy"]["suspend"] else ("Resumed", "job resumed"))
    return out


def configmap_patch(live: dict, desired: dict) -> dict | None:
    if (live.get("data") or {}) != (desired.get("data") or {}):
        return {"data": desired.get("data") or {}}
    return None

"""Reconcile one run: observe, let the pure core decide, carry the decision out.

Whatever triggers it (kopf create/resume/update handlers, a PyTorchJob event, the
scrape/resync loop, a backoff wake-up), a reconcile of a run runs under that run's lock:

1. validate the spec (three layers of vlm_api, cached per spec digest) and, when the spec
   changed, compare its immutable parts with the running stage's ConfigMap;
2. observe: is the PyTorchJob (and PodMonitor) CRD served, the current job (from the
   watch cache, else GET), the stage ConfigMap (only when the spec changed);
3. `core.decide()`;
4. create children (owner references via `kopf.adopt`, 409 = already there), patch
   live objects (rescale / suspend / config), write status through `/status` only,
   post Events.

Order matters for restarts: children are created before status records them, and child
names are a pure function of (run, stage, attempt); a restart between the two steps
re-decides the same names and finds them (409). So no child is ever created twice.

Handlers translate outcomes to kopf: an invalid spec is `PermanentError` (no retry storm),
waiting (CRD missing, retry backoff, API unavailable) is `TemporaryError(delay=...)`.
Event-driven paths never raise: they schedule a wake-up instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import time
from typing import Any, Callable

import kopf

from vlm_api import render, schema as s, stage_policy

from . import config, core, day2, kube, metrics
from . import status as st
from .registry import REGISTRY, Key, RunState

log = logging.getLogger(__name__)

RUN_KIND = kube.KINDS["VLMPretrainRun"]
# Refusals that retrying the same request will not fix by itself: shown in status, retried slowly.
REFUSED = {400: "ChildRejected", 403: "Forbidden", 422: "ChildRejected"}


def run_logger(namespace: str, name: str) -> logging.LoggerAdapter:
    """Structured logs: kopf's formatters show k8s_ref as the object (JSON) or a prefix."""
    ref = {"apiVersion": RUN_KIND.api_version, "kind": "VLMPretrainRun", "namespace": namespace, "name": name}
    return logging.LoggerAdapter(log, {"k8s_ref": ref, "run": name, "run_namespace": namespace})


# One thread validates, one spec at a time: validation is pure-Python CPU work, so more
# threads would only contend for the GIL with the event loop (which then waits longer).
_VALIDATION = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-validate")


async def _problems(state: RunState, run: dict) -> list[str]:
    """The run's validation problems: computed once per spec generation (cached on the
    run's state under `generation <n>`, or the spec's digest for a body without one), in a
    worker thread: validation is CPU work (a maximal spec takes tens of ms) and must not
    stall the event loop that serves every other run, the watches and /healthz."""
    spec = run.get("spec")
    meta = run.get("metadata") or {}
    gen = meta.get("generation")
    key = f"generation {gen}" if isinstance(gen, int) and not isinstance(gen, bool) else None
    cached = state.validated
    if key is not None and cached is not None and cached[0] == key:
        return list(cached[1])

    def work() -> tuple[str, list[str]]:
        k = key or core.digest(spec)
        if cached is not None and cached[0] == k:
            return cached
        return k, core.check_spec(spec, name=meta.get("name"))

    state.validated = await asyncio.get_running_loop().run_in_executor(_VALIDATION, work)
    return list(state.validated[1])


def _with_status(run: dict, status: dict) -> dict:
    out = dict(run)
    out["status"] = status
    return out


async def _observe(client: kube.Client, run: dict, state: RunState, problems: list[str], job: dict | None,
                   check_drift: bool) -> tuple[core.Observed, list[str]]:
    cfg = config.CONFIG
    meta = run["metadata"]
    ns = meta.get("namespace") or "default"
    status = state.current_status
    obs = core.Observed(check_drift=check_drift, sample=state.sample, scrape_error=state.scrape_error)
    if problems:
        return obs, problems
    try:
        spec = s.VLMPretrainRunSpec.model_validate(run.get("spec"))
    except Exception:
        return obs, problems  # the core reports it
    obs.pytorchjob_crd = await client.served("PyTorchJob", cfg.discovery_ttl)
    if spec.metrics.pod_monitor:
        obs.podmonitor_crd = await client.served("PodMonitor", cfg.discovery_ttl)
    job_name = status.get("jobName")
    if job_name and obs.pytorchjob_crd and status.get("phase") not in ("Succeeded", "Failed"):
        if job is not None and job.get("metadata", {}).get("name") == job_name:
            obs.job = job
        else:
            obs.job = REGISTRY.jobs.get((ns, job_name)) or await client.get("PyTorchJob", ns, job_name)
        if obs.job is not None:
            _ensure_ours(obs.job, meta.get("uid"))
    obs.stores = REGISTRY.stores_of(ns, meta["name"], meta.get("uid"))
    if obs.job is not None and st.job_state(obs.job).state == "Succeeded":
        obs.confirmation = await _confirmation(client, obs.job, status["stage"])
    if spec.elastic.external_store and status.get("stage") and status.get("phase") not in ("Succeeded", "Failed"):
        store = render.store_name(meta["name"], status["stage"], status.get("attempt") or 0)
        obs.store = REGISTRY.stores.get((ns, store)) or await client.get("Deployment", ns, store)
        if obs.store is not None:
            _ensure_ours(obs.store, meta.get("uid"))
    # Also while suspended: Kueue makes the Workload after the job, and would admit it.
    if (check_drift or spec.suspend) and obs.job is not None and spec.scheduling.queue_name:
        obs.workload = await _workload(client, obs.job, cfg.discovery_ttl)
    if check_drift and job_name and status.get("stage"):
        cm = await client.get("ConfigMap", ns, render.config_name(meta["name"], status["stage"]))
        if cm is not None:  # a day-2 patch never touches an object we do not own
            _ensure_ours(cm, meta.get("uid"))
        obs.configmap = cm
        problems = problems + core.immutable_problems(spec, core.running_spec(cm))
    return obs, problems


async def _workload(client: kube.Client, job: dict, ttl: float) -> dict | None:
    """Kueue's Workload of a job (None when Kueue is not installed or has made none yet)."""
    if not await client.served("Workload", ttl):
        return None
    meta = job.get("metadata") or {}
    found = await client.list("Workload", meta.get("namespace"), f"{day2.KUEUE_JOB_UID_LABEL}={meta.get('uid')}")
    return found[0] if found else None


async def _confirmation(client: kube.Client, job: dict, stage: str) -> dict | None:
    """The final checkpoint a pod of this job confirmed in its termination message. Only
    pods the job owns count: a pod that merely carries the run's labels confirms nothing."""
    meta = job["metadata"]
    pods = await client.list("Pod", meta.get("namespace"), f"{JOB_NAME_LABEL}={meta['name']}")
    messages = []
    for pod in pods:
        if not any(r.get("uid") == meta.get("uid") for r in (pod.get("metadata") or {}).get("ownerReferences") or []):
            continue
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") == "pytorch":
                for state in (cs.get("state"), cs.get("lastState")):
                    messages.append(((state or {}).get("terminated") or {}).get("message"))
    return stage_policy.confirmed_final(messages, stage)


# The Kubeflow training operator labels every pod of a job with the job's name.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"


def _owned_by(obj: dict, uid: str | None) -> bool:
    """Whether `obj` carries an ownerReference to the run with this uid. An object without
    one is not ours, whatever its name and labels say: someone else made it."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


class ChildConflict(kube.ApiError):
    """A child's name is taken by an object this run does not own: never adopted, patched
    or deleted; the run is Degraded (reason ChildConflict) until it is gone."""

    def __init__(self, obj: dict):
        meta = obj.get("metadata") or {}
        owners = [f"{r.get('kind')}/{r.get('name')}" for r in meta.get("ownerReferences") or [] if isinstance(r, dict)]
        whose = f"owned by {', '.join(owners)}" if owners else "with no ownerReference"
        super().__init__(409, "ChildConflict",
                         f"{obj.get('kind', 'object')} {meta.get('namespace', '')}/{meta.get('name')} already exists, {whose}: "
                         "this run does not adopt or change it; delete or rename it and the run continues")


def _ensure_ours(obj: dict, uid: str | None) -> None:
    if not _owned_by(obj, uid):
        raise ChildConflict(obj)


async def _create(client: kube.Client, run: dict, obj: dict) -> None:
    kopf.adopt(obj, owner=run)
    if obj["kind"] == "PodMonitor" and config.CONFIG.podmonitor_labels:
        labels = obj["metadata"].setdefault("labels", {})
        for k, v in config.CONFIG.podmonitor_labels.items():
            labels.setdefault(k, v)
    stored, created = await client.create(obj)
    if not created:  # 409: ours from an earlier reconcile (names are deterministic), or someone else's
        stored.setdefault("kind", obj["kind"])
        _ensure_ours(stored, run["metadata"].get("uid"))


async def _delete(client: kube.Client, uid: str | None, kind: str, ns: str, name: str) -> bool:
    """Delete a child of ours, and only if it is ours (the name of an ended attempt's store
    may since have been taken by someone else's object): the uid precondition makes the
    check and the delete one step."""
    live = await client.get(kind, ns, name)
    if live is None:
        return False
    if not _owned_by(live, uid):
        log.warning("not deleting %s %s/%s: it is not owned by the run", kind, ns, name)
        return False
    return await client.delete(kind, ns, name, uid=(live.get("metadata") or {}).get("uid"))


async def reconcile(key: Key, *, body: dict | None = None, job: dict | None = None, trigger: str = "event",
                    check_drift: bool = False, unchanged: Callable[[RunState], bool] | None = None
                    ) -> core.Decision | None:
    """One reconcile of one run. Raises kube.ApiError when the API keeps failing.
    ``unchanged(state)``, asked once the run's lock is held (so after any reconcile in
    flight has written its status), tells an event that brings nothing new: no reconcile."""
    client = kube.client()
    state = REGISTRY.get(*key)
    if body is not None:
        state.see(body)
    rlog = run_logger(*key)
    started = time.perf_counter()
    async with state.lock:
        if unchanged is not None and state.body is not None and unchanged(state):
            return None
        try:
            run = state.body
            if run is None:
                run = await client.get("VLMPretrainRun", *key)
                if run is None:
                    REGISTRY.drop(key)
                    return None
                state.see(run)
                run = state.body
            run.setdefault("apiVersion", RUN_KIND.api_version)
            run.setdefault("kind", "VLMPretrainRun")
            before = state.current_status
            gen = (run.get("metadata") or {}).get("generation")
            # Compare live objects with the spec when it changed (or was refused: an Invalid
            # verdict about immutable fields must be re-derived, not forgotten).
            drift = check_drift or gen != before.get("observedGeneration") or before.get("phase") == "Invalid"
            problems = await _problems(state, run)
            view = _with_status(run, before)
            now = datetime.datetime.now(datetime.timezone.utc)
            try:
                obs, problems = await _observe(client, view, state, problems, job, drift)
            except ChildConflict as exc:
                obs, decision = None, core.blocked(view, "ChildConflict", exc.message, now)
            else:
                if obs.job is not None and st.job_state(obs.job).finished:
                    obs.failed_seen = state.failed_seen.setdefault(obs.job["metadata"]["name"], now)
                decision = core.decide(view, problems, obs, now)

            uid = (run.get("metadata") or {}).get("uid")
            try:
                for obj in decision.create:
                    try:
                        await _create(client, run, obj)
                    except kube.ResourceMissing:
                        client.forget(obj["kind"])
                        if obj["kind"] == "PyTorchJob":
                            obs.pytorchjob_crd = False
                            decision = core.decide(view, problems, obs, now)
                            break
                        rlog.info("%s not served: %s %s skipped", obj["kind"], obj["kind"], obj["metadata"]["name"])
                for kind, ns, name, patch in decision.patch:
                    try:
                        await client.patch(kind, ns, name, patch)
                    except kube.NotFound:
                        rlog.info("%s %s vanished before it could be patched", kind, name)
                for kind, ns, name in decision.delete:
                    if await _delete(client, uid, kind, ns, name):
                        rlog.info("removed %s %s (its attempt or stage ended)", kind, name)
            except ChildConflict as exc:
                decision = core.blocked(view, "ChildConflict", exc.message, now)
            except kube.ApiError as exc:
                reason = REFUSED.get(exc.status)
                if reason is None:
                    raise
                decision = core.blocked(view, reason, f"the API server refused a child: {exc}", now)

            diff = core.status_patch(before, decision.status)
            if diff:
                try:
                    await client.patch_status("VLMPretrainRun", key[0], key[1], diff)
                except kube.NotFound:
                    REGISTRY.drop(key)
                    return None
                state.status = decision.status
            if decision.status.get("jobName") != before.get("jobName"):
                state.sample, state.scrape_error = None, None
            if obs is not None and obs.job is not None:
                state.last_job = (obs.job["metadata"].get("name"), st.job_state(obs.job).state)
            elif decision.create:  # its ADDED event (no conditions yet) brings nothing new
                state.last_job = (decision.status.get("jobName"), "Pending")
            moved = before.get("phase") != decision.status.get("phase")
            transition = f" (phase {before.get('phase')} -> {decision.status.get('phase')}, {trigger})" if moved else ""
            for type_, reason, message in decision.events:
                await client.post_event(run, type_, reason, message)
                (rlog.warning if type_ == "Warning" else rlog.info)("%s: %s%s", reason, message, transition)
                transition = ""
            if transition:
                rlog.info("phase %s -> %s (%s)", before.get("phase"), decision.status.get("phase"), trigger)
            metrics.RECONCILES.labels(result=decision.result).inc()
            return decision
        except Exception:
            metrics.RECONCILES.labels(result="error").inc()
            raise
        finally:
            metrics.HANDLER_DURATION.labels(handler=f"reconcile:{trigger}").observe(time.perf_counter() - started)


# ---------------------------------------------------------------------------- entry points


async def on_change(body: Any, trigger: str) -> None:
    """kopf create/resume/update handlers: raise kopf's errors so kopf retries or stops."""
    raw = _plain(body)
    meta = raw.get("metadata") or {}
    key = (meta.get("namespace") or "default", meta.get("name") or "")
    try:
        decision = await reconcile(key, body=raw, trigger=trigger, check_drift=True)
    except kube.ApiError as exc:
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=config.CONFIG.api_retry) from exc
    if decision is None:
        return
    if decision.invalid:
        raise kopf.PermanentError(f"invalid spec: {decision.invalid}")
    if decision.wait:
        raise kopf.TemporaryError(decision.wait_reason or "waiting", delay=max(0.05, decision.wait))


async def poke(key: Key, *, job: dict | None = None, trigger: str = "event",
               unchanged: Callable[[RunState], bool] | None = None) -> None:
    """Event-driven reconcile: never raises; waits become scheduled wake-ups."""
    cfg = config.CONFIG
    try:
        decision = await reconcile(key, job=job, trigger=trigger, unchanged=unchanged)
    except kube.ApiError as exc:
        run_logger(*key).warning("reconcile (%s) failed, retrying in %.1fs: %s", trigger, cfg.api_retry, exc)
        REGISTRY.schedule(key, cfg.api_retry, _wake)
        return
    except Exception:
        run_logger(*key).exception("reconcile (%s) failed, retrying in %.1fs", trigger, cfg.api_retry)
        REGISTRY.schedule(key, cfg.api_retry, _wake)
        return
    if decision is not None and decision.wait:
        REGISTRY.schedule(key, decision.wait, _wake)


async def _wake(key: Key) -> None:
    await poke(key, trigger="wake")


async def on_job_event(event_type: str | None, body: Any) -> None:
    """A PyTorchJob of ours changed: reconcile its run if it is the run's current job."""
    job = _plain(body)
    REGISTRY.observe_job(event_type, job)
    if event_type == "DELETED":
        return  # GC of a deleted run, or a manual delete (the resync loop re-creates it)
    meta = job.get("metadata") or {}
    run_name = (meta.get("labels") or {}).get(render.LABEL_RUN)
    if not run_name:
        return
    key = (meta.get("namespace") or "default", run_name)
    state = REGISTRY.runs.get(key)
    seen = (meta.get("name"), st.job_state(job).state)

    def old_news(state: RunState) -> bool:
        if state.current_status.get("jobName") not in (None, meta.get("name")):
            return True  # an earlier attempt or stage: history, not news
        # e.g. replica counts moved, or our own create echoed back: the job's state did not change
        return not _owned_by(job, state.uid) or state.last_job == seen

    if state is not None and state.body is not None and old_news(state):
        return
    await poke(key, job=job, trigger="job", unchanged=old_news)


async def on_store_event(event_type: str | None, body: Any) -> None:
    """A rendezvous-store Deployment of ours changed (e.g. readyReplicas): reconcile its run
    (RendezvousReady)."""
    store = _plain(body)
    REGISTRY.observe_store(event_type, store)
    if event_type == "DELETED":
        return
    meta = store.get("metadata") or {}
    run_name = (meta.get("labels") or {}).get(render.LABEL_RUN)
    key = (meta.get("namespace") or "default", run_name)
    state = REGISTRY.runs.get(key) if run_name else None
    if state is None or state.body is None or not _owned_by(store, state.uid):
        return
    ready = st.rendezvous_ready(store)

    def shown(state: RunState) -> bool:  # the status already says what this event says
        cond = core.condition(state.current_status, "RendezvousReady")
        return (cond.get("status"), cond.get("reason")) == (ready.status, ready.reason)

    await poke(key, trigger="store", unchanged=shown)


def _plain(body: Any) -> dict:
    """A plain dict of a kopf body. Shallow: kopf builds a fresh body per watch event and
    nothing here mutates nested values (only top-level keys are ever set)."""
    return dict(body) if body is not None else {}

"""Reconcile one VLMPretrainSweep: validate, list its runs, let `sweep_plan` decide, act.

Triggers: kopf's create/resume/update handlers of the sweep, and every event of a run
labelled with a sweep (its phase moved, its final losses arrived). Reconciles of one
sweep never overlap (a lock per sweep; an event during a reconcile asks for one more
pass), so "at most maxConcurrent active" is decided on a fresh list of the runs each time.

Restarts: child names are a pure function of (sweep, point, seed) and creation treats
409 AlreadyExists as done, so a reconcile repeated by a new operator process finds the
runs the old one created. Deleting a sweep deletes its runs through their owner
references (and theirs, their jobs); checkpoints in object storage are never touched.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
from typing import Any

import kopf

from vlm_api import sweep as sw

from . import config, kube, sweep_plan

log = logging.getLogger(__name__)

Key = tuple[str, str]
_LOCKS: dict[Key, asyncio.Lock] = {}
_AGAIN: set[Key] = set()
# Per child run (ns, name): what its last event said that a sweep reports (`_news`).
_SEEN: dict[Key, tuple] = {}
# Child names found held by someone else's run (409 on create, not owned): per sweep.
_TAKEN: dict[Key, set[str]] = {}
# Validation is CPU work (every point is a run spec): once per name and spec.
_PROBLEMS: dict[str, list[str]] = {}


def _validate(sweep: dict) -> list[str]:
    from vlm_api.sweep_validate import validate_sweep_object

    return [str(p) for p in validate_sweep_object(sweep)]


async def _problems(sweep: dict) -> list[str]:
    meta = sweep.get("metadata") or {}
    body = {k: sweep[k] for k in ("apiVersion", "kind", "spec") if k in sweep}
    body["metadata"] = {"name": meta.get("name"), "namespace": meta.get("namespace")}
    key = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    if key not in _PROBLEMS:
        if len(_PROBLEMS) > 1024:
            _PROBLEMS.clear()
        _PROBLEMS[key] = await asyncio.to_thread(_validate, body)
    return _PROBLEMS[key]


async def _act(client: kube.Client, sweep: dict, ns: str) -> bool:
    """One pass; True when it found a taken name (its slot goes to the next point: another pass)."""
    name, uid = sweep["metadata"]["name"], sweep["metadata"].get("uid")
    now = datetime.datetime.now(datetime.timezone.utc)
    problems = await _problems(sweep)
    conflict = False
    if problems:
        status = sweep_plan.invalid(sweep, "; ".join(problems)[:1000], now)
    else:
        from vlm_api.sweep_validate import with_defaults

        sweep = dict(sweep, spec=with_defaults(sweep["spec"]))
        runs = await client.list("VLMPretrainRun", ns, label_selector=f"{sw.LABEL_SWEEP}={name}")
        taken = _TAKEN.setdefault((ns, name), set())
        plan = sweep_plan.plan(sweep, runs, now, frozenset(taken))
        for run, value in [(r, True) for r in plan.suspend] + [(r, False) for r in plan.resume]:
            await client.patch("VLMPretrainRun", ns, run, {"spec": {"suspend": value}})
        for manifest in plan.create:
            kopf.adopt(manifest, owner=sweep)
            run = manifest["metadata"]["name"]
            stored, created = await client.create(manifest)
            if created:
                log.info("sweep %s/%s: started run %s", ns, name, run)
                await client.post_event(sweep, "Normal", "RunStarted", f"run {run} created")
            elif not any(r.get("uid") == uid for r in (stored.get("metadata") or {}).get("ownerReferences") or []):
                taken.add(run)
                conflict = True
                await client.post_event(sweep, "Warning", "RunConflict",
                                        f"a VLMPretrainRun named {run} exists and is not this sweep's: point skipped")
                continue
            runs.append(stored)
        status = sweep_plan.plan(sweep, runs, now, frozenset(taken)).status if plan.create else plan.status
    old = sweep.get("status") or {}
    if any(old.get(k) != v for k, v in status.items()):
        await client.patch_status("VLMPretrainSweep", ns, name, status)
        if status["phase"] != old.get("phase") and status["phase"] in ("Succeeded", "Failed", "Invalid"):
            ready = next((c for c in status["conditions"] if c["type"] == "Ready"), {})
            await client.post_event(sweep, "Normal" if status["phase"] == "Succeeded" else "Warning",
                                    f"Sweep{status['phase']}", ready.get("message", ""))
    return conflict


async def reconcile(ns: str, name: str, body: dict | None = None) -> None:
    """One pass (or more, while events arrive) over the sweep ns/name."""
    key = (ns, name)
    lock = _LOCKS.setdefault(key, asyncio.Lock())
    if lock.locked():
        _AGAIN.add(key)
        return
    async with lock:
        while True:
            _AGAIN.discard(key)
            client = kube.client()
            sweep = body if body is not None else await client.get("VLMPretrainSweep", ns, name)
            body = None  # later passes read the sweep fresh
            if sweep is None:
                _LOCKS.pop(key, None)
                _TAKEN.pop(key, None)
                return
            if await _act(client, sweep, ns):
                _AGAIN.add(key)
            if key not in _AGAIN:
                return


def reset() -> None:
    """Forget per-sweep state (a new operator process in the same interpreter: tests)."""
    _LOCKS.clear()
    _AGAIN.clear()
    _TAKEN.clear()
    _SEEN.clear()


async def on_change(body: Any) -> None:
    """kopf create/resume/update handlers of a sweep: API errors are retried by kopf."""
    raw = dict(body)
    meta = raw.get("metadata") or {}
    try:
        await reconcile(meta.get("namespace") or "default", meta.get("name") or "", raw)
    except kube.ApiError as exc:
        raise kopf.TemporaryError(f"Kubernetes API: {exc}", delay=config.CONFIG.api_retry) from exc


def _news(event_type: str | None, run: dict) -> tuple:
    """What of a run a sweep reports or acts on: a status write of metrics alone is no news."""
    status, spec = run.get("status") or {}, run.get("spec") or {}
    finals = json.dumps(status.get("finalCheckpoints"), sort_keys=True)
    return event_type == "DELETED", status.get("phase"), finals, spec.get("suspend")


async def on_run_event(event_type: str | None, body: Any) -> None:
    """A run labelled with a sweep changed (or was deleted): reconcile that sweep, unless
    nothing the sweep shows changed (a run's status moves with every scrape). Never raises."""
    run = dict(body) if body is not None else {}
    meta = run.get("metadata") or {}
    name = (meta.get("labels") or {}).get(sw.LABEL_SWEEP)
    if not name:
        return
    ns = meta.get("namespace") or "default"
    news, key = _news(event_type, run), (ns, meta.get("name") or "")
    if _SEEN.get(key) == news:
        return
    if event_type == "DELETED":
        _SEEN.pop(key, None)
    else:
        _SEEN[key] = news
    await _reconcile_or_retry(ns, name, f"a {event_type} run event")


async def _reconcile_or_retry(ns: str, name: str, why: str) -> None:
    try:
        await reconcile(ns, name)
    except kube.ApiError as exc:
        delay = config.CONFIG.api_retry
        log.warning("sweep %s/%s: reconcile after %s failed, retrying in %.1fs: %s", ns, name, why, delay, exc)
        loop = asyncio.get_running_loop()
        loop.call_later(delay, lambda: loop.create_task(_reconcile_or_retry(ns, name, "a failed reconcile")))

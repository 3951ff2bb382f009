"""In-memory state of one operator process: what it knows about each run and job.

Only one operator replica runs (Deployment `replicas: 1`, strategy `Recreate`), so this
process is the only writer of `VLMPretrainRun.status`: the status it last wrote is
authoritative, fresher than what the watch stream has delivered back. After a restart
the cache is empty and the status read from the API server takes over.

The PyTorchJob and rendezvous-store Deployment bodies delivered by the watches serve as
informer caches (no GET per reconcile). Every cached body is cut down to what the operator
reads (`slim_*`): a job's pod template, a run's managedFields and kopf's annotation (a second
copy of its spec) are never read; a cached PyTorchJob is ~3 KB of Python objects, not ~17 KB.
Per-run locks serialise every reconcile of a run, whatever triggered it (kopf handler, job
event, scrape/resync loop, backoff wake-up).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Iterator

from vlm_api.render import LABEL_ATTEMPT, LABEL_RUN, LABEL_STAGE

from . import day2

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)


def _gen(body: dict | None) -> int:
    try:
        return int(((body or {}).get("metadata") or {}).get("generation") or 0)
    except (TypeError, ValueError):
        return 0


def _rv(body: dict | None) -> int:
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


# Metadata the operator reads: identity, ordering, ownership, and labels (kopf.adopt copies
# the owner's labels onto its children).
_META = ("name", "namespace", "uid", "generation", "resourceVersion", "labels", "ownerReferences")


def _slim_meta(body: dict) -> dict:
    meta = body.get("metadata") or {}
    return {k: meta[k] for k in _META if k in meta}


def slim_run(body: dict) -> dict:
    """A run as cached: everything but metadata it never reads (managedFields, annotations)."""
    out = {k: v for k, v in body.items() if k != "metadata"}
    out["metadata"] = _slim_meta(body)
    return out


def slim_job(body: dict) -> dict:
    """A PyTorchJob as cached: identity, status and the fields a day-2 change compares."""
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": _slim_meta(body),
           "status": body.get("status") or {}}
    for path in day2.LIVE_PATHS:
        value = day2.get_path(body, *path)
        if value is not None:
            day2.set_path(out, path, value)
    return out


def slim_store(body: dict) -> dict:
    """A rendezvous-store Deployment as cached: identity and status (readyReplicas)."""
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": _slim_meta(body),
            "status": body.get("status") or {}}


@dataclasses.dataclass
class RunState:
    namespace: str
    name: str
    uid: str | None = None
    body: dict | None = None  # the latest body seen (metadata + spec; its status may be stale)
    status: dict | None = None  # the status this process last wrote
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    wake: asyncio.TimerHandle | None = None
    sample: Any = None  # latest scrape.Sample of the current job
    scrape_error: str | None = None
    scrape_slot: int | None = None  # the scrape period this run was last scraped in (scrape.tick)
    resync_slot: int | None = None  # the resync period it was last re-checked in
    validated: tuple[str, list[str]] | None = None  # (spec digest, problems)
    failed_seen: dict[str, Any] = dataclasses.field(default_factory=dict)  # job name -> when first seen Failed
    last_job: tuple[str | None, str] | None = None  # (job name, job state) the last reconcile acted on

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def current_status(self) -> dict:
        if self.status is not None:
            return self.status
        return dict(((self.body or {}).get("status")) or {})

    @property
    def phase(self) -> str | None:
        return self.current_status.get("phase")

    def see(self, body: dict) -> None:
        """Remember a body if it is at least as new as the one we have."""
        uid = (body.get("metadata") or {}).get("uid")
        if uid and self.uid and uid != self.uid:  # deleted and re-created under the same name
            self.reset(uid)
        self.uid = uid or self.uid
        if self.body is None or (_gen(body), _rv(body)) >= (_gen(self.body), _rv(self.body)):
            self.body = slim_run(body)

    def reset(self, uid: str | None) -> None:
        self.uid, self.body, self.status, self.sample, self.validated = uid, None, None, None, None
        self.last_job = None
        self.scrape_error = None


class Registry:
    def __init__(self) -> None:
        self.runs: dict[Key, RunState] = {}
        self.jobs: dict[Key, dict] = {}  # (namespace, job name) -> latest PyTorchJob body
        self.stores: dict[Key, dict] = {}  # (namespace, Deployment name) -> latest rendezvous-store body
        self._tasks: set[asyncio.Task] = set()

    def reset(self) -> None:
        for state in self.runs.values():
            if state.wake is not None:
                state.wake.cancel()
        self.runs.clear()
        self.jobs.clear()
        self.stores.clear()
        self._tasks.clear()

    def get(self, namespace: str, name: str) -> RunState:
        key = (namespace, name)
        state = self.runs.get(key)
        if state is None:
            state = self.runs[key] = RunState(namespace, name)
        return state

    def observe_run(self, event_type: str | None, body: dict) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        if event_type == "DELETED":
            self.drop(key)
            return
        self.get(*key).see(body)

    def observe_job(self, event_type: str | None, body: dict) -> None:
        _observe_child(self.jobs, event_type, body, slim_job)

    def stores_of(self, namespace: str, run: str, uid: str | None) -> tuple[tuple[str, str, int], ...]:
        """(name, stage, attempt) of the cached rendezvous-store Deployments a run owns."""
        out = []
        for (ns, name), body in self.stores.items():
            meta = body.get("metadata") or {}
            labels = meta.get("labels") or {}
            owned = any(r.get("uid") == uid for r in meta.get("ownerReferences") or [])
            if ns == namespace and labels.get(LABEL_RUN) == run and uid and owned:
                attempt = labels.get(LABEL_ATTEMPT, "")
                out.append((name, labels.get(LABEL_STAGE, ""), int(attempt) if attempt.isdigit() else 0))
        return tuple(sorted(out))

    def observe_store(self, event_type: str | None, body: dict) -> None:
        _observe_child(self.stores, event_type, body, slim_store)

    def drop(self, key: Key) -> None:
        state = self.runs.pop(key, None)
        if state is not None and state.wake is not None:
            state.wake.cancel()

    def phases(self) -> Iterator[tuple[str, str, str]]:
        for (namespace, name), state in list(self.runs.items()):
            phase = state.phase
            if phase:
                yield namespace, name, phase

    # ------------------------------------------------------------------ wake-ups

    def schedule(self, key: Key, delay: float, fn: Callable[[Key], Awaitable[Any]]) -> None:
        """Call `fn(key)` once after `delay` seconds (replacing an earlier wake-up of the run)."""
        state = self.runs.get(key)
        if state is None:
            return
        if state.wake is not None:
            state.wake.cancel()
        loop = asyncio.get_running_loop()
        state.wake = loop.call_later(max(0.0, delay), self._spawn, key, fn)

    def _spawn(self, key: Key, fn: Callable[[Key], Awaitable[Any]]) -> None:
        state = self.runs.get(key)
        if state is not None:
            state.wake = None
        self.spawn(fn(key))

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background reconcile failed", exc_info=task.exception())

    async def drain(self) -> None:
        for state in self.runs.values():
            if state.wake is not None:
                state.wake.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _observe_child(cache: dict[Key, dict], event_type: str | None, body: dict, slim: Callable[[dict], dict]) -> None:
    """An informer cache entry: the newest (slimmed) body per (namespace, name), gone on DELETED."""
    meta = body.get("metadata") or {}
    key = (meta.get("namespace") or "default", meta.get("name") or "")
    if event_type == "DELETED":
        cache.pop(key, None)
    elif _rv(body) >= _rv(cache.get(key)):
        cache[key] = slim(body)


REGISTRY = Registry()

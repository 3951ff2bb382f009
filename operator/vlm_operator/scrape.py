"""Rank-0 metrics -> run status, and the operator's periodic loop.

The trainer's global rank 0 serves Prometheus text on `spec.metrics.port`. Every
`VLM_OPERATOR_SCRAPE_INTERVAL` seconds the loop finds the current job's worker pods by
their labels (`pretrain.vlm.dev/run|stage|attempt`), keeps those the job owns (the run
owns the job; see scrape_job), tries them in the order torchrun
ranks nodes (sorted pod names: the first holds global rank 0; the other nodes answer with
only `vlmtrain_node_info`, passed over), reads `http://<podIP>:<port>/metrics` in a thread
and parses it with `prometheus_client.parser`. What it reads lands in status (step, tokens, loss,
measured image-token fraction, world size, elastic restarts, last committed checkpoint).
A failed scrape only changes the Progressing condition's message.

The same loop re-checks every active run every `VLM_OPERATOR_RESYNC_INTERVAL` seconds
(level-triggered safety net for missed events). It is one task for all runs, not a kopf
timer per run: kopf timers need a finalizer, and this operator has none. Each run has a
fixed phase within both periods (a hash of its name), and the loop wakes
`1/SLICES` of the shorter period apart: 1,000 runs are scraped ~1/10 at a time, not in one
burst of pod LISTs, scrapes and status PATCHes every 30 s (nor all at once after an
operator restart).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import math
import time
import urllib.request
import zlib
from typing import Any

from vlm_api import render

from . import config, metrics
from .registry import REGISTRY, RunState

log = logging.getLogger(__name__)

MAX_PODS_TRIED = 4


class ScrapeError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Sample:
    job: str = ""  # the PyTorchJob the sample came from
    step: int | None = None
    tokens: int | None = None
    loss: float | None = None
    image_token_fraction: float | None = None
    world_size: int | None = None
    restarts: int | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    checkpoint_uri: str | None = None


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(value: Any) -> int | None:
    v = _finite(value)
    return int(v) if v is not None and v >= 0 else None


def parse(text: str, job: str = "") -> Sample:
    """Prometheus text exposition -> Sample. Raises ScrapeError when it is not a trainer's."""
    from prometheus_client.parser import text_string_to_metric_families

    seen: dict[str, float] = {}
    tokens: float | None = None
    uri: str | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == "vlmtrain_tokens_total":
                    v = _finite(value)
                    if v is not None:
                        tokens = (tokens or 0.0) + v
                elif name in ("vlmtrain_checkpoint_last_info", "vlmtrain_checkpoint_last"):
                    if labels.get("uri") and (_finite(value) or 0) >= 1:
                        uri = labels["uri"]
                else:
                    seen[name] = value
    except Exception as exc:  # the parser raises ValueError and friends on malformed text
        raise ScrapeError(f"unparsable metrics: {exc}") from None
    if "vlmtrain_steps_total" not in seen:
        raise ScrapeError("no vlmtrain_steps_total in the response (not the trainer's rank 0?)")
    fraction = _finite(seen.get("vlmtrain_image_token_ratio"))
    ckpt_time = _finite(seen.get("vlmtrain_checkpoint_last_success_timestamp_seconds"))
    return Sample(
        job=job,
        step=_int(seen.get("vlmtrain_steps_total")),
        tokens=_int(tokens),
        loss=_finite(seen.get("vlmtrain_loss")),
        image_token_fraction=min(1.0, max(0.0, fraction)) if fraction is not None else None,
        world_size=_int(seen.get("vlmtrain_world_size")),
        restarts=_int(seen.get("vlmtrain_elastic_restart_count")),
        checkpoint_step=_int(seen.get("vlmtrain_checkpoint_last_step")),
        checkpoint_time=ckpt_time if ckpt_time and ckpt_time > 0 else None,
        checkpoint_uri=uri,
    )


def apply(status: dict, sample: Sample, stage: str, prefix: str) -> None:
    """Write a sample into a status dict (camelCase, the CRD's status fields)."""
    for key, value in (
        ("step", sample.step),
        ("tokens", sample.tokens),
        ("loss", sample.loss),
        ("imageTokenFraction", sample.image_token_fraction),
        ("worldSize", sample.world_size),
        ("restarts", sample.restarts),
    ):
        if value is not None:
            status[key] = value
    committed = sample.checkpoint_uri is not None or sample.checkpoint_time is not None
    if sample.checkpoint_step is not None and committed:
        ref: dict[str, Any] = {"uri": sample.checkpoint_uri or prefix, "step": sample.checkpoint_step, "stage": stage}
        if sample.checkpoint_time is not None:
            when = datetime.datetime.fromtimestamp(sample.checkpoint_time, datetime.timezone.utc)
            ref["time"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        status["lastCheckpoint"] = ref


# ---------------------------------------------------------------------------- I/O


def _fetch(url: str, timeout: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # pods are never behind a proxy
    with opener.open(url, timeout=timeout) as resp:
        if resp.status != 200:
            raise ScrapeError(f"{url}: HTTP {resp.status}")
        return resp.read(8 * 1024 * 1024).decode("utf-8", "replace")


def _pod_order(pod: dict) -> str:
    """torchrun's order: the rendezvous ranks nodes by sorted host name (a worker pod's host
    name is its pod name), so global rank 0 runs on the first pod of the current round,
    `-worker-0` while it is there, else e.g. `-worker-1` before `-worker-10` before `-worker-2`."""
    return (pod.get("metadata") or {}).get("name", "")


def _owned_by(obj: dict, uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(isinstance(r, dict) and r.get("uid") == uid for r in refs)


async def _job_uid(client, namespace: str, job: str, run_uid: str | None) -> str:
    """The uid of the run's current PyTorchJob (watch cache, else GET), if the run owns it."""
    body = REGISTRY.jobs.get((namespace, job)) or await client.get("PyTorchJob", namespace, job)
    if body is None:
        raise ScrapeError(f"PyTorchJob {job} not found")
    if not _owned_by(body, run_uid):
        raise ScrapeError(f"PyTorchJob {job} is not owned by the run: not scraped")
    return (body.get("metadata") or {}).get("uid") or ""


async def scrape_job(client, namespace: str, run: str, stage: str, attempt: int, job: str, port: int,
                     timeout: float, run_uid: str | None = None) -> Sample:
    """Rank 0's metrics of the run's current job. Labels only find candidates: a pod counts
    only when the job owns it (ownerReference to the job's uid, set by the Kubeflow
    controller), since anyone who can create pods in the namespace can copy labels, and what
    rank 0 reports lands in status (lastCheckpoint names where a retry resumes)."""
    wanted = render.labels({"name": run}, stage, attempt)
    selector = ",".join(f"{k}={wanted[k]}" for k in (render.LABEL_RUN, render.LABEL_STAGE, render.LABEL_ATTEMPT))
    pods = await client.list("Pod", namespace, selector)
    pods = [
        p for p in pods
        if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
               for k, v in wanted.items() if k != "app.kubernetes.io/managed-by")
        and (p.get("status") or {}).get("podIP")
    ]
    if not pods:
        raise ScrapeError(f"no worker pod of {job} has an IP yet")
    job_uid = await _job_uid(client, namespace, job, run_uid)
    pods = [p for p in pods if _owned_by(p, job_uid)]
    if not pods:
        raise ScrapeError(f"no pod owned by {job} has an IP yet (pods that only carry its labels are ignored)")
    errors = []
    for pod in sorted(pods, key=_pod_order)[:MAX_PODS_TRIED]:
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{port}/metrics"
        try:
            text = await asyncio.to_thread(_fetch, url, timeout)
            return parse(text, job)
        except (OSError, ScrapeError, ValueError) as exc:
            errors.append(f"{pod['metadata'].get('name')}: {getattr(exc, 'reason', None) or exc}")
    raise ScrapeError("; ".join(errors))


async def scrape_state(state: RunState, client) -> bool:
    """Scrape one run's current job into `state`; True when the sample or error changed."""
    from vlm_api import schema as s

    status = state.current_status
    body = state.body or {}
    job, stage = status.get("jobName"), status.get("stage")
    if not job or not stage:
        return False
    try:
        port = s.Metrics.model_validate((body.get("spec") or {}).get("metrics") or {}).port
    except Exception:
        port = s.Metrics().port
    attempt = status.get("attempt") if isinstance(status.get("attempt"), int) else 0
    try:
        sample = await scrape_job(client, state.namespace, state.name, stage, attempt, job, port,
                                  config.CONFIG.scrape_timeout, run_uid=state.uid)
    except Exception as exc:  # any failure is a message, never a crash
        metrics.SCRAPES.labels(result="error").inc()
        error = str(exc) or type(exc).__name__
        changed = error != state.scrape_error
        state.scrape_error = error
        return changed
    metrics.SCRAPES.labels(result="ok").inc()
    changed = sample != state.sample or state.scrape_error is not None
    state.sample, state.scrape_error = sample, None
    return changed


SCRAPED_PHASES = ("Running",)
ACTIVE_PHASES = ("Pending", "Running", "Suspended", None)


SLICES = 10  # loop wake-ups per (shorter) period


def phase_offset(state: RunState) -> float:
    """The run's fixed place in every period, in [0, 1): stable across operator restarts."""
    return zlib.crc32(f"{state.namespace}/{state.name}".encode()) / 2**32


def slot(now: float, interval: float, offset: float) -> int:
    """Which period `now` falls in, for a run whose periods start at `offset` * `interval`."""
    return math.floor(now / interval - offset)


async def tick(client, poke, now: float | None = None) -> None:
    """One pass over all runs: scrape the running ones whose scrape is due, re-check what is
    due. A run is due once per period, at its own phase; a run seen for the first time waits
    for its phase (at most one period), so a restarted operator does not burst either."""
    cfg = config.CONFIG
    now = time.monotonic() if now is None else now
    sem = asyncio.Semaphore(32)

    async def one(state: RunState) -> None:
        phase = state.phase
        if phase not in ACTIVE_PHASES:
            return
        offset = phase_offset(state)
        scrape_slot = slot(now, cfg.scrape_interval, offset)
        resync_slot = slot(now, cfg.resync_interval, offset)
        if state.scrape_slot is None:
            state.scrape_slot = scrape_slot
        if state.resync_slot is None:
            state.resync_slot = resync_slot
        changed = False
        if phase in SCRAPED_PHASES and scrape_slot != state.scrape_slot:
            state.scrape_slot = scrape_slot
            async with sem:
                changed = await scrape_state(state, client)
        if changed or resync_slot != state.resync_slot:
            state.resync_slot = resync_slot
            await poke(state.key, trigger="scrape" if changed else "resync")

    await asyncio.gather(*(one(st) for st in list(REGISTRY.runs.values())), return_exceptions=True)


async def loop(stop: asyncio.Event, client_fn, poke) -> None:
    """The operator-wide periodic task (started at startup, stopped at cleanup)."""
    while not stop.is_set():
        cfg = config.CONFIG
        period = max(0.05, min(cfg.scrape_interval, cfg.resync_interval) / SLICES)
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
            return
        except asyncio.TimeoutError:
            pass
        try:
            await tick(client_fn(), poke)
        except Exception:  # never let the loop die
            log.exception("scrape/resync pass failed")

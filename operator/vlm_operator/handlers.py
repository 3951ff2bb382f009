"""kopf handler registration only: `kopf run -m vlm_operator.handlers`.

Each handler is a thin adapter; the work happens in `reconcile` (carry out decisions),
`core` (pure decisions), `scrape` (periodic metrics + resync), `kube` (API calls).

No finalizer: there are no deletion handlers, daemons or kopf timers. Deleting a run
deletes its children through ownerReferences (Kubernetes garbage collection); checkpoints
in object storage are never touched.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from vlm_api import render, schema as s, sweep as sw

from . import config, kube, metrics, reconcile, scrape, sweep
from .registry import REGISTRY

RUN = (s.GROUP, s.VERSION, s.PLURAL)
SWEEP = (s.GROUP, s.VERSION, sw.PLURAL)
JOB = ("kubeflow.org", "v1", "pytorchjobs")
STORE = ("apps", "v1", "deployments")
PREFIX = s.GROUP

_loop_task: asyncio.Task | None = None
_loop_stop: asyncio.Event | None = None


def _timed(name: str):
    return metrics.HANDLER_DURATION.labels(handler=name).time()


class _QuietEventHandlers(logging.Filter):
    """kopf logs "Handler 'x' succeeded." at INFO for every watch event an on.event handler
    sees: for run_event that is a line per status write of every run, for job_event and
    store_event one per child change. Our own logs (vlm_operator.*) say what happened;
    failures of these handlers still log."""

    QUIET = ("Handler 'run_event' succeeded.", "Handler 'job_event' succeeded.", "Handler 'store_event' succeeded.",
             "Handler 'sweep_run_event' succeeded.")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and isinstance(record.msg, str) and record.msg in self.QUIET)


_QUIET = _QuietEventHandlers()


def apply_settings(settings: kopf.OperatorSettings) -> None:
    """kopf settings of this operator (also used by the benchmark's no-op baseline)."""
    # kopf's own bookkeeping lives in annotations under our group; status stays ours and
    # schema-valid (the CRD's status schema has no room for kopf's progress records).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{PREFIX}/operator"  # declared, never added (nothing requires one)
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = kube.COMPONENT
    # Only our PyTorchJobs and rendezvous stores come down their watches (server-side label
    # selectors), not every Deployment of the cluster.
    settings.watching.label_selectors[JOB[0], JOB[2]] = render.LABEL_RUN
    settings.watching.label_selectors[STORE[0], STORE[2]] = ",".join(
        [render.LABEL_RUN, *(f"{k}={v}" for k, v in render.STORE_COMPONENT.items())])
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.queueing.error_delays = (1, 2, 5, 10, 30, 60)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    global _loop_task, _loop_stop
    cfg = config.load()
    apply_settings(settings)
    # The validator (jsonschema + the CEL parser, ~0.5 s to build) is imported lazily by
    # `vlm_operator.core` so the CLI starts fast; an operator pays for it here, not on its first run.
    import vlm_api.validate  # noqa: F401
    if _QUIET not in logging.getLogger("kopf.objects").filters:
        logging.getLogger("kopf.objects").addFilter(_QUIET)
    REGISTRY.reset()
    sweep.reset()
    metrics.RUNS.source = REGISTRY.phases
    metrics.serve(cfg.metrics_port)
    _loop_stop = asyncio.Event()
    _loop_task = asyncio.create_task(scrape.loop(_loop_stop, kube.client, reconcile.poke), name="vlm-scrape-resync")
    logger.info("vlm-pretrain-operator started (scrape every %ss, resync every %ss)", cfg.scrape_interval, cfg.resync_interval)


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    global _loop_task
    if _loop_stop is not None:
        _loop_stop.set()
    if _loop_task is not None:
        await asyncio.gather(_loop_task, return_exceptions=True)
        _loop_task = None
    await REGISTRY.drain()
    kube.reset()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Like kubectl: in-cluster service account, else $KUBECONFIG / ~/.kube/config; the
    operator's own client (kube.py) is built from the same source."""
    cfg = kube.load_configuration()
    kube.configure(cfg)
    scheme, token = kube.bearer(cfg)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.probe(id="runs")
def runs_known(**_: Any) -> int:
    return len(REGISTRY.runs)


@kopf.on.event(*RUN)
async def run_event(event: dict, body: kopf.Body, **_: Any) -> None:
    # async: kopf runs a sync handler in its thread pool, a hand-off per watch event of every run
    REGISTRY.observe_run(event.get("type"), dict(body))


@kopf.on.resume(*RUN)
async def resume(body: kopf.Body, **_: Any) -> None:
    with _timed("resume"):
        await reconcile.on_change(body, "resume")


@kopf.on.create(*RUN)
async def create(body: kopf.Body, **_: Any) -> None:
    with _timed("create"):
        await reconcile.on_change(body, "create")


@kopf.on.update(*RUN, field="spec")
async def update(body: kopf.Body, **_: Any) -> None:
    with _timed("update"):
        await reconcile.on_change(body, "update")


@kopf.on.event(*JOB, labels={render.LABEL_RUN: kopf.PRESENT})
async def job_event(event: dict, body: kopf.Body, **_: Any) -> None:
    with _timed("job_event"):
        await reconcile.on_job_event(event.get("type"), body)


@kopf.on.event(*STORE, labels=render.STORE_COMPONENT)
async def store_event(event: dict, body: kopf.Body, **_: Any) -> None:
    """The rendezvous store's readiness (RendezvousReady)."""
    with _timed("store_event"):
        await reconcile.on_store_event(event.get("type"), body)


# ---- sweeps (vlm_operator.sweep): a sweep's runs are VLMPretrainRuns labelled with it
@kopf.on.resume(*SWEEP)
@kopf.on.create(*SWEEP)
@kopf.on.update(*SWEEP, field="spec")
async def sweep_change(body: kopf.Body, **_: Any) -> None:
    with _timed("sweep"):
        await sweep.on_change(body)


@kopf.on.event(*RUN, labels={sw.LABEL_SWEEP: kopf.PRESENT})
async def sweep_run_event(event: dict, body: kopf.Body, **_: Any) -> None:
    with _timed("sweep_run_event"):
        await sweep.on_run_event(event.get("type"), body)

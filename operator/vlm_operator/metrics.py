"""The operator's own Prometheus metrics (`vlmoperator_` prefix), served on :8080/metrics.

- `vlmoperator_reconciles_total{result}`: success | invalid | waiting | error
- `vlmoperator_runs{phase}`: runs this operator knows, by phase (every phase always present)
- `vlmoperator_run_phase{namespace,name,phase}`: 1 for each run's current phase (the alerts
  and the dashboard join on it)
- `vlmoperator_api_errors_total{verb,resource,code}`: failed API calls (each try counts)
- `vlmoperator_handler_duration_seconds{handler}`: histogram of handler/reconcile time
- `vlmoperator_scrapes_total{result}`: rank-0 metric scrapes, ok | error

Everything lives in `REGISTRY` (not the process-global default), so tests can read values
and several operators in one test process do not collide.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid")

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter("vlmoperator_reconciles", "Reconciles of VLMPretrainRuns by result.", ["result"], registry=REGISTRY)
API_ERRORS = Counter(
    "vlmoperator_api_errors", "Failed Kubernetes API calls (each try).", ["verb", "resource", "code"], registry=REGISTRY
)
HANDLER_DURATION = Histogram(
    "vlmoperator_handler_duration_seconds",
    "Time spent in one handler invocation (reconcile included).",
    ["handler"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
SCRAPES = Counter("vlmoperator_scrapes", "Scrapes of rank-0 trainer metrics by result.", ["result"], registry=REGISTRY)


class _RunCollector:
    """Phases are read at scrape time from the operator's run registry: no stale series
    for deleted runs, exactly one `run_phase` series per run."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, str]]] = lambda: ()

    def describe(self):
        return []

    def collect(self):
        runs = GaugeMetricFamily("vlmoperator_runs", "VLMPretrainRuns by phase.", labels=["phase"])
        per_run = GaugeMetricFamily(
            "vlmoperator_run_phase", "1 for the current phase of each VLMPretrainRun.", labels=["namespace", "name", "phase"]
        )
        counts = dict.fromkeys(PHASES, 0)
        for namespace, name, phase in list(self.source()):
            counts[phase] = counts.get(phase, 0) + 1
            per_run.add_metric([namespace, name, phase], 1)
        for phase, n in counts.items():
            runs.add_metric([phase], n)
        yield runs
        yield per_run


RUNS = _RunCollector()
REGISTRY.register(RUNS)

_server_lock = threading.Lock()
_served_port: int | None = None


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the /metrics server once per process (0 disables)."""
    global _served_port
    if not port:
        return
    with _server_lock:
        if _served_port is None:
            try:
                start_http_server(port, addr=addr, registry=REGISTRY)
            except OSError as exc:  # e.g. the port is taken: run without /metrics rather than not at all
                logging.getLogger(__name__).error("cannot serve /metrics on port %s: %s", port, exc)
                return
            _served_port = port


def value(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's current value (0 when absent), for tests and the benchmark."""
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0

"""Operator settings: environment variables with production defaults.

Tests shorten the intervals through the same variables (they are read at operator
startup, so every KopfRunner picks up the test's environment).

| variable | default | meaning |
|---|---|---|
| `VLM_OPERATOR_METRICS_PORT` | 8080 | port of the operator's own `/metrics` (0 disables) |
| `VLM_OPERATOR_SCRAPE_INTERVAL` | 30 | seconds between scrapes of each running job's rank-0 metrics |
| `VLM_OPERATOR_SCRAPE_TIMEOUT` | 5 | seconds one scrape may take |
| `VLM_OPERATOR_RESYNC_INTERVAL` | 300 | seconds between level-triggered re-checks of every active run |
| `VLM_OPERATOR_RETRY_BACKOFF` | 30 | seconds before the first retry of a failed stage job (doubles per attempt) |
| `VLM_OPERATOR_RETRY_BACKOFF_MAX` | 900 | cap of that backoff |
| `VLM_OPERATOR_CRD_RETRY` | 60 | seconds between checks while the PyTorchJob CRD is missing |
| `VLM_OPERATOR_API_RETRY` | 10 | seconds before a handler retries after the API server kept failing |
| `VLM_OPERATOR_DISCOVERY_TTL` | 30 | seconds a discovery answer (is a CRD installed?) is cached |
| `VLM_PODMONITOR_LABELS` | "" | `k=v,k2=v2` labels added to every PodMonitor (e.g. `release=kube-prometheus-stack`) |
| `VLM_OPERATOR_METRICS_NAMESPACES` | `monitoring` | `ns1,ns2`: namespaces whose pods may reach the workers' metrics port (each run's NetworkPolicy); the operator's own namespace is always added |
| `POD_NAMESPACE` | `vlm-system` | the operator's namespace (the Deployment sets it from the downward API) |
"""

from __future__ import annotations

import dataclasses
import os


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def _labels(raw: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in raw.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _names(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """`a,b` -> ("a", "b"); unset -> default; set but empty -> () (only the operator's own)."""
    if raw is None:
        return default
    return tuple(sorted({part.strip() for part in raw.split(",") if part.strip()}))


@dataclasses.dataclass(frozen=True)
class Config:
    metrics_port: int = 8080
    scrape_interval: float = 30.0
    scrape_timeout: float = 5.0
    resync_interval: float = 300.0
    retry_backoff: float = 30.0
    retry_backoff_max: float = 900.0
    crd_retry: float = 60.0
    api_retry: float = 10.0
    discovery_ttl: float = 30.0
    podmonitor_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics_namespaces: tuple[str, ...] = ("monitoring",)
    namespace: str = "vlm-system"

    @property
    def metrics_sources(self) -> tuple[str, ...]:
        """Namespaces allowed to the workers' metrics port: Prometheus's and the operator's
        own (it scrapes rank 0 for status)."""
        return tuple(sorted({*self.metrics_namespaces, self.namespace} - {""}))

    @classmethod
    def from_env(cls) -> "Config":
        d = cls()
        return cls(
            metrics_port=int(_float("VLM_OPERATOR_METRICS_PORT", d.metrics_port)),
            scrape_interval=_float("VLM_OPERATOR_SCRAPE_INTERVAL", d.scrape_interval),
            scrape_timeout=_float("VLM_OPERATOR_SCRAPE_TIMEOUT", d.scrape_timeout),
            resync_interval=_float("VLM_OPERATOR_RESYNC_INTERVAL", d.resync_interval),
            retry_backoff=_float("VLM_OPERATOR_RETRY_BACKOFF", d.retry_backoff),
            retry_backoff_max=_float("VLM_OPERATOR_RETRY_BACKOFF_MAX", d.retry_backoff_max),
            crd_retry=_float("VLM_OPERATOR_CRD_RETRY", d.crd_retry),
            api_retry=_float("VLM_OPERATOR_API_RETRY", d.api_retry),
            discovery_ttl=_float("VLM_OPERATOR_DISCOVERY_TTL", d.discovery_ttl),
            podmonitor_labels=_labels(os.environ.get("VLM_PODMONITOR_LABELS", "")),
            metrics_namespaces=_names(os.environ.get("VLM_OPERATOR_METRICS_NAMESPACES"), d.metrics_namespaces),
            namespace=os.environ.get("POD_NAMESPACE", "").strip() or d.namespace,
        )


# Replaced at operator startup (handlers.startup); the defaults serve pure-function callers.
CONFIG = Config()


def load() -> Config:
    global CONFIG
    CONFIG = Config.from_env()
    return CONFIG

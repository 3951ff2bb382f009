"""Every PromQL query of the Grafana dashboard, ready to send to a real Prometheus.

    from tests.support.dashboard_queries import dashboard_queries
    for q in dashboard_queries(run="demo"):
        ...  # GET /api/v1/query?query=<q.expr>; expect >= 1 series unless q.needs_gpu_exporter

Grafana template variables are substituted: ``$vlmrun`` / ``${vlmrun}`` -> the run
name, ``$__rate_interval`` / ``$__interval`` -> ``rate_interval`` (default ``1m``),
``$__range`` -> ``range_`` (default ``1h``). Any other ``$variable`` left in an
expression raises ``ValueError`` (the caller should never send Grafana syntax to
Prometheus).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "manifests" / "grafana" / "vlm-training.json"

# Metrics that come from exporters which do not run on CPU-only test machines.
GPU_EXPORTER_METRICS = ("DCGM_",)
# Metrics that need kube-state-metrics (not running against a local trainer).
CLUSTER_EXPORTER_METRICS = ("kube_",)

_VAR = re.compile(r"\$(\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class PanelQuery:
    panel_id: int
    panel_title: str
    ref_id: str
    raw_expr: str          # as stored in the dashboard
    expr: str              # with template variables substituted
    legend: str
    needs_gpu_exporter: bool        # DCGM metrics: exempt where no GPU exporter runs
    needs_cluster_exporters: bool   # kube-state-metrics series: exempt outside a cluster

    @property
    def exempt_locally(self) -> bool:
        """True for queries that cannot return data against a local (no cluster, no GPU) run."""
        return self.needs_gpu_exporter or self.needs_cluster_exporters


def load_dashboard(path: str | Path | None = None) -> dict:
    return json.loads(Path(path or DASHBOARD).read_text())


def iter_panels(dashboard: dict):
    """All panels, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        for sub in panel.get("panels", []) or []:
            yield sub


def substitute(expr: str, run: str, rate_interval: str = "1m", range_: str = "1h",
               extra: dict[str, str] | None = None) -> str:
    values = {
        "vlmrun": run,
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": range_,
        **(extra or {}),
    }

    def repl(m: re.Match) -> str:
        name = m.group(2) or m.group(3)
        if name not in values:
            raise ValueError(f"unknown template variable ${name} in {expr!r}")
        return values[name]

    return _VAR.sub(repl, expr)


def dashboard_queries(run: str, rate_interval: str = "1m", path: str | Path | None = None,
                      range_: str = "1h", extra: dict[str, str] | None = None) -> list[PanelQuery]:
    """Every target expression of every panel (rows skipped), substituted for *run*."""
    out: list[PanelQuery] = []
    for panel in iter_panels(load_dashboard(path)):
        if panel.get("type") == "row":
            continue
        for target in panel.get("targets", []):
            raw = target.get("expr", "")
            if not raw or target.get("hide"):
                continue
            out.append(PanelQuery(
                panel_id=panel.get("id"),
                panel_title=panel.get("title", ""),
                ref_id=target.get("refId", ""),
                raw_expr=raw,
                expr=substitute(raw, run, rate_interval, range_, extra),
                legend=target.get("legendFormat", ""),
                needs_gpu_exporter=any(m in raw for m in GPU_EXPORTER_METRICS),
                needs_cluster_exporters=any(m in raw for m in CLUSTER_EXPORTER_METRICS),
            ))
    return out


def panel_exprs(run: str, rate_interval: str = "1m") -> dict[str, list[str]]:
    """{panel title: [substituted expr, ...]}: a compact view for assertions and messages."""
    result: dict[str, list[str]] = {}
    for q in dashboard_queries(run, rate_interval):
        result.setdefault(q.panel_title, []).append(q.expr)
    return result


if __name__ == "__main__":  # python -m tests.support.dashboard_queries RUN
    import sys

    for q in dashboard_queries(sys.argv[1] if len(sys.argv) > 1 else "demo"):
        flag = " [exempt locally]" if q.exempt_locally else ""
        print(f"{q.panel_title} / {q.ref_id}{flag}\n  {q.expr}")

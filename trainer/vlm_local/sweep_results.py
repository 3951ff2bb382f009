"""A local sweep's results: `results.json`, `results.md` (mean and spread over seeds) and
`results.png` (the objective against each swept parameter: seeds as points, mean as a line).

`results.json` is `{"sweep", "objective", "points": [{"name", "parameters", "seed", "run",
"status", "validationLoss", "stages", "tokens", "wallSeconds"}], "best"}`; `best` is the
operator's choice (`vlm_api.sweep_grid.best`): the point with the best mean over its
succeeded seeds.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from vlm_api import sweep_grid


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def table(sweep: dict, points: list[dict]) -> str:
    """Markdown: one row per grid point, each modality's final validation loss of the
    objective's stage as mean ± sample standard deviation over the succeeded seeds."""
    spec = sweep["spec"]
    objective = spec["objective"]
    paths = [p["path"] for p in spec.get("parameters") or []]
    modalities = sorted({m for p in points for m in (p.get("validationLoss") or {})})
    best = sweep_grid.best(points, objective)
    grounded = any("grounding" in p for p in points)
    head = [*paths, "seeds ok", *(f"{m} val. loss" for m in modalities)]
    head += ["grounding: mismatched / true image", ""] if grounded else [""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(p["name"], []).append(p)
    for name, runs in groups.items():
        ok = [r for r in runs if r.get("status") == "succeeded"]
        cells = [_show(runs[0]["parameters"].get(path)) for path in paths]
        cells.append(f"{len(ok)}/{len(runs)}")
        cells += [_fmt([r["validationLoss"][m] for r in ok if m in (r.get("validationLoss") or {})]) for m in modalities]
        if grounded:
            cells.append(_fmt([r["grounding"]["ratio"] for r in ok if "grounding" in r]))
        cells.append("**best**" if best and best["name"] == name else "")
        lines.append("| " + " | ".join(cells) + " |")
    goal = "lowest" if objective.get("goal", "minimize") == "minimize" else "highest"
    lines.append("")
    lines.append(f"Objective: {goal} mean {objective['modality']} validation loss at the end of stage "
                 f"{objective['stage']}, over seeds {spec.get('seeds')} (mean ± sample standard deviation).")
    if grounded:
        lines.append("Grounding: caption loss with a mismatched image / with the true image at the same checkpoint "
                     "(1.0: the image is ignored).")
    return "\n".join(lines) + "\n"


def plot(sweep: dict, points: list[dict], path: Path) -> Path | None:
    """One panel per swept parameter: the objective of every succeeded run (seeds as
    points) and the mean per value (a line); non-numeric values are placed in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = sweep["spec"]
    objective = spec["objective"]
    params = spec.get("parameters") or []
    if not params:
        return None
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.6), squeeze=False)
    for ax, param in zip(axes[0], params):
        values = param["values"]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = {json.dumps(v, sort_keys=True): (v if numeric else i) for i, v in enumerate(values)}
        by_x: dict[float, list[float]] = {}
        for p in points:
            y = sweep_grid.objective_value(p, objective)
            if y is None:
                continue
            x = xs[json.dumps(p["parameters"][param["path"]], sort_keys=True)]
            by_x.setdefault(x, []).append(y)
            ax.scatter([x], [y], color="tab:blue", alpha=0.6, s=18)
        if by_x:
            mx = sorted(by_x)
            ax.plot(mx, [statistics.fmean(by_x[x]) for x in mx], color="tab:orange", marker="o", label="mean over seeds")
            ax.legend(fontsize=8)
        if not numeric:
            ax.set_xticks(list(range(len(values))), [_show(v)[:18] for v in values], rotation=20, fontsize=7)
        ax.set_xlabel(param["path"], fontsize=9)
        ax.set_ylabel(f"{objective['modality']} val. loss ({objective['stage']})", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {sweep['metadata']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(root: Path, sweep: dict, points: list[dict]) -> list[Path]:
    objective = sweep["spec"]["objective"]
    body = {"sweep": sweep["metadata"]["name"], "objective": objective, "points": points,
            "best": sweep_grid.best(points, objective)}
    written = [root / "results.json", root / "results.md"]
    written[0].write_text(json.dumps(body, indent=2) + "\n")
    written[1].write_text(table(sweep, points))
    try:
        png = plot(sweep, points, root / "results.png")
    except ImportError:  # matplotlib comes with the trainer extra
        png = None
    return written + ([png] if png else [])

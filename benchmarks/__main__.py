"""``python -m benchmarks``: run the area benchmarks and write the results.

    python -m benchmarks all [--quick] [--only AREA ...] [--out DIR] [--no-readme]
    python -m benchmarks area AREA [--quick] [--json FILE]      # one area, in this process
    python -m benchmarks gpu [--quick] [--out DIR]               # the GPU section (torchrun-able)
    python -m benchmarks merge FILE...                           # fold area results into latest.json
    python -m benchmarks readme                                  # latest.json -> latest.md + README
    python -m benchmarks list

``all`` runs every area in its own subprocess (a crash, hang or leak of one cannot touch
the others or the harness; each has a time limit), one after another (never two at once:
they would measure each other). An area whose module is missing or fails is recorded with
``status`` ``missing``/``error``/``timeout``; the harness still writes its files and exits 0
unless ``--strict``.

Files (``--out``, default ``benchmarks/results``): ``<timestamp>.json`` (this invocation),
``latest.json`` (the newest result of *every* area: a run with ``--only`` replaces just its
areas), ``latest.md`` (the tables). With the default directory and without ``--quick`` the
README section between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` is regenerated.
A ``--quick`` run into the default directory writes ``latest-quick.*`` instead, so smoke
figures never replace the committed full ones.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import harness

RESULTS = harness.REPO / "benchmarks" / "results"
# Run order: cheap first; the GPU section last (it skips itself without CUDA).
AREAS = ("trainer_overhead", "data_loader", "checkpoint", "elastic_recovery", "operator_reconcile", "packing", "gpu")
NOT_AREAS = {"harness", "__main__", "__init__"}
# Seconds an area may run before it is stopped (full, quick).
DEFAULT_LIMITS = {"full": 420, "quick": 120}


def discover() -> list[str]:
    """The known areas in their order, then any other ``benchmarks/<name>.py`` module."""
    here = Path(__file__).parent
    found = [m.name for m in pkgutil.iter_modules([str(here)]) if not m.ispkg and m.name not in NOT_AREAS
             and not m.name.startswith("_")]
    return list(AREAS) + sorted(n for n in found if n not in AREAS)


def module_exists(name: str) -> bool:
    return (Path(__file__).parent / f"{name}.py").exists()


# --------------------------------------------------------------------------- one area


def run_area_inprocess(name: str, quick: bool) -> dict:
    """Import ``benchmarks.<name>`` and call ``run(quick)``; never raises."""
    t0 = time.perf_counter()
    record: dict = {"area": name, "quick": quick}
    if not module_exists(name):
        record.update(status="missing", error=f"benchmarks/{name}.py does not exist yet", figures=[])
        return record
    try:
        mod = importlib.import_module(f"benchmarks.{name}")
        if not hasattr(mod, "run"):
            raise AttributeError(f"benchmarks.{name} has no run(quick) function")
        result = harness.normalize_area(mod.run(quick))
        record.update(result)
        record.setdefault("status", "ok")
    except BaseException as exc:  # noqa: BLE001 - an area's failure is data, not a crash
        if isinstance(exc, KeyboardInterrupt):
            raise
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                      figures=record.get("figures", []))
    record["duration_s"] = round(time.perf_counter() - t0, 2)
    return record


def run_area_subprocess(name: str, quick: bool, limit: float, wait_idle: float = 0.0) -> dict:
    """Run one area in a fresh interpreter with a time limit."""
    if not module_exists(name):
        return {"area": name, "quick": quick, "status": "missing", "figures": [], "duration_s": 0.0,
                "error": f"benchmarks/{name}.py does not exist yet"}
    idle = harness.wait_idle(wait_idle, log=lambda m: print(m, end=" ", flush=True)) if wait_idle else None
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        out = Path(tmp) / "area.json"
        cmd = [sys.executable, "-m", "benchmarks", "area", name, "--json", str(out)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        log = Path(tmp) / "log.txt"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(cmd, cwd=harness.REPO, stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": _pythonpath()}, start_new_session=True)
            monitor = harness.CpuMonitor(proc.pid).start()
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc = None
            contention = monitor.stop()
        duration = round(time.perf_counter() - t0, 2)
        tail = log.read_text(errors="replace")[-4000:]
        if out.exists():
            try:
                record = json.loads(out.read_text())
            except ValueError as exc:
                record = {"area": name, "status": "error", "error": f"unreadable result: {exc}", "figures": []}
        else:
            record = {"area": name, "status": "timeout" if rc is None else "error", "figures": [],
                      "error": (f"stopped after {limit:.0f} s" if rc is None else f"exited {rc} without a result")}
        if record.get("status") != "ok":
            record["log_tail"] = tail
        if rc is None and record.get("status") == "ok":
            record["status"] = "timeout"
        record["duration_s"] = duration
        record["quick"] = quick
        record["contention"] = {**contention, **({"wait_idle": idle} if idle else {}),
                                "loadavg_after": list(os.getloadavg())}
        share = contention.get("foreign_cpu_share")
        if isinstance(record.get("contended"), bool):
            # the area measured contention per pair and left contended pairs out itself
            record["contention"]["area_verdict"] = "clean pairs only" if not record["contended"] else "contended"
        else:
            record["contended"] = bool(share is not None and share > harness.CONTENDED)
        return record


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def _pythonpath() -> str:
    parts = [str(harness.REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:
        pass
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the whole run


def combine(areas: dict[str, dict], *, quick: bool, command: str, started: float, run_id: str,
            machine: dict) -> dict:
    for rec in areas.values():
        rec.setdefault("run_id", run_id)
        # the commit the area's own process saw (its tree may have changed since the harness started)
        rec.setdefault("git", (rec.get("machine") or {}).get("git") or machine.get("git"))
        rec.setdefault("command", f"python -m benchmarks all --only {rec['area']}" + (" --quick" if quick else ""))
    return {
        "schema": harness.SCHEMA,
        "run_id": run_id,
        "quick": quick,
        "command": command,
        "machine": machine,
        "duration_s": round(time.time() - started, 2),
        "areas": areas,
        "targets": harness.evaluate(areas),
    }


def _keep_old(old: dict | None, new: dict) -> bool:
    """Whether latest.json should keep ``old`` rather than take ``new`` for one area.

    A failed or contended re-run never replaces a good clean figure; a clean one replaces a
    contended one; otherwise the newer run wins (an older file merged later does not)."""
    if not old:
        return False
    old_ok = old.get("status") == "ok" and bool(old.get("figures"))
    new_ok = new.get("status") == "ok" and bool(new.get("figures"))
    if old_ok and not new_ok and new.get("status") != "skipped":
        return True
    if old_ok and new_ok and not old.get("contended") and new.get("contended"):
        return True
    if old_ok and new_ok and old.get("contended") and not new.get("contended"):
        return False
    return str(new.get("run_id") or "") < str(old.get("run_id") or "")


def merge_latest(previous: dict | None, current: dict) -> dict:
    """latest.json keeps every area's best recent result (see :func:`_keep_old`)."""
    areas = dict((previous or {}).get("areas", {}))
    for name, rec in current["areas"].items():
        old = areas.get(name)
        if _keep_old(old, rec):
            old = dict(old)
            old["last_attempt"] = {k: rec.get(k) for k in ("run_id", "status", "error", "contended", "git")}
            areas[name] = old
        else:
            areas[name] = rec
    merged = dict(current)
    merged["areas"] = {k: areas[k] for k in sorted(areas, key=lambda n: (AREAS + (n,)).index(n))}
    merged["targets"] = harness.evaluate(merged["areas"])
    return merged


def cmd_all(args) -> int:
    started = time.time()
    run_id = harness.timestamp()
    names = discover()
    if args.only:
        unknown = [n for n in args.only if n not in names]
        names = [n for n in args.only]  # unknown ones are reported as missing
        if unknown:
            print(f"note: no module for {', '.join(unknown)} (reported as missing)", file=sys.stderr)
    mode = "quick" if args.quick else "full"
    limit = args.limit or DEFAULT_LIMITS[mode]
    machine = harness.machine_info()
    print(f"benchmarks ({mode}): {', '.join(names)} on {machine['cpu_count']} x {machine['cpu_model']}, "
          f"torch {machine.get('torch')}, commit {machine['git'].get('short')}", flush=True)
    areas = {}
    for name in names:
        print(f"[{name}] ...", end=" ", flush=True)
        rec = run_area_subprocess(name, args.quick, limit, args.wait_idle) if not args.in_process else run_area_inprocess(name, args.quick)
        areas[name] = rec
        summary = ", ".join(f"{f['name']}={harness.fmt(f.get('value'), f.get('unit', ''))}" for f in rec.get("figures", [])[:6])
        busy = (rec.get("contention") or {}).get("foreign_cpu_share")
        print(f"{rec['status']} in {rec.get('duration_s', 0):.1f}s" + (f": {summary}" if summary else "")
              + (f" [contended: other processes used {100 * busy:.0f}% of the CPU]" if rec.get("contended") else "")
              + (f" ({rec.get('error')})" if rec.get("status") not in ("ok",) and rec.get("error") else ""), flush=True)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = combine(areas, quick=args.quick, command=command, started=started, run_id=run_id, machine=machine)

    out = Path(args.out).resolve() if args.out else RESULTS
    default_out = out == RESULTS.resolve()
    prefix = "latest-quick" if (args.quick and default_out) else "latest"
    write_json(out / f"{run_id}{'-quick' if args.quick else ''}.json", result)
    latest_path = out / f"{prefix}.json"
    previous = _load(latest_path)
    latest = merge_latest(previous, result) if previous and previous.get("schema") == harness.SCHEMA else result
    write_json(latest_path, latest)
    (out / f"{prefix}.md").write_text(harness.markdown(latest))
    if default_out and not args.quick and not args.no_readme:
        harness.update_readme(latest)
        bad = harness.update_docs(latest)
        print("README.md benchmark section and the figures quoted in README.md and docs/ regenerated"
              + (f"; unresolved: {bad}" if bad else ""), flush=True)
    print(f"wrote {out / (run_id + ('-quick' if args.quick else '') + '.json')}, {latest_path}, {out / (prefix + '.md')} "
          f"in {time.time() - started:.0f}s", flush=True)
    print(harness.targets_text(latest), flush=True)
    if args.strict and any(r.get("status") not in ("ok", "skipped") for r in areas.values()):
        return 1
    return 0


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cmd_area(args) -> int:
    rec = run_area_inprocess(args.name, args.quick)
    rec["machine"] = harness.machine_info()
    if args.json:
        write_json(Path(args.json), rec)
    else:
        print(json.dumps(rec, indent=2, default=_json_default))
    return 0 if rec["status"] in ("ok", "skipped") else 1


def cmd_gpu(args) -> int:
    from . import gpu

    return gpu.main(args)


def cmd_merge(args) -> int:
    """Fold area results (files written by ``area --json`` or ``gpu --out``) into latest.json."""
    latest_path = RESULTS / "latest.json"
    latest = _load(latest_path)
    if latest is None:
        latest = {"schema": harness.SCHEMA, "areas": {}, "machine": harness.machine_info(), "quick": False}
    for file in args.files:
        rec = json.loads(Path(file).read_text())
        if rec.get("cpu_smoke"):
            print(f"{file}: a CPU smoke run of the GPU benchmark, not merged", file=sys.stderr)
            continue
        if "areas" in rec:  # a whole run
            for name, area in rec["areas"].items():
                area.setdefault("machine", rec.get("machine"))
                latest = merge_latest(latest, {**latest, "areas": {name: area}})
        else:
            latest = merge_latest(latest, {**latest, "areas": {rec["area"]: rec}})
    write_json(latest_path, latest)
    (RESULTS / "latest.md").write_text(harness.markdown(latest))
    harness.update_readme(latest)
    bad = harness.update_docs(latest)
    if bad:
        print(f"unresolved figure references: {bad}", file=sys.stderr)
    print(harness.targets_text(latest))
    return 0


def cmd_readme(args) -> int:
    latest = _load(RESULTS / "latest.json")
    if latest is None:
        latest = {"schema": harness.SCHEMA, "areas": {}, "machine": harness.machine_info(), "quick": False,
                  "targets": harness.evaluate({})}
    (RESULTS / "latest.md").write_text(harness.markdown(latest))
    harness.update_readme(latest)
    bad = harness.update_docs(latest)
    if bad:
        print(f"unresolved figure references: {bad}", file=sys.stderr)
    print(harness.targets_text(latest))
    return 0


def cmd_list(args) -> int:
    for name in discover():
        print(f"{name:22s} {'present' if module_exists(name) else 'missing'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("all", help="run every area (or --only some) and write the results")
    p.add_argument("--quick", action="store_true", help="smoke mode: small sizes, few repeats (< 3 minutes)")
    p.add_argument("--only", nargs="+", metavar="AREA", help="run only these areas")
    p.add_argument("--out", help="results directory (default benchmarks/results)")
    p.add_argument("--limit", type=float, help="seconds per area before it is stopped")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each area wait up to SECONDS for other processes to use < 20%% of the CPU")
    p.add_argument("--no-readme", action="store_true", help="do not regenerate the README section")
    p.add_argument("--in-process", action="store_true", help="run areas in this process (debugging)")
    p.add_argument("--strict", action="store_true", help="exit 1 when an area did not finish ok")
    p.set_defaults(fn=cmd_all)
    p = sub.add_parser("area", help="run one area in this process")
    p.add_argument("name")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the record here instead of stdout")
    p.set_defaults(fn=cmd_area)
    p = sub.add_parser("gpu", help="the GPU section (CUDA only; skips otherwise); works under torchrun")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="directory for gpu-<timestamp>.json (default benchmarks/results)")
    p.add_argument("--only", nargs="+", choices=("vlm", "llm"), help="configurations to run")
    p.add_argument("--steps", type=int, help="measured steps per configuration")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU and step (default 8)")
    p.add_argument("--peak-tflops", type=float,
                   help="dense bf16 peak TFLOP/s per GPU, for a device the built-in table does not know")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="the same code path at toy size on CPU (the test suite runs this)")
    p.set_defaults(fn=cmd_gpu)
    p = sub.add_parser("merge", help="fold area/run JSON files into latest.json and the README")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("readme", help="regenerate latest.md and the README section from latest.json")
    p.set_defaults(fn=cmd_readme)
    p = sub.add_parser("list", help="the areas and whether their module exists")
    p.set_defaults(fn=cmd_list)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

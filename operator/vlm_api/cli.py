"""`vlmpretrain`: one command line for the API, the operator and local runs.

Subcommands import their implementation lazily, so `vlmpretrain validate` works in the
operator image (no torch) and `vlmpretrain local` does not load kopf.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from . import crd
from .local_arguments import local_arguments


def _cmd_crd(args: argparse.Namespace) -> int:
    if args.kind == "sweep":
        from .sweep_crd import SWEEP_CRD_FILE, sweep_crd_yaml

        text, default = sweep_crd_yaml(), SWEEP_CRD_FILE
    else:
        text, default = crd.crd_yaml(), crd.CRD_FILE
    if args.check:
        path = Path(args.output or default)
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run `vlmpretrain crd --kind {args.kind} -o {path}`", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _read(path: str) -> str:
    """A manifest's text, bounded (vlm_api.limits.read_manifest): ValueError or OSError
    with a short reason otherwise."""
    from .limits import read_manifest

    return read_manifest(path)


def _file_error(path: str, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{path}: <file>: {reason}"


def _cmd_validate(args: argparse.Namespace) -> int:
    from .sweep_validate import validate_any
    from .validate import Problem, deprecations, validate_text

    bad = 0
    for path in args.files:
        try:
            text = _read(path)
            problems = validate_text(text, validate_any)
        except (OSError, ValueError) as exc:
            print(_file_error(path, exc))
            bad += 1
            continue
        except Exception as exc:  # noqa: BLE001 - one line per file, never a traceback
            problems = [Problem("<file>", f"could not be checked ({type(exc).__name__}); please report this")]
        for p in problems:
            print(f"{path}: {p}")
        if problems:
            bad += 1
            continue
        for warning in deprecations(text):
            print(f"{path}: warning: {warning}", file=sys.stderr)
        if not args.quiet:
            print(f"{path}: valid", file=sys.stderr)
    return 1 if bad else 0


def _cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from .sweep_validate import validate_any
    from .validate import clean, load_documents, validate_text

    try:
        text = _read(args.file)
    except (OSError, ValueError) as exc:
        print(_file_error(args.file, exc), file=sys.stderr)
        return 1
    problems = validate_text(text, validate_any)
    if problems:
        for p in problems:
            print(f"{args.file}: {p}", file=sys.stderr)
        return 1
    try:
        objs = [o for doc in load_documents(text) for o in _render_doc(doc, args)]
    except (ValueError, KeyError) as exc:
        print(f"{args.file}: {clean(exc.args[0] if exc.args else exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"{args.file}: could not be rendered ({type(exc).__name__}); please report this", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(objs, sort_keys=False))
    return 0


def _render_doc(doc: dict, args: argparse.Namespace) -> list[dict]:
    """A run's objects for one stage; a sweep's child runs (vlm_api.sweep_grid)."""
    if doc.get("kind") == "VLMPretrainSweep":
        from .sweep_grid import children
        from .sweep_validate import with_defaults

        return [m for _, _, m in children(dict(doc, spec=with_defaults(doc["spec"])))]
    from .render import render_manifest

    return render_manifest(doc, args.stage, args.init_from, args.attempt)


def _cmd_local(args: argparse.Namespace) -> int:
    """A run's stages (vlm_local.runner), or a sweep's runs (vlm_local.sweep)."""
    from vlm_local.sweep import is_sweep

    if is_sweep(args.file):
        return _lazy("vlm_local.sweep:main")(args)
    if args.parallel:
        print("vlmpretrain local: --parallel applies to a VLMPretrainSweep", file=sys.stderr)
        return 2
    return _lazy("vlm_local.runner:main")(args)


def _lazy(target: str):
    """A subcommand implemented elsewhere: 'module:function', imported on use."""

    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        try:
            return getattr(importlib.import_module(module), func)(args)
        except (OSError, ValueError, KeyError) as exc:  # a bad URI, file or config: one line, no traceback
            from .validate import clean

            text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() adds quotes
            print(f"vlmpretrain {args.command}: {clean(text)}", file=sys.stderr)
            return 1

    return run


def _checkpoint_model_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the commands that load a trained model from a checkpoint (analyze-layers, prune)."""
    p.add_argument("--checkpoint", required=True, metavar="URI",
                   help="committed checkpoint <root>/<stage>/step-N/, or <root>/<stage>/ for its newest (path, file:// or s3://)")
    p.add_argument("--config", metavar="FILE",
                   help="TrainerConfig YAML or VLMPretrainRun manifest (default: the config stored with the checkpoint)")
    p.add_argument("--stage", help="recipe stage whose settings apply (default: the checkpoint's)")
    p.add_argument("--endpoint", default=None, metavar="URL", help="S3 endpoint (default: the config's checkpoint.endpoint)")
    p.add_argument("--visual-fraction", type=float, default=None, metavar="F",
                   help="visual region = round(F x depth) layers spread uniformly (default: the stage's trainable.llm, else 0.25)")
    p.add_argument("--visual-layers", default=None, metavar="I,J,..", help="visual region as explicit layer indices")
    p.add_argument("--micro-batch-size", type=int, default=8, metavar="B", help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")


def _operator_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `vlmpretrain operator` (vlm_operator.main.run reads them)."""
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], metavar="NS",
                       help="serve runs in this namespace (repeatable; globs like 'team-*' work)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve runs in all namespaces (the default)")
    p.add_argument("--standalone", action="store_true", default=True,
                   help="no peering (the default: one replica with the Recreate strategy)")
    p.add_argument("--peering", metavar="NAME", help="use kopf peering object NAME instead of --standalone")
    p.add_argument("--liveness", metavar="URL", help="serve a liveness endpoint, e.g. http://0.0.0.0:8081/healthz")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the operator's /metrics (default $VLM_OPERATOR_METRICS_PORT or 8080; 0 disables)")
    p.add_argument("--log-format", choices=["json", "plain", "full"], default="json", help="log line format")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmpretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("crd", help="print (or write, or check) a CRD generated from the schema")
    p.add_argument("-o", "--output", help=f"write to this file (e.g. {crd.CRD_FILE})")
    p.add_argument("--kind", choices=["run", "sweep"], default="run",
                   help="the VLMPretrainRun CRD (default) or the VLMPretrainSweep CRD")
    p.add_argument("--check", action="store_true", help="exit 1 when the file differs from the schema")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("validate", help="check manifests: CRD schema, CEL rules and semantic checks")
    p.add_argument("files", nargs="+", metavar="FILE", help="manifest files ('-' for stdin)")
    p.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("render", help="print the objects the operator creates for a stage")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--stage", help="stage to render (default: the first)")
    p.add_argument("--init-from", metavar="URI",
                   help="a later stage's start: the previous stage's confirmed final checkpoint "
                        "(status.finalCheckpoints.<previous>.uri), as the operator sets it")
    p.add_argument("--attempt", type=int, default=0, metavar="N",
                   help="the N-th retry of the stage (own job name and rendezvous; default 0)")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("demo", help="generate demo data, run examples/demo.yaml locally, prove the image is used")
    p.add_argument("--file", default="examples/demo.yaml", help="recipe to run (default: examples/demo.yaml)")
    p.add_argument("--nproc", type=int, help="worker processes (default: the recipe's, 1 on CPU)")
    p.add_argument("--run-dir", help="configs, progress, logs, summary (default: runs/<name>)")
    p.add_argument("--progress", choices=["auto", "bar", "plain"], default="auto", help="bar or plain log lines")
    p.add_argument("--skip-grounding", action="store_true", help="train only; skip the true-vs-mismatched image test")
    p.set_defaults(func=_lazy("vlm_local.demo:main"))

    p = sub.add_parser("local", help="run a recipe's stages (or a sweep's runs) on this machine (torchx local scheduler, torchrun)")
    local_arguments(p)
    p.add_argument("--parallel", type=int, metavar="N",
                   help="a VLMPretrainSweep: run N of its runs at once (default 1: one after another)")
    p.add_argument("--grounding", action="store_true",
                   help="a VLMPretrainSweep: also measure each run's true- vs mismatched-image caption loss")
    p.set_defaults(func=_cmd_local)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf; same as `kopf run -m vlm_operator.handlers`)")
    _operator_args(p)
    p.set_defaults(func=_lazy("vlm_operator.main:run"))

    p = sub.add_parser("rendezvous-store", help="serve a c10d rendezvous store outside the workers (one per stage)")
    p.add_argument("--host", default="", help="the one address both ports bind to (default: every address, "
                   "IPv4 and IPv6; e.g. 127.0.0.1 for a store only this machine may reach)")
    p.add_argument("--port", type=int, default=29400, help="store port (0: any free port; default 29400)")
    p.add_argument("--health-port", type=int, default=8081, help="/healthz and /readyz port (default 8081)")
    p.set_defaults(func=_lazy("vlm_trainer.rdzv_store:main"))

    # ---- visual-region tools (vlm_trainer.visual_region.influence, vlm_trainer.visual_region.prune): need the trainer extra
    p = sub.add_parser("analyze-layers", help="block influence of every LLM layer on image vs text positions of a checkpoint")
    _checkpoint_model_args(p)
    p.add_argument("--data", action="append", required=True, metavar="SHARDS",
                   help="calibration shards, [NAME=][MODALITY:]URI with {a..b} ranges (repeatable; modality detected when omitted)")
    p.add_argument("--samples", type=int, default=64, metavar="N", help="calibration samples per --data (default 64)")
    p.add_argument("--out", default="layer-influence", metavar="DIR", help="writes DIR/influence.json and DIR/influence.png")
    p.set_defaults(func=_lazy("vlm_trainer.visual_region.influence:main"))

    p = sub.add_parser("prune", help="remove the least influential LLM layers outside the visual region of a checkpoint")
    _checkpoint_model_args(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=int, metavar="K", help="layers to remove")
    how.add_argument("--keep-fraction", type=float, metavar="F", help="keep round(F x depth) layers")
    p.add_argument("--out", metavar="URI",
                   help="checkpoint root to write <stage>-pruned/step-N/ under (default: the source checkpoint's root)")
    p.add_argument("--data", action="append", metavar="SHARDS",
                   help="calibration shards as for analyze-layers (default: the stage's prune.calibration source, "
                        "else its first image source)")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="calibration samples per source (default: the stage's prune.calibration.samples, else 64)")
    p.add_argument("--influence", metavar="JSON", help="use an influence.json from analyze-layers instead of measuring")
    p.add_argument("--criterion", choices=["image", "text", "all"], default="image",
                   help="rank layers outside the visual region by their influence on these positions (default image)")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N",
                   help="validation samples per source for the before/after loss (default: the stage's evalBatches x "
                        "microBatchSize; 0 skips)")
    p.set_defaults(func=_lazy("vlm_trainer.visual_region.prune:main"))

    p = sub.add_parser("export", help="write a checkpoint's LLM, vision tower and projector as transformers-loadable files")
    p.add_argument("checkpoint", metavar="CKPT", help="committed checkpoint <root>/<stage>/step-N/, or <root>/<stage>/ for its newest")
    p.add_argument("out", metavar="OUT", help="directory to write OUT/llm/, OUT/vision/, OUT/projector/ into")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: safetensors + configs + tokenizer (the default)")
    p.add_argument("--config", metavar="FILE", help="TrainerConfig YAML or VLMPretrainRun manifest (default: the config stored with the checkpoint)")
    p.add_argument("--endpoint", default=None, metavar="URL", help="S3 endpoint (default: the config's checkpoint.endpoint)")
    p.set_defaults(func=_lazy("vlm_trainer.checkpoint.export:main"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

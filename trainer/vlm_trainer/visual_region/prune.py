"""Visual-region pruning (arXiv 2412.12785): drop the least influential LLM layers OUTSIDE
the visual region, write a loadable pruned checkpoint, report what it cost.

Measure block influence per decoder layer (`visual_region.influence`, BI = 1 - mean
cos(h_in, h_out)) on calibration data, choose the layers (`visual_region.selection`),
evaluate, remove them (`visual_region.surgery`), evaluate again, write and commit.

The visual region R is the stage's ``trainable.llm`` selection (``visualRegion.fraction``
or explicit ``layers``), else a fraction of 0.25, always defined on the ORIGINAL depth and
mapped to the current indices (see `visual_region.region.region_on_original`); ``--visual-fraction``
/ ``--visual-layers`` override it. Visual-region remap: an old index ``o`` of a kept layer
becomes ``o - |{removed r : r < o}|``; as R is never removed, R maps 1:1 (``prune.json``:
``visual_region_before`` -> ``visual_region``).

The pruned checkpoint (committed, ``final``) goes to ``<root>/<stage>-pruned/step-<N>/``
(N = the source checkpoint's step) and holds:

* the DCP files of the source with the removed layers' tensors dropped and the kept
  layers' keys renamed, the trainer state unchanged (data positions and schedule carry over);
* ``llm/``: the pruned LLM as ``save_pretrained`` writes it (config + safetensors) plus
  the tokenizer: ``AutoModelForCausalLM.from_pretrained(".../llm")`` loads it;
* ``prune.json`` (criterion, removed/kept layers, layer map, visual region before/after,
  parameter counts, validation loss by modality before and after), ``influence.json``,
  ``influence.png`` and ``trainer-config.yaml`` (the config the model was read with);
  every other file of the source checkpoint is copied as it is.

The manifest's ``extra`` carries ``llm_config`` (the pruned transformers config) and
``pruned`` (the lineage: original depth, kept layers as ORIGINAL indices, ...), from which
later stages build the pruned model (`visual_region.lineage`).

A recipe's pruning step (``stage.prune``, `vlm_api.stage_policy.steps`) runs as its own
process: ``python -m vlm_trainer.visual_region.prune --config FILE --checkpoint URI``
(the stage's TrainerConfig and its confirmed final checkpoint); it confirms the pruned
checkpoint like a stage (``stage_policy.confirmation`` of ``<stage>-pruned`` in
``$VLM_TERMINATION_LOG``). By hand: ``vlmpretrain prune --checkpoint URI (--remove K |
--keep-fraction F) [--out URI]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from vlm_api import stage_policy
from vlm_api.schema import TrainerConfig

from ..checkpoint import CONFIG_NAME, CheckpointCommitConflict, CheckpointRef, open_store, split_checkpoint_uri
from ..checkpoint.model_io import (
    LoadedModel,
    dcp_dirs,
    layers_prefix_of,
    llm_config_dict,
    load_checkpoint_model,
    read_dcp_tree,
    resolve_checkpoint,
    write_dcp_tree,
)
from ..model import count_params, token_losses
from ..stage_io import load_config, setup_logging, write_termination_log
from .influence import InfluenceReport, analyze, open_calibration_sources, parse_layers
from .region import region_for, stage_region_selection
from .selection import choose_layers, layers_to_remove_count, remap_indices
from .surgery import copy_other_files, prune_llm_layers, remap_fqns

log = logging.getLogger(__name__)

PRUNE_FORMAT = "vlm-pruned/1"


# --------------------------------------------------------------------------- validation loss


@torch.no_grad()
def modality_losses(vlm, builder, sources, *, samples: int, micro_batch_size: int = 8) -> dict:
    """Mean next-token loss over the label tokens of the first ``samples`` decodable
    validation samples of each source, pooled per modality (as the trainer's evaluator)."""
    from ..data.loader import validation_set
    from ..data.sequences import collate

    was = vlm.training
    vlm.eval()
    device = next(vlm.parameters()).device
    by_source, tokens, pooled = {}, {}, {}
    try:
        for src in sources:
            items = validation_set(src, builder, samples)
            total = count = 0.0
            for i in range(0, len(items), micro_batch_size):
                batch = collate(items[i:i + micro_batch_size], builder.tok.pad_id).to(device)
                logits = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values,
                             n_image_positions=batch.n_image_tokens)
                total += float(token_losses(logits, batch.labels).double().sum())
                count += batch.n_label_tokens
            by_source[src.name] = total / count if count else math.nan
            tokens[src.name] = int(count)
            acc = pooled.setdefault(src.modality, [0.0, 0.0])
            acc[0] += total
            acc[1] += count
    finally:
        vlm.train(was)
    return {"by_modality": {m: (t / c if c else math.nan) for m, (t, c) in sorted(pooled.items())},
            "by_source": by_source, "tokens": tokens}


def validation_sources(cfg: TrainerConfig, vlm, endpoint_url: str | None) -> list:
    from ..data.loader import open_sources
    from ..data.mixture import MULTIMODAL

    names = [s.name for s in cfg.spec.data.sources if s.validation_uri and (vlm.vision is not None or s.modality not in MULTIMODAL)]
    return list(open_sources(cfg.spec.data, names, image=vlm.image_spec, seed=cfg.spec.seed, split="validation",
                             endpoint_url=endpoint_url).values())


def calibration_sources_from_config(cfg: TrainerConfig, vlm, endpoint_url: str | None) -> tuple[list, int | None]:
    """The stage's ``prune.calibration`` source (training shards, in shard order), else
    the first multimodal source of the stage's mixture, else the first of its sources."""
    from ..data.loader import open_sources
    from ..data.mixture import MULTIMODAL

    stage = cfg.stage_spec
    samples = None
    if stage.prune is not None:
        name, samples = stage.prune.calibration.source, stage.prune.calibration.samples
    else:
        modality = {s.name: s.modality for s in cfg.spec.data.sources}
        names = [n for n, f in stage.mixture.items() if f > 0]
        mm = [n for n in names if modality.get(n) in MULTIMODAL and vlm.vision is not None]
        name = (mm or names)[0]
    src = open_sources(cfg.spec.data, [name], image=vlm.image_spec, seed=cfg.spec.seed, endpoint_url=endpoint_url)[name]
    src.shuffle = False  # the first N samples in shard order: the same set every time
    return [src], samples


# --------------------------------------------------------------------------- the whole step


@dataclasses.dataclass
class PruneOutcome:
    ref: CheckpointRef
    report: dict  # what prune.json holds
    influence: InfluenceReport


def _json_num(x: float | None):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def prune_loaded(loaded: LoadedModel, *, remove: int | None = None, keep_fraction: float | None = None,
                 calibration: list | None = None, samples: int | None = None, criterion: str = "image",
                 visual_fraction: float | None = None, visual_layers: list[int] | None = None,
                 out_root: str | None = None, eval_samples: int | None = None, micro_batch_size: int = 8,
                 influence: InfluenceReport | None = None, log_fn: Callable[[str], None] = print) -> PruneOutcome:
    """Measure, choose, evaluate, prune, evaluate, write and commit (see module doc)."""
    t0 = time.perf_counter()
    vlm, cfg = loaded.vlm, loaded.cfg
    depth = len(vlm.decoder_layers())
    k = layers_to_remove_count(depth, remove=remove, keep_fraction=keep_fraction)
    region = region_for(loaded, fraction=visual_fraction, layers=visual_layers)
    stage = loaded.stage_spec
    # influence
    if influence is None:
        if calibration is None:
            calibration, stage_samples = calibration_sources_from_config(cfg, vlm, loaded.endpoint_url)
            samples = samples or stage_samples
        influence = analyze(vlm, loaded.builder, calibration, samples=samples or 64, visual_region=region,
                            micro_batch_size=micro_batch_size, checkpoint=loaded.uri)
    elif influence.depth != depth:
        raise ValueError(f"the influence report has {influence.depth} layers, the model {depth}")
    removed = choose_layers(influence.layers, k, region, criterion=criterion)
    log_fn(influence.table(removed))
    # validation before
    val_sources = validation_sources(cfg, vlm, loaded.endpoint_url)
    if eval_samples is None:
        eval_samples = (stage.eval_batches * stage.micro_batch_size) if stage is not None else 16
    before = modality_losses(vlm, loaded.builder, val_sources, samples=eval_samples,
                             micro_batch_size=micro_batch_size) if val_sources and eval_samples else None
    params_before = {"llm": count_params(vlm.llm), "total": count_params(vlm)}
    prefix = layers_prefix_of(vlm)
    kept = prune_llm_layers(vlm.llm, removed)
    new_region = remap_indices(region, removed)
    assert len(new_region) == len(region), "a visual-region layer was removed"
    params_after = {"llm": count_params(vlm.llm), "total": count_params(vlm)}
    after = modality_losses(vlm, loaded.builder, val_sources, samples=eval_samples,
                            micro_batch_size=micro_batch_size) if before is not None else None
    # lineage on the original depth
    prev = (loaded.lineage or {}).get("pruned") or {}
    original_depth = int(prev.get("original_depth", depth))
    kept_original_before = prev.get("kept_original") or list(range(depth))
    kept_original = [kept_original_before[i] for i in kept]
    fraction = _region_fraction(stage, visual_fraction, visual_layers)
    report = {
        "format": PRUNE_FORMAT,
        "source_checkpoint": loaded.uri,
        "source_stage": loaded.ref.stage,
        "source_step": loaded.ref.step,
        "criterion": criterion,
        "criterion_text": ("remove the K layers outside the visual region with the lowest block influence "
                           f"(1 - mean cos(h_in, h_out)) on {criterion} positions of the calibration data"),
        "calibration": {"sources": influence.sources, "samples_per_source": influence.samples,
                        **{k_: v for k_, v in influence.stats.items()}},
        "depth_before": depth,
        "depth_after": len(kept),
        "removed": removed,
        "kept": kept,
        "layer_map": {str(o): n for n, o in enumerate(kept)},
        "original_depth": original_depth,
        "kept_original": kept_original,
        "removed_original": sorted(set(range(original_depth)) - set(kept_original)),
        "visual_fraction": fraction,
        "visual_region_before": list(region),
        "visual_region": new_region,
        "params_before": params_before,
        "params_after": params_after,
        "val_sources": [src.name for src in val_sources],
        "eval_samples_per_source": eval_samples if val_sources else 0,
        "val_loss_before": before,
        "val_loss_after": after,
    }
    _print_summary(report, log_fn)
    # write + commit
    out_root = out_root or split_checkpoint_uri(loaded.uri)[0]
    store = open_store(out_root, endpoint_url=loaded.endpoint_url)
    out_stage = stage_policy.pruned_name(loaded.ref.stage)
    with tempfile.TemporaryDirectory(prefix="vlm-prune-") as work:
        out = Path(work) / "ckpt"
        out.mkdir()
        dirs = dcp_dirs(loaded.local_dir)
        copy_other_files(loaded.local_dir, out, dirs)
        # the config travels with the pruned checkpoint: analyze-layers/prune need no --config for it
        (out / CONFIG_NAME).write_text(yaml.safe_dump(loaded.cfg.dump(), sort_keys=False))
        model_keys = set(_model_state_keys(vlm))
        for d in dirs:
            rel = d.relative_to(loaded.local_dir)
            tree = remap_fqns(read_dcp_tree(d), prefix, kept)
            if isinstance(tree.get("model"), dict) and d == loaded.dcp_dir:
                got = set(tree["model"])
                if got != model_keys:
                    raise RuntimeError(f"pruned checkpoint keys differ from the pruned model's: "
                                       f"{sorted(got ^ model_keys)[:5]}")
            write_dcp_tree(tree, out / rel)
            del tree
        vlm.llm.save_pretrained(out / "llm")
        try:
            loaded.tok.tokenizer.save_pretrained(out / "llm")
        except Exception as exc:  # noqa: BLE001 - the export is a convenience
            log.warning("tokenizer not exported: %s", exc)
        (out / "prune.json").write_text(json.dumps(_clean(report), indent=2) + "\n")
        influence.save(out, removed=removed, title=f"Block influence of {loaded.ref.stage} step {loaded.ref.step}")
        extra = {**{k_: v for k_, v in loaded.ref.extra.items() if k_ not in ("pruned", "llm_config", "val_loss")},
                 "pruned": _clean({k_: v for k_, v in report.items() if k_ not in ("val_loss_before", "val_loss_after")}),
                 "llm_config": llm_config_dict(vlm.llm),
                 "val_loss": _clean({"before": before and before["by_modality"], "after": after and after["by_modality"]})}
        try:
            res = store.upload(out, out_stage, loaded.ref.step, world_size=int(loaded.ref.world_size or 1),
                               final=True, extra=extra)
            ref = res.ref
        except CheckpointCommitConflict:
            ref = next(r for r in store.committed(out_stage) if r.step == loaded.ref.step)
            log.warning("%s was already committed (by an earlier attempt): using it", ref.uri)
    log_fn(f"pruned checkpoint committed: {ref.uri} ({time.perf_counter() - t0:.1f}s)")
    return PruneOutcome(ref, report, influence)


def _region_fraction(stage, fraction: float | None, layers: list[int] | None) -> float | None:
    """The fraction the visual region was selected with (None for explicit layers)."""
    if layers is not None:
        return None
    if fraction is not None:
        return fraction
    stage_fraction, stage_layers = stage_region_selection(stage)
    if stage_layers is not None:
        return None
    return 0.25 if stage_fraction is None else stage_fraction


def _model_state_keys(vlm) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return list(get_model_state_dict(vlm))


def _clean(obj):
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return _json_num(obj)
    return obj


def _print_summary(r: dict, log_fn) -> None:
    pb, pa = r["params_before"], r["params_after"]
    log_fn(f"removed layers {r['removed']} of {r['depth_before']} (criterion: lowest {r['criterion']}-position "
           f"influence outside the visual region); depth {r['depth_before']} -> {r['depth_after']}")
    log_fn(f"visual region {r['visual_region_before']} -> {r['visual_region']} (pruned model indices)")
    log_fn(f"parameters: LLM {pb['llm']:,} -> {pa['llm']:,} ({100 * (1 - pa['llm'] / pb['llm']):.1f}% fewer); "
           f"VLM {pb['total']:,} -> {pa['total']:,}")
    b, a = r["val_loss_before"], r["val_loss_after"]
    if b and a:
        log_fn(f"{'validation loss':<16} {'before':>9} {'after':>9} {'delta':>9}")
        for m in b["by_modality"]:
            x, y = b["by_modality"][m], a["by_modality"][m]
            log_fn(f"{m:<16} {x:9.4f} {y:9.4f} {y - x:+9.4f}")
    elif r.get("eval_samples_per_source") == 0 and r.get("val_sources"):
        log_fn("validation loss: skipped (0 evaluation samples)")
    else:
        log_fn("validation loss: no validation data (no source has validationUri)")


# --------------------------------------------------------------------------- stage integration


def final_checkpoint_ref(cfg: TrainerConfig, stage: str | None = None) -> CheckpointRef:
    store = open_store(cfg.spec.checkpoint.uri, endpoint_url=cfg.spec.checkpoint.endpoint or None)
    name = stage or cfg.stage
    spec_stage = cfg.spec.stages[cfg.spec.stage_index(name)]
    for ref in store.committed(name):
        if stage_policy.is_final(spec_stage, ref.step, ref.final):
            return ref
    raise FileNotFoundError(f"no committed final checkpoint of stage {name!r} in {store.uri}")


def run_prune_stage_step(config: TrainerConfig, final_ckpt_ref: CheckpointRef | str | None = None) -> CheckpointRef:
    """After a stage that declares ``prune``: measure influence on its calibration source,
    prune, evaluate, and commit ``<checkpoint.uri>/<stage>-pruned/step-<N>/`` (final).

    Idempotent: an existing committed pruned checkpoint of the same source step is
    returned as it is. ``final_ckpt_ref`` defaults to the stage's newest final checkpoint."""
    stage = config.stage_spec
    if stage.prune is None:
        raise ValueError(f"stage {stage.name!r} declares no prune")
    if final_ckpt_ref is None:
        final_ckpt_ref = final_checkpoint_ref(config)
    uri = final_ckpt_ref.uri if isinstance(final_ckpt_ref, CheckpointRef) else str(final_ckpt_ref)
    endpoint = config.spec.checkpoint.endpoint or None
    store_src, ref = resolve_checkpoint(uri, endpoint_url=endpoint)
    out_store = open_store(config.spec.checkpoint.uri, endpoint_url=endpoint)
    for existing in out_store.committed(stage_policy.pruned_name(stage.name)):
        if existing.step == ref.step:
            log.info("stage %s: pruned checkpoint %s exists", stage.name, existing.uri)
            return existing
    loaded = load_checkpoint_model(uri, config=config, stage=stage.name, endpoint_url=endpoint,
                                   device="cuda" if torch.cuda.is_available() and os.environ.get("VLM_FORCE_CPU") != "1" else "cpu")
    try:
        outcome = prune_loaded(loaded, remove=stage.prune.remove_layers, samples=stage.prune.calibration.samples,
                               out_root=config.spec.checkpoint.uri, log_fn=log.info)
    finally:
        loaded.close()
    _progress_event(config, outcome)
    return outcome.ref


def _progress_event(config: TrainerConfig, outcome: PruneOutcome) -> None:
    """A ``prune`` event in ``$VLM_PROGRESS_FILE`` (the local runner's view), when set."""
    from ..progress import ProgressFile

    r = outcome.report
    pf = ProgressFile.from_env(run=config.run.name, stage=config.stage, enabled=True)
    try:
        pf.write("prune", uri=outcome.ref.uri, step=r["source_step"], removed=r["removed"], kept=r["kept"],
                 depth_before=r["depth_before"], depth_after=r["depth_after"], visual_region=r["visual_region"],
                 params_before=r["params_before"], params_after=r["params_after"],
                 val_loss_before=(r["val_loss_before"] or {}).get("by_modality"),
                 val_loss_after=(r["val_loss_after"] or {}).get("by_modality"))
    finally:
        pf.close()


# --------------------------------------------------------------------------- CLI


def main(args: argparse.Namespace) -> int:
    """`vlmpretrain prune`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_checkpoint_model(args.checkpoint, config=args.config, stage=args.stage, endpoint_url=args.endpoint,
                                   device=args.device)
    try:
        influence = None
        if args.influence:
            influence = InfluenceReport.from_json(json.loads(Path(args.influence).read_text()))
        calibration = None
        if args.data and influence is None:
            calibration = open_calibration_sources(args.data, image_spec=loaded.vlm.image_spec,
                                                   endpoint_url=loaded.endpoint_url)
        outcome = prune_loaded(loaded, remove=args.remove, keep_fraction=args.keep_fraction, calibration=calibration,
                               samples=args.samples, criterion=args.criterion, visual_fraction=args.visual_fraction,
                               visual_layers=parse_layers(args.visual_layers), out_root=args.out,
                               eval_samples=args.eval_samples, micro_batch_size=args.micro_batch_size,
                               influence=influence)
    finally:
        loaded.close()
    print(outcome.ref.uri)
    return 0


def _module_main(argv: list[str] | None = None) -> int:
    """``python -m vlm_trainer.visual_region.prune --config FILE [--checkpoint URI]``: a
    recipe's pruning step (`vlm_api.stage_policy.steps`) as its own process."""
    parser = argparse.ArgumentParser(prog="python -m vlm_trainer.visual_region.prune",
                                     description=_module_main.__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainerConfig YAML of the stage to prune")
    parser.add_argument("--checkpoint", default=None,
                        help="the stage's confirmed final checkpoint (default: its newest final one in the store)")
    args = parser.parse_args(argv)
    setup_logging(0)
    try:
        config = load_config(args.config)
        ref = run_prune_stage_step(config, args.checkpoint)
        text = stage_policy.confirmation(stage_policy.pruned_name(config.stage), ref.step, ref.uri,
                                         _tokens(ref))
        write_termination_log(text)
    except Exception:  # noqa: BLE001 - the process's end: logged, and no confirmation
        log.exception("the pruning step failed")
        return 1
    log.info("step %s confirmed: %s", stage_policy.pruned_name(config.stage), ref.uri)
    print(ref.uri)
    return 0


def _tokens(ref: CheckpointRef) -> int:
    """The tokens trained up to the pruned checkpoint (its source's, carried in the manifest)."""
    tokens = (ref.extra or {}).get("tokens")
    return int(tokens) if isinstance(tokens, int) and tokens >= 0 else 0


if __name__ == "__main__":
    sys.exit(_module_main())

"""The model a stage trains after an earlier stage pruned it.

A pruning step (`visual_region.prune`) commits ``<stage>-pruned`` with its lineage in the
manifest (``llm_config``: the pruned transformers config; ``pruned``: original depth and
the kept layers as ORIGINAL indices). A later stage's recipe still describes the original
model: this module reads the lineage and resolves the stage's TrainerConfig against it.
It prunes nothing and waits for nothing: the stage policy starts the stage only once the
pruning step confirmed its checkpoint (`vlm_api.stage_policy.init_from`).
"""

from __future__ import annotations

import logging

from vlm_api.schema import LayerSelection, TrainerConfig

from ..checkpoint import open_store
from ..checkpoint.model_io import effective_model_spec, pruned_lineage
from .region import region_on_original

log = logging.getLogger(__name__)


def pruned_stage_config(cfg: TrainerConfig) -> TrainerConfig:
    """``cfg`` resolved against the latest earlier pruning: ``spec.model.llm`` = the pruned
    LLM config, and every ``trainable.llm`` layer selection of this and later stages
    (``visualRegion`` or ``layers``, defined on the original depth) -> explicit ``layers``
    in the pruned model's indices (`visual_region.region.region_on_original`). Without a pruning
    stage before this one, ``cfg`` is returned unchanged. Raises FileNotFoundError when
    that pruning step has committed nothing."""
    spec = cfg.spec
    i = spec.stage_index(cfg.stage)
    if not any(s.prune is not None for s in spec.stages[:i]):
        return cfg
    store = open_store(spec.checkpoint.uri, endpoint_url=spec.checkpoint.endpoint or None)
    lineage = pruned_lineage(store, spec, i)
    lin = lineage.get("pruned") or {}
    stages = list(spec.stages)
    for j in range(i, len(stages)):
        llm = stages[j].trainable.llm
        if isinstance(llm, LayerSelection):
            fraction = llm.visual_region.fraction if llm.visual_region is not None else None
            layers = region_on_original(fraction, llm.layers, original_depth=int(lin["original_depth"]),
                                        kept_original=lin["kept_original"])
            if not layers:
                raise ValueError(f"stage {stages[j].name!r}: every selected LLM layer was pruned")
            trainable = stages[j].trainable.model_copy(update={"llm": LayerSelection(layers=layers)})
            stages[j] = stages[j].model_copy(update={"trainable": trainable})
    model = effective_model_spec(spec.model, lineage["llm_config"])
    log.info("stage %s trains a pruned model: %d LLM layers (kept %s of %d)", cfg.stage,
             len(lin["kept_original"]), lin["kept_original"], lin["original_depth"])
    return cfg.model_copy(update={"spec": spec.model_copy(update={"model": model, "stages": stages})})

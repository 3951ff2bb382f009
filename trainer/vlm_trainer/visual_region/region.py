"""The visual region of a model loaded from a checkpoint, in its current layer indices
(after pruning, mapped through the lineage the pruned checkpoint records)."""

from __future__ import annotations



def _current_layers(depth: int, layers: list[int]) -> list[int]:
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"visual-region layers {bad} out of range for {depth} layers")
    return sorted(set(int(i) for i in layers))


def region_on_original(selection_fraction: float | None, layers: list[int] | None, *, original_depth: int,
                       kept_original: list[int] | None) -> list[int]:
    """The visual region in the CURRENT model's indices.

    The region is defined on the original (unpruned) depth: explicit ``layers`` or
    ``visual_region_layers(fraction, original_depth)``. After pruning, original layer ``o``
    is at index ``kept_original.index(o)``; layers that were removed are dropped (pruning
    never removes the region it was given, so the same fraction maps 1:1)."""
    from vlm_api.validate import visual_region_layers

    if layers is not None:
        chosen = sorted(set(layers))
    else:
        chosen = visual_region_layers(0.25 if selection_fraction is None else selection_fraction, original_depth)
    if kept_original is None:
        return chosen
    pos = {o: i for i, o in enumerate(kept_original)}
    return [pos[o] for o in chosen if o in pos]


def region_for(loaded, *, fraction: float | None = None, layers: list[int] | None = None) -> list[int]:
    """The visual region of a loaded model (``checkpoint.model_io.LoadedModel``), in its
    current layer indices.

    Explicit ``layers`` are current indices (used as given). Otherwise the fraction
    (argument, else the stage's ``trainable.llm.visualRegion.fraction``, else 0.25) or the
    stage's explicit ``trainable.llm.layers`` is applied to the ORIGINAL depth and mapped
    through the pruning lineage (:func:`region_on_original`)."""
    depth = len(loaded.vlm.decoder_layers())
    if layers is not None:
        return _current_layers(depth, layers)
    lin = (loaded.lineage or {}).get("pruned") or {}
    original_depth = int(lin.get("original_depth", depth))
    kept = lin.get("kept_original")
    stage_layers = None
    if fraction is None:
        fraction, stage_layers = stage_region_selection(loaded.stage_spec)
        if stage_layers is not None and _prepared(loaded):
            # a config from lineage.pruned_stage_config: its layers are already current indices
            return _current_layers(depth, stage_layers)
    return region_on_original(fraction, stage_layers, original_depth=original_depth, kept_original=kept)


def _prepared(loaded) -> bool:
    """True when the config's LLM already is the pruned architecture (a prepared config)."""
    want = (loaded.lineage or {}).get("llm_config")
    have = loaded.cfg.spec.model.llm.config
    return bool(want) and have is not None and dict(have) == dict(want)


def stage_region_selection(stage) -> tuple[float | None, list[int] | None]:
    """(fraction, explicit layers) of a stage's ``trainable.llm`` when it is a layer
    selection; (None, None) for all/none (the default fraction 0.25 then applies)."""
    llm = getattr(getattr(stage, "trainable", None), "llm", None)
    if llm is None or isinstance(llm, str):
        return None, None
    if llm.visual_region is not None:
        return float(llm.visual_region.fraction), None
    return None, list(llm.layers)

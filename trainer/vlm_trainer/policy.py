"""Trainable policies per stage, and AdamW parameter groups.

A stage's ``trainable`` (vlm_api.schema.Trainable) decides ``requires_grad`` for every
parameter; everything not selected is frozen (``requires_grad=False``), never handed to
the optimizer, so it has no optimizer state and stays bit-identical.

* ``visionEncoder: true|false`` -> the whole vision tower.
* ``projector: true|false``     -> the whole projector.
* ``llm: all``   -> every LLM parameter (embeddings, decoder layers, final norm, lm_head).
* ``llm: none``  -> nothing in the LLM.
* ``llm: {layers: [i, ...]}`` -> only those decoder layers (0-based); embeddings, final
  norm and lm_head stay frozen.
* ``llm: {visualRegion: {fraction: f}}`` -> the decoder layers
  ``vlm_api.validate.visual_region_layers(f, depth)``: n = round(f * depth) layers at
  floor((i + 0.5) * depth / n), i = 0..n-1 (8 of 32 -> 2, 6, 10, ..., 30); embeddings, norm
  and lm_head frozen, as for ``layers``.

Weight decay (AdamW, decoupled): applied to weight matrices and conv kernels (ndim >= 2),
NOT to biases, norm weights (ndim 1) or embedding tables (``nn.Embedding`` weights: token
and position embeddings; a tied lm_head shares the token table, so it is not decayed either).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from vlm_api.schema import LayerSelection, Trainable
from vlm_api.validate import visual_region_layers

from .model import VLM


@dataclasses.dataclass
class TrainablePlan:
    vision_encoder: bool
    projector: bool
    llm: str  # "all" | "none" | "layers"
    llm_layers: list[int]  # decoder layer indices trained (all of them for "all")
    trainable_params: int
    frozen_params: int

    def describe(self) -> str:
        llm = self.llm if self.llm != "layers" else f"layers {self.llm_layers}"
        return (f"vision={'train' if self.vision_encoder else 'frozen'} projector={'train' if self.projector else 'frozen'} "
                f"llm={llm} ({self.trainable_params:,} trainable / {self.frozen_params:,} frozen params)")


def selected_llm_layers(llm: str | LayerSelection, depth: int) -> list[int]:
    if llm == "all":
        return list(range(depth))
    if llm == "none":
        return []
    assert isinstance(llm, LayerSelection)
    if llm.layers is not None:
        bad = [i for i in llm.layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"trainable.llm.layers: {bad} out of range for an LLM with {depth} layers")
        return sorted(llm.layers)
    return visual_region_layers(llm.visual_region.fraction, depth)


def apply_trainable(vlm: VLM, trainable: Trainable) -> TrainablePlan:
    """Set requires_grad on every parameter of ``vlm`` according to the stage policy."""
    for p in vlm.parameters():
        p.requires_grad_(False)
    layers = vlm.decoder_layers()
    chosen = selected_llm_layers(trainable.llm, len(layers))
    if trainable.llm == "all":
        vlm.llm.requires_grad_(True)
    else:
        for i in chosen:
            layers[i].requires_grad_(True)
    if trainable.vision_encoder and vlm.vision is not None:
        vlm.vision.requires_grad_(True)
    if trainable.projector and vlm.projector is not None:
        vlm.projector.requires_grad_(True)
    n_train = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in vlm.parameters())
    kind = trainable.llm if isinstance(trainable.llm, str) else "layers"
    return TrainablePlan(
        vision_encoder=bool(trainable.vision_encoder and vlm.vision is not None),
        projector=bool(trainable.projector and vlm.projector is not None),
        llm=kind, llm_layers=chosen, trainable_params=n_train, frozen_params=n_all - n_train,
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over trainable parameters: decayed matrices vs. the rest (see module doc).

    Call on the (possibly FSDP-wrapped) model: names and parameter objects are the ones the
    optimizer must see.
    """
    embedding_params = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embedding_params.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim >= 2 and id(p) not in embedding_params:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups

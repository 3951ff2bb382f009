"""The VLM: a causal LM, a vision encoder and a projector between them (LLaVA-style).

    pixels -> vision encoder (last hidden state, patch tokens) -> projector -> [T x hidden]
    text ids with T placeholder ids per image -> LLM input embeddings
    placeholder positions <- image embeddings (in order), then the LLM runs on embeddings

* LLM: ``AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))`` (random init)
  or ``from_pretrained(path)`` (``s3://`` downloaded first). Embeddings are resized when
  the tokenizer has more ids than the LLM's vocabulary.
* Vision encoder: any SigLIP / CLIP vision tower (``AutoModel``); a full two-tower
  checkpoint/config is reduced to its vision tower. Features are the last hidden state's
  patch tokens (CLIP's CLS token dropped); SigLIP's pooling head is not built (unused).
* Projector: ``mlp2x_gelu`` (Linear-GELU-Linear) or ``linear``.

Each image is exactly ``tokens_per_image`` placeholder ids in ``input_ids``; the number
of placeholder positions must equal images x tokens_per_image, else
:class:`ImageTokenMismatch`. A batch without images never touches the vision tower
(unless ``force_vision``: a distributed peer has images in the same micro-step, so this
rank runs a zero image whose contribution is multiplied by 0, keeping collectives and
autograd graphs identical across ranks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from vlm_api.schema import ModelPart, ModelSpec

from .remote import localize
from .tokenizer import TokenizerBundle

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageTokenMismatch(ValueError):
    """The placeholder positions in input_ids do not match images x tokens_per_image."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How images must be preprocessed for this vision encoder (CHW float, normalised)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Projector(nn.Module):
    def __init__(self, kind: str, vision_hidden: int, llm_hidden: int):
        super().__init__()
        if kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        elif kind == "linear":
            self.net = nn.Sequential(nn.Linear(vision_hidden, llm_hidden))
        else:
            raise ValueError(f"unknown projector type {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def find_layer_list(module: nn.Module, depth: int | None) -> nn.ModuleList:
    """The ModuleList of transformer blocks (`model.layers`, `encoder.layers`, ...)."""
    best = None
    for _, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 0 and (depth is None or len(sub) == depth):
            if best is None or len(sub) > len(best):
                best = sub
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(module).__name__}")
    return best


def _num_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


class VLM(nn.Module):
    def __init__(self, llm: nn.Module, vision: nn.Module | None, projector: nn.Module | None, *,
                 image_token_id: int, tokens_per_image: int, image_spec: ImageSpec | None, drop_cls: bool = False):
        super().__init__()
        self.llm = llm
        self.vision = vision
        self.projector = projector
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.image_spec = image_spec
        self.drop_cls = drop_cls

    # ---- structure (used by policies and parallelisation)
    def decoder_layers(self) -> nn.ModuleList:
        return find_layer_list(self.llm, _num_layers(self.llm.config))

    def vision_layers(self) -> nn.ModuleList | None:
        if self.vision is None:
            return None
        return find_layer_list(self.vision, _num_layers(self.vision.config))

    # ---- forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, tokens_per_image, llm_hidden]."""
        assert self.vision is not None and self.projector is not None
        dtype = next(self.vision.parameters()).dtype
        feats = self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.projector(feats)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
              n_image_positions: int | None = None, force_vision: bool = False) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        if n_image_positions is None:
            n_image_positions = int((input_ids == self.image_token_id).sum())
        expected = n_images * self.tokens_per_image
        if n_image_positions != expected:
            raise ImageTokenMismatch(
                f"{n_image_positions} image placeholder positions but {n_images} image(s) x "
                f"{self.tokens_per_image} tokens per image = {expected}"
            )
        if n_images:
            if self.vision is None:
                raise ImageTokenMismatch("images given but the model has no vision encoder")
            feats = self.encode_images(pixel_values)
            if feats.shape[1] != self.tokens_per_image:
                raise ImageTokenMismatch(
                    f"the vision encoder produced {feats.shape[1]} tokens per image, expected {self.tokens_per_image}"
                )
            mask = (input_ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype).reshape(-1, embeds.shape[-1]))
        elif force_vision and self.vision is not None:
            size = self.image_spec.size if self.image_spec else 224
            dummy = torch.zeros(1, 3, size, size, device=input_ids.device)
            embeds = embeds + 0.0 * self.encode_images(dummy).sum().to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, *, n_image_positions: int | None = None,
                force_vision: bool = False) -> torch.Tensor:
        embeds = self.embed(input_ids, pixel_values, n_image_positions=n_image_positions, force_vision=force_vision)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.logits


# --------------------------------------------------------------------------- losses


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross entropy [B, L-1] (0 where the label is ignored)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over non-ignored labels (the caller normalises)."""
    shift_logits = logits[:, :-1].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


# --------------------------------------------------------------------------- building


def _part_config(part: ModelPart, **overrides):
    from transformers import AutoConfig

    if part.config is not None:
        cfg = dict(part.config)
        return AutoConfig.for_model(**cfg, **overrides), None
    path = localize(part.path)
    return AutoConfig.from_pretrained(path, **overrides), path


def build_llm(part: ModelPart, vocab_needed: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg, path = _part_config(part)
    if path is None:
        llm = AutoModelForCausalLM.from_config(cfg)
    else:
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = llm.get_input_embeddings().weight.shape[0]
    if vocab_needed > vocab:
        log.info("resizing LLM embeddings %d -> %d for added tokens", vocab, vocab_needed)
        llm.resize_token_embeddings(vocab_needed, mean_resizing=False)
    return llm


def build_vision(part: ModelPart) -> tuple[nn.Module, ImageSpec, bool]:
    from transformers import AutoConfig, AutoModel

    if part.config is not None:
        cfg = AutoConfig.for_model(**dict(part.config))
        path = None
    else:
        path = localize(part.path)
        cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "vision_config", None) is not None:  # a two-tower (SigLIP / CLIP) config: keep the vision tower
        cfg = cfg.vision_config
    model_type = getattr(cfg, "model_type", "")
    if "siglip" in model_type:
        cfg.vision_use_head = False  # the pooling head is unused: patch features are the output
    if path is None:
        vision = AutoModel.from_config(cfg)
    else:
        cls = AutoModel._model_mapping[type(cfg)]  # e.g. SiglipVisionModel for a SiglipVisionConfig
        vision = cls.from_pretrained(path, config=cfg, dtype=torch.float32)
    drop_cls = "clip" in model_type
    if drop_cls and hasattr(getattr(vision, "vision_model", None), "post_layernorm"):
        vision.vision_model.post_layernorm = nn.Identity()  # applies to the pooled CLS only: unused
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if not drop_cls else (_CLIP_MEAN, _CLIP_STD)
    if path is not None and os.path.exists(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            pre = json.load(f)
        mean = tuple(pre.get("image_mean", mean))
        std = tuple(pre.get("image_std", std))
    return vision, ImageSpec(size=int(cfg.image_size), mean=tuple(mean), std=tuple(std)), drop_cls


def build_vlm(spec: ModelSpec, tok: TokenizerBundle, *, seed: int = 0) -> VLM:
    """Build the full model on CPU in fp32 (same weights on every rank for a given seed)."""
    torch.manual_seed(seed)
    llm = build_llm(spec.llm, len(tok))
    vision = projector = image_spec = None
    tokens_per_image = 0
    drop_cls = False
    if spec.vision_encoder is not None:
        vision, image_spec, drop_cls = build_vision(spec.vision_encoder)
        vcfg = vision.config
        tokens_per_image = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
        projector = Projector(spec.projector.type, int(vcfg.hidden_size), int(llm.config.hidden_size))
    return VLM(llm, vision, projector, image_token_id=tok.image_token_id, tokens_per_image=tokens_per_image,
               image_spec=image_spec, drop_cls=drop_cls)


def count_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())

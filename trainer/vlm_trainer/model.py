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

from vlm_api.cluster import secret_credentials

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
                force_vision: bool = False, position_ids: torch.Tensor | None = None,
                flash_kwargs: dict | None = None) -> torch.Tensor:
        """Logits [B, L, V]. Unpacked: ``attention_mask`` marks the padding. Packed:
        ``position_ids`` restart at 0 for every sample and no attention mask is given, so
        transformers builds the block-diagonal causal (document) mask from them (sdpa, eager,
        flex) or, for one flattened row with ``flash_kwargs`` (cu_seq_lens), runs
        flash-attention's variable-length kernel: either way a token attends only within its
        sample, and positions restart per sample."""
        embeds = self.embed(input_ids, pixel_values, n_image_positions=n_image_positions, force_vision=force_vision)
        if position_ids is not None:
            out = self.llm(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **(flash_kwargs or {}))
        else:
            out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return out.logits


# --------------------------------------------------------------------------- packing


PACKED_SDPA = "vlm_packed_sdpa"


def packed_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Padding-free attention without flash-attn (CPU): for one flattened row with
    ``cu_seq_lens_q`` (the keyword transformers' flash-attention path takes), transformers'
    own SDPA attention per sample, causal; a token attends only within its sample and
    nothing is computed for other samples' blocks (a block-diagonal mask would compute and
    discard them). Registered with transformers' ``AttentionInterface`` as ``vlm_packed_sdpa``;
    without ``cu_seq_lens_q`` it is plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(k, None)
    if cu is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                        None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    # no mask function: transformers builds no [L x L] mask for this implementation
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(PACKED_SDPA, None)


def packed_attention(llm: nn.Module, device: torch.device, seq_length: int | None = None) -> str:
    """The attention implementation packed training uses (``VLM_ATTN_IMPLEMENTATION``
    overrides). Padding-free where possible: each micro-batch is one flattened row of real
    tokens with ``cu_seq_lens`` (`Batch.flattened`) and the kernel attends per sample:
    ``flash_attention_2`` on CUDA when flash-attn is installed and the LLM class supports it;
    ``vlm_packed_sdpa`` (SDPA per sample, :func:`packed_sdpa_forward`) on CPU. Otherwise
    (CUDA without flash-attn; on CPU an LLM with soft-capped logits or a sliding window
    shorter than ``seq_length``) ``sdpa``: rows stay rows and transformers builds a
    block-diagonal causal mask from the restarted position ids."""
    env = os.environ.get("VLM_ATTN_IMPLEMENTATION", "").strip()
    if env:
        return env
    cfg = llm.config
    if device.type == "cuda" and getattr(llm, "_supports_flash_attn", False):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    window = getattr(cfg, "sliding_window", None)
    windowless = not window or (seq_length is not None and window >= seq_length)  # no sample is longer than it
    plain = getattr(llm, "_supports_sdpa", False) and windowless and not getattr(cfg, "attn_logit_softcapping", None)
    if device.type == "cpu" and plain:
        return PACKED_SDPA
    return "sdpa" if getattr(llm, "_supports_sdpa", False) else "eager"


def set_attention(llm: nn.Module, name: str) -> None:
    if name == PACKED_SDPA:
        _register_packed_sdpa()
    if getattr(llm.config, "_attn_implementation", None) != name:
        llm.set_attn_implementation(name)


def flattens(name: str | None) -> bool:
    """Whether this implementation trains on flattened micro-batches (padding-free)."""
    return bool(name) and ("flash" in name or name == PACKED_SDPA)


class PackingUnsupported(ValueError):
    """The LLM lets packed samples see each other (or ignores restarted position ids)."""


@torch.no_grad()
def packing_isolation_error(llm: nn.Module, *, vocab: int | None = None, seed: int = 0) -> str | None:
    """Whether this LLM keeps packed samples apart; None when it does, else why not.

    Two checks on a tiny input, in fp32 on the module as it is (CPU before sharding):
    *isolation*: a row [a | b] with restarted position ids, then a row [a' | b] with other
    tokens in a: b's logits must not change (beyond float reassociation: 1e-5 of their scale;
    a leak moves them by ~1e-3 to 1e-1); *positions*: b's logits in the packed row must equal
    b's alone (1e-4 of their scale)."""
    vocab = vocab or llm.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    device = next(llm.parameters()).device
    hi = max(3, min(vocab, 250))
    a, a2 = (torch.randint(2, hi, (1, 6), generator=g) for _ in range(2))
    b = torch.randint(2, hi, (1, 5), generator=g)
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None].to(device)
    impl = getattr(llm.config, "_attn_implementation", None)
    packed_kw = {}
    if flattens(impl):  # the padding-free path: the sample boundaries as cu_seq_lens
        cu = torch.tensor([0, 6, 11], dtype=torch.int32, device=device)
        packed_kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 6, "max_length_k": 6}
    was_training = llm.training
    llm.eval()
    try:
        run = lambda ids, p=None, **kw: llm(input_ids=ids.to(device), position_ids=p, use_cache=False, **kw).logits.float()  # noqa: E731
        one = run(torch.cat([a, b], 1), pos, **packed_kw)[:, 6:]
        two = run(torch.cat([a2, b], 1), pos, **packed_kw)[:, 6:]
        alone = run(b)
    finally:
        llm.train(was_training)
    scale = float(alone.abs().max()) or 1.0
    leak = float((one - two).abs().max()) / scale
    shift = float((one - alone).abs().max()) / scale
    kind = getattr(llm.config, "model_type", type(llm).__name__)
    if leak > 1e-5:
        return (f"{kind} ({type(llm).__name__}, attention {llm.config._attn_implementation}) lets packed samples "
                f"see each other: changing one sample moved the next one's logits by {leak:.1e} of their scale")
    if shift > 1e-4:
        return (f"{kind} ({type(llm).__name__}) does not restart positions per packed sample: a sample's logits "
                f"differ from its logits alone by {shift:.1e} of their scale")
    return None


def check_packing(llm: nn.Module, attention: str) -> str:
    """Set a packed attention implementation on ``llm`` (its CPU copy, before sharding)
    after checking that it keeps packed samples apart, and return it: ``attention``, or
    ``sdpa`` when the LLM class does not route ``attention`` through transformers'
    attention interface (its own attention code) but isolates samples with SDPA document
    masks. Refuse (`PackingUnsupported`, naming the fix) an LLM that isolates with neither.
    A flash-attention kernel (CUDA only) is checked through SDPA's document mask."""
    from vlm_api.schema import PACKING_UNSUPPORTED_LLMS

    kind = getattr(llm.config, "model_type", "")
    if kind in PACKING_UNSUPPORTED_LLMS:
        raise PackingUnsupported(f"model.llm {kind!r} cannot keep packed samples apart ({PACKING_UNSUPPORTED_LLMS[kind]}): "
                                 "set data.packing: false")
    fallback = "sdpa" if getattr(llm, "_supports_sdpa", False) else "eager"
    probe = attention if "flash" not in attention else fallback
    set_attention(llm, probe)
    error = packing_isolation_error(llm)
    if error and probe == PACKED_SDPA:
        set_attention(llm, fallback)
        if packing_isolation_error(llm) is None:
            log.info("%s does not use transformers' attention interface for %s; packing with %s document masks",
                     type(llm).__name__, PACKED_SDPA, fallback)
            return fallback
    if error:
        raise PackingUnsupported(f"{error}: set data.packing: false")
    set_attention(llm, attention)
    return attention


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
    path = localize(part.path, credentials=secret_credentials(part.credentials_secret))
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
        path = localize(part.path, credentials=secret_credentials(part.credentials_secret))
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

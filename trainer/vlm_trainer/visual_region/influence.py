"""Block influence of every LLM decoder layer, by modality (arXiv 2412.12785, ShortGPT's BI).

For decoder layer ``l`` with input hidden states ``h_in`` and output ``h_out`` (the
residual stream before and after the block, i.e. what the forward hook on
``model.layers[l]`` sees)::

    BI_l(S) = 1 - mean_{(b, t) in S} cos(h_in[b, t], h_out[b, t])

where ``S`` is a set of token positions pooled over all calibration samples (a
token-weighted mean, not a mean of per-sample means). Three sets are reported:

* ``image``: positions holding an image embedding (``input_ids == image_token_id``);
* ``text``: every other non-padding position (bos and eos included);
* ``all``: both together.

Padding (``attention_mask == 0``) never counts. A layer whose output equals its input has
BI 0; one that turns every hidden state orthogonal has BI 1; opposite has BI 2. The cosine
is computed in float32 whatever the compute dtype; sums are kept in float64.

Calibration data: the first ``N`` decodable samples of each given source, in shard order
(no shuffling), encoded exactly as the trainer encodes them (`sequences.SequenceBuilder`
with the run's ``seqLength``), in micro-batches.

CLI (`vlmpretrain analyze-layers`)::

    vlmpretrain analyze-layers --checkpoint URI --data SHARDS [--data SHARDS ...]
        [--samples N] [--out DIR] [--config FILE] [--visual-fraction F | --visual-layers 2,6]

prints a table and writes ``DIR/influence.json`` and ``DIR/influence.png`` (bars per
layer, image and text BI, visual-region layers marked). ``--checkpoint`` is a committed
checkpoint (see `vlm_trainer.checkpoint.model_io`); ``--data`` a shard URI with ``{a..b}`` ranges,
optionally ``MODALITY:URI`` or ``NAME=MODALITY:URI`` (the modality is otherwise detected
from the first sample's members).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.sequences import Batch, SequenceBuilder, collate

log = logging.getLogger(__name__)

MODALITIES = ("image", "text", "all")
DEFAULT_VISUAL_FRACTION = 0.25  # the paper's visual region: ~25% of the layers


# --------------------------------------------------------------------------- measurement


@dataclasses.dataclass
class LayerInfluence:
    layer: int
    image: float  # NaN when the calibration set has no image positions
    text: float
    all: float
    in_visual_region: bool = False

    def get(self, modality: str) -> float:
        return float(getattr(self, modality))


class BlockInfluenceMeter:
    """Forward hooks on a ModuleList of decoder layers that accumulate cos(h_in, h_out).

    Use as a context manager; before each forward call :meth:`set_positions` with the
    boolean [B, L] masks of image and text positions of the batch.
    """

    def __init__(self, layers: Sequence[nn.Module]):
        self.layers = list(layers)
        n = len(self.layers)
        self.sums = {m: torch.zeros(n, dtype=torch.float64) for m in ("image", "text")}
        self.counts = {m: torch.zeros(n, dtype=torch.float64) for m in ("image", "text")}
        self._masks: dict[str, torch.Tensor] | None = None
        self._handles: list = []

    def set_positions(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self._masks = {"image": image.bool(), "text": text.bool()}

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            if self._masks is None:
                raise RuntimeError("BlockInfluenceMeter: set_positions() before the forward pass")
            cos = F.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)  # [B, L]
            for m, mask in self._masks.items():
                mask = mask.to(cos.device)
                self.sums[m][index] += float(cos[mask].double().sum())
                self.counts[m][index] += float(mask.sum())

        return hook

    def __enter__(self) -> "BlockInfluenceMeter":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self, visual_region: Iterable[int] = ()) -> list[LayerInfluence]:
        region = set(visual_region)
        out = []
        for i in range(len(self.layers)):
            vals = {}
            for m in ("image", "text"):
                c = float(self.counts[m][i])
                vals[m] = 1.0 - float(self.sums[m][i]) / c if c else math.nan
            c_all = float(self.counts["image"][i] + self.counts["text"][i])
            s_all = float(self.sums["image"][i] + self.sums["text"][i])
            out.append(LayerInfluence(i, vals["image"], vals["text"], 1.0 - s_all / c_all if c_all else math.nan,
                                      i in region))
        return out

    @property
    def positions(self) -> dict[str, int]:
        return {m: int(self.counts[m][0]) if len(self.layers) else 0 for m in ("image", "text")}


def position_masks(batch: Batch, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) boolean masks [B, L]; padding is in neither."""
    valid = batch.attention_mask.bool()
    image = (batch.input_ids == image_token_id) & valid
    return image, valid & ~image


@torch.no_grad()
def measure(vlm, batches: Iterable[Batch], *, visual_region: Iterable[int] = ()) -> tuple[list[LayerInfluence], dict]:
    """Block influence of ``vlm``'s LLM decoder layers over ``batches`` (eval mode, no grad)."""
    was_training = vlm.training
    vlm.eval()
    device = next(vlm.parameters()).device
    meter = BlockInfluenceMeter(vlm.decoder_layers())
    n_seq = 0
    try:
        with meter:
            for batch in batches:
                batch = batch.to(device)
                meter.set_positions(*position_masks(batch, vlm.image_token_id))
                vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, n_image_positions=batch.n_image_tokens)
                n_seq += batch.n_sequences
    finally:
        vlm.train(was_training)
    return meter.result(visual_region), {"sequences": n_seq, **{f"{m}_positions": n for m, n in meter.positions.items()}}


# --------------------------------------------------------------------------- data


def calibration_items(sources, builder: SequenceBuilder, samples: int) -> list:
    """The first ``samples`` decodable samples of each source (shard order), encoded."""
    items = []
    for src in sources:
        got = 0
        limit = max(samples * 4, samples + 16)  # bad samples cannot loop forever
        for i, raw in enumerate(src.raw(0)):
            if got >= samples or i >= limit:
                break
            sample = src.decode(raw)
            if sample is None:
                continue
            items.append(builder.encode(sample, src.modality))
            got += 1
        if got < samples:
            log.warning("source %s: only %d decodable calibration samples (wanted %d)", src.name, got, samples)
    return items


def batches_of(items: list, pad_id: int, micro_batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(items), micro_batch_size):
        yield collate(items[i:i + micro_batch_size], pad_id)


def detect_modality(uri: str, endpoint_url: str | None = None) -> str:
    """text / image-text / interleaved from the members of the first sample of the first shard."""
    from ..data.shards import IMAGE_EXTS, ShardedSource

    probe = ShardedSource(name="probe", modality="text", shards=uri, shuffle=False, endpoint_url=endpoint_url)
    raw = next(probe.raw(0))
    keys = set(raw.members)
    if "json" in keys:
        return "interleaved"
    if any(e in keys for e in IMAGE_EXTS):
        return "image-text"
    return "text"


def parse_data_arg(value: str, index: int) -> tuple[str, str | None, str]:
    """``[NAME=][MODALITY:]URI`` -> (name, modality or None, uri)."""
    from ..data.shards import MODALITIES as KNOWN

    name = f"data{index}"
    if "=" in value.split(":", 1)[0] and not value.startswith(("s3://", "file://", "/")):
        name, value = value.split("=", 1)
    modality = None
    head, sep, rest = value.partition(":")
    if sep and head in KNOWN:
        modality, value = head, rest
    return name, modality, value


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class InfluenceReport:
    layers: list[LayerInfluence]
    visual_region: list[int]
    sources: dict[str, str]  # name -> modality
    samples: int
    stats: dict
    checkpoint: str | None = None

    @property
    def depth(self) -> int:
        return len(self.layers)

    def values(self, modality: str) -> list[float]:
        return [layer.get(modality) for layer in self.layers]

    def to_json(self) -> dict:
        def num(x: float):
            return None if x is None or math.isnan(x) else round(float(x), 8)

        return {
            "format": "vlm-layer-influence/1",
            "metric": "block influence BI = 1 - mean cos(h_in, h_out) over token positions",
            "checkpoint": self.checkpoint,
            "depth": self.depth,
            "visual_region": list(self.visual_region),
            "sources": self.sources,
            "samples_per_source": self.samples,
            **self.stats,
            "layers": [{"layer": layer.layer, "image": num(layer.image), "text": num(layer.text), "all": num(layer.all),
                        "visual_region": layer.in_visual_region} for layer in self.layers],
        }

    @classmethod
    def from_json(cls, d: dict) -> "InfluenceReport":
        def f(x):
            return math.nan if x is None else float(x)

        layers = [LayerInfluence(r["layer"], f(r["image"]), f(r["text"]), f(r["all"]), bool(r.get("visual_region")))
                  for r in d["layers"]]
        stats = {k: d[k] for k in ("sequences", "image_positions", "text_positions") if k in d}
        return cls(layers, list(d["visual_region"]), dict(d.get("sources", {})), int(d.get("samples_per_source", 0)),
                   stats, d.get("checkpoint"))

    def table(self, removed: Iterable[int] = ()) -> str:
        removed = set(removed)
        rows = [f"{'layer':>5}  {'BI image':>9}  {'BI text':>9}  {'BI all':>9}  region"]
        for layer in self.layers:
            mark = "visual" if layer.in_visual_region else ("REMOVED" if layer.layer in removed else "")
            cells = [f"{v:9.5f}" if not math.isnan(v) else f"{'-':>9}" for v in (layer.image, layer.text, layer.all)]
            rows.append(f"{layer.layer:>5}  {'  '.join(cells)}  {mark}".rstrip())
        s = self.stats
        rows.append(f"({s.get('sequences', 0)} sequences: {s.get('image_positions', 0)} image positions, "
                    f"{s.get('text_positions', 0)} text positions; visual region {self.visual_region})")
        return "\n".join(rows)

    def save(self, out_dir: str | os.PathLike, *, removed: Iterable[int] = (), title: str | None = None) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": str(out / "influence.json")}
        Path(paths["json"]).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        png = plot(self, out / "influence.png", removed=removed, title=title)
        if png:
            paths["png"] = png
        return paths


def plot(report: InfluenceReport, path: str | os.PathLike, *, removed: Iterable[int] = (), title: str | None = None) -> str | None:
    """A small bar chart: image and text BI per layer; visual-region layers shaded, removed
    layers hatched. Returns the path, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        log.warning("matplotlib is not installed: no chart written (pip install matplotlib)")
        return None
    removed = set(removed)
    n = report.depth
    xs = list(range(n))
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(4.0, min(12.0, 0.35 * n + 2)), 2.8), dpi=100)
    for i in report.visual_region:
        ax.axvspan(i - 0.5, i + 0.5, color="#ffe08a", alpha=0.6, lw=0, zorder=0)
    img = [0.0 if math.isnan(v) else v for v in report.values("image")]
    txt = [0.0 if math.isnan(v) else v for v in report.values("text")]
    hatch = ["//" if i in removed else "" for i in xs]
    b1 = ax.bar([x - width / 2 for x in xs], img, width, color="#d1495b", zorder=2)
    b2 = ax.bar([x + width / 2 for x in xs], txt, width, color="#00798c", zorder=2)
    for bars in (b1, b2):
        for bar, h in zip(bars, hatch):
            if h:
                bar.set_hatch(h)
                bar.set_edgecolor("black")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(i) for i in xs], fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("block influence")
    handles = [Patch(color="#d1495b", label="image positions"), Patch(color="#00798c", label="text positions"),
               Patch(color="#ffe08a", label="visual region")]
    if removed:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="pruned"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", frameon=False, ncol=len(handles))
    ax.set_title(title or "Block influence (1 - cos(h_in, h_out))", fontsize=9)
    ymax = max([v for v in img + txt if v > 0] or [1e-3])
    ax.set_ylim(0, ymax * 1.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------- high level


def resolve_visual_region(depth: int, *, fraction: float | None = None, layers: Sequence[int] | None = None) -> list[int]:
    """Explicit ``layers``, else `vlm_api.validate.visual_region_layers(fraction or 0.25, depth)`."""
    from vlm_api.validate import visual_region_layers

    if layers is not None:
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"visual-region layers {bad} out of range for {depth} layers")
        return sorted(set(int(i) for i in layers))
    return visual_region_layers(DEFAULT_VISUAL_FRACTION if fraction is None else fraction, depth)


def analyze(vlm, builder: SequenceBuilder, sources, *, samples: int, visual_region: Sequence[int],
            micro_batch_size: int = 8, checkpoint: str | None = None) -> InfluenceReport:
    sources = list(sources)
    items = calibration_items(sources, builder, samples)
    if not items:
        raise ValueError("no decodable calibration samples")
    layers, stats = measure(vlm, batches_of(items, builder.tok.pad_id, micro_batch_size), visual_region=visual_region)
    return InfluenceReport(layers, list(visual_region), {s.name: s.modality for s in sources}, samples, stats, checkpoint)


def open_calibration_sources(data_args: Sequence[str], *, image_spec, endpoint_url: str | None = None) -> list:
    from ..data.shards import ImageTransform, ShardedSource

    transform = ImageTransform(image_spec.size, image_spec.mean, image_spec.std) if image_spec else ImageTransform()
    out = []
    for i, arg in enumerate(data_args):
        name, modality, uri = parse_data_arg(arg, i)
        modality = modality or detect_modality(uri, endpoint_url)
        out.append(ShardedSource(name=name, modality=modality, shards=uri, shuffle=False, image=transform,
                                 endpoint_url=endpoint_url))
    return out


def parse_layers(value: str | None) -> list[int] | None:
    if not value:
        return None
    return [int(x) for x in value.replace(" ", "").split(",") if x]


def main(args: argparse.Namespace) -> int:
    """`vlmpretrain analyze-layers`."""
    from ..checkpoint.model_io import load_checkpoint_model
    from .region import region_for

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    loaded = load_checkpoint_model(args.checkpoint, config=args.config, stage=args.stage, endpoint_url=args.endpoint,
                                   device=args.device)
    try:
        region = region_for(loaded, fraction=args.visual_fraction, layers=parse_layers(args.visual_layers))
        sources = open_calibration_sources(args.data, image_spec=loaded.vlm.image_spec,
                                           endpoint_url=loaded.endpoint_url)
        report = analyze(loaded.vlm, loaded.builder, sources, samples=args.samples, visual_region=region,
                         micro_batch_size=args.micro_batch_size, checkpoint=loaded.uri)
    finally:
        loaded.close()
    print(report.table())
    paths = report.save(args.out, title=f"Block influence: {loaded.uri}")
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


"""Does vision flow into the language model? Caption loss with the true image vs a wrong one.

Take held-out image-text samples (a source's ``validationUri``), and score each caption
twice with the trained VLM: once with its own image, once with another sample's image
(a derangement: every sample gets the image of a sample whose caption differs). The
caption tokens, the prompt layout and the number of image tokens are identical in both
passes; only the pixels differ. A model that ignores its image gives both the same loss
(ratio 1.0); a model whose captions come from the image pays heavily for a wrong one.

The demo's captions ("a blue square at the top and an orange circle on the left") mix
grammar, which the text alone predicts, with colour/shape/position words, which only the
image can. The loss is the mean next-token loss over every caption token (grammar
included), so the ratio understates how much the image-dependent words depend on it.

``python -m vlm_trainer.grounding CHECKPOINT --config CONFIG`` evaluates any committed
checkpoint (``<root>/<stage>/`` = its newest, or ``<root>/<stage>/step-N/``); relative data
paths in the config resolve against the working directory, as they did for the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import sys
import warnings

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GroundingResult:
    checkpoint: str
    source: str
    samples: int
    tokens: int
    true_loss: float
    mismatched_loss: float
    blank_loss: float  # a blank (mid-grey) image: what the text alone predicts, roughly

    @property
    def ratio(self) -> float:
        return self.mismatched_loss / self.true_loss if self.true_loss > 0 else math.inf

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


def derangement(captions: list, seed: int = 0) -> list[int]:
    """perm[i] != i and captions[perm[i]] != captions[i] wherever possible."""
    n = len(captions)
    rng = random.Random(seed)
    perm = list(range(n))
    for _ in range(100):
        rng.shuffle(perm)
        bad = [i for i in range(n) if perm[i] == i or captions[perm[i]] == captions[i]]
        for i in bad:  # repair by swapping with a random partner that keeps both valid
            for _ in range(4 * n):
                j = rng.randrange(n)
                if (perm[j] != i and captions[perm[j]] != captions[i]
                        and perm[i] != j and captions[perm[i]] != captions[j]):
                    perm[i], perm[j] = perm[j], perm[i]
                    break
        if all(perm[i] != i and captions[perm[i]] != captions[i] for i in range(n)):
            return perm
    return [(i + 1) % n for i in range(n)] if n > 1 else perm


@torch.no_grad()
def caption_loss(vlm, builder, items, *, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss over the label tokens of ``items`` (pooled), and the token count."""
    from .model import token_losses
    from .data.sequences import collate

    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i:i + batch_size], builder.tok.pad_id)
        logits = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values, n_image_positions=batch.n_image_tokens)
        losses = token_losses(logits, batch.labels)
        total += float(losses.sum())
        count += batch.n_label_tokens
    return (total / count if count else math.nan), count


def evaluate(loaded, *, source: str | None = None, samples: int = 128, seed: int = 0) -> GroundingResult:
    """Grounding of an already loaded checkpoint (`vlm_trainer.checkpoint.model_io.LoadedModel`)."""
    from .data.loader import open_sources, validation_set

    spec = loaded.cfg.spec
    candidates = [s for s in spec.data.sources if s.modality == "image-text" and s.validation_uri]
    if source is not None:
        candidates = [s for s in candidates if s.name == source]
    if not candidates:
        raise ValueError("grounding needs an image-text source with a validationUri"
                         + (f" named {source!r}" if source else ""))
    src_spec = candidates[0]
    vlm, builder = loaded.vlm, loaded.builder
    vlm.eval()
    src = open_sources(spec.data, [src_spec.name], image=vlm.image_spec, seed=spec.seed, split="validation",
                       endpoint_url=spec.checkpoint.endpoint or None)[src_spec.name]
    items = [e for e in validation_set(src, builder, samples) if len(e.images) == 1]
    if len(items) < 2:
        raise ValueError(f"source {src_spec.name!r}: fewer than 2 held-out samples with one image")
    captions = [tuple(t for t in e.labels if t >= 0) for e in items]  # the caption's token ids
    perm = derangement(captions, seed)
    mismatched = [dataclasses.replace(e, images=[items[perm[i]].images[0]]) for i, e in enumerate(items)]
    blank = [dataclasses.replace(e, images=[e.images[0] * 0.0]) for e in items]  # normalised 0 = mid-grey
    true_loss, n_tokens = caption_loss(vlm, builder, items)
    mis_loss, _ = caption_loss(vlm, builder, mismatched)
    blank_loss, _ = caption_loss(vlm, builder, blank)
    return GroundingResult(checkpoint=loaded.uri, source=src_spec.name, samples=len(items), tokens=n_tokens,
                           true_loss=true_loss, mismatched_loss=mis_loss, blank_loss=blank_loss)


def evaluate_checkpoint(uri: str, *, config=None, source: str | None = None, samples: int = 128,
                        seed: int = 0) -> GroundingResult:
    """Load a committed checkpoint (``config``: TrainerConfig, its YAML path, or None = stored) and evaluate."""
    from .checkpoint.model_io import load_checkpoint_model

    with torch.no_grad():  # scoped: callers in the same process may train afterwards
        with warnings.catch_warnings():  # DCP's note that it loads in a single process: intended
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            loaded = load_checkpoint_model(uri, config=config)
        try:
            return evaluate(loaded, source=source, samples=samples, seed=seed)
        finally:
            loaded.close()


def format_result(r: GroundingResult, threshold: float | None = None) -> str:
    lines = [
        f"grounding: caption loss on {r.samples} held-out '{r.source}' samples ({r.tokens} caption tokens)",
        f"  true image        {r.true_loss:.4f}",
        f"  mismatched image  {r.mismatched_loss:.4f}   ({r.ratio:.2f}x the true-image loss)",
        f"  blank image       {r.blank_loss:.4f}",
    ]
    if threshold is not None:
        verdict = "PASS" if r.ratio >= threshold else "FAIL"
        lines.append(f"  {verdict}: mismatched / true = {r.ratio:.2f} (threshold >= {threshold:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_trainer.grounding", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="<root>/<stage>/ (newest committed) or <root>/<stage>/step-N/")
    parser.add_argument("--config", help="TrainerConfig YAML (runs/<name>/<stage>/config.yaml) or the manifest")
    parser.add_argument("--source", help="image-text source to use (default: the first with a validationUri)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threshold", type=float, help="exit 1 when mismatched/true is below this")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    r = evaluate_checkpoint(args.checkpoint, config=args.config, source=args.source, samples=args.samples)
    print(json.dumps(r.as_dict(), indent=2) if args.json else format_result(r, args.threshold))
    return 1 if args.threshold is not None and r.ratio < args.threshold else 0


if __name__ == "__main__":
    sys.exit(main())

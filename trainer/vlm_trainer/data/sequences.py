"""Samples -> token sequences -> padded or packed batches.

One sample is encoded as one token sequence:

    [bos] segment tokens in document order ... [eos]

* a text segment contributes its tokens; they are also the labels;
* an image segment contributes exactly ``tokens_per_image`` placeholder ids, labelled
  ``IGNORE_INDEX`` (-100) like bos and padding: the model never predicts image positions;
* truncation to ``seqLength``: text is cut at the limit; an image whose placeholder block
  does not fit whole ends the sequence before it (an image is never cut).

Unpacked (``data.packing: false``, :func:`collate`): one sample per row, rows right-padded
to the longest sequence of the micro-batch (rounded up to a multiple of 8), with an
attention mask.

Packed (:func:`collate_packed`, rows planned by `vlm_trainer.data.packing`): several whole
samples per row, one after another, then padding; ``position_ids`` restart at 0 for every
sample (and for the padding), and the first label of every sample is ``IGNORE_INDEX`` (the
last token of one sample never predicts the next sample's first token). The model gets no
attention mask but the position ids: transformers derives the block-diagonal causal
(document) mask from them (`VLM.forward`), so a token attends only within its own sample.
:meth:`Batch.flattened` concatenates a packed micro-batch's real tokens into one row with
``cu_seq_lens`` for flash-attention's variable-length kernels (padding-free).

Token counts (text, image, label, padding) are computed on the CPU here, so the training
loop never syncs a device to count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..model import IGNORE_INDEX
from ..tokenizer import TokenizerBundle


@dataclasses.dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    images: list[np.ndarray]  # CHW float32, in placeholder order
    source: str
    modality: str
    n_image_tokens: int
    index: int = -1  # the sample's global position in its source

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_text_tokens(self) -> int:
        return self.n_tokens - self.n_image_tokens


class SequenceBuilder:
    """Encodes `vlm_trainer.data.shards.Sample`s for a given tokenizer, image size and seqLength."""

    def __init__(self, tok: TokenizerBundle, *, tokens_per_image: int, seq_length: int):
        self.tok = tok
        self.tokens_per_image = tokens_per_image
        self.seq_length = seq_length

    def encode(self, sample, modality: str) -> Encoded:
        from .shards import ImageSeg, TextSeg

        ids: list[int] = []
        labels: list[int] = []
        images: list[np.ndarray] = []
        if self.tok.bos_id is not None:
            ids.append(self.tok.bos_id)
            labels.append(IGNORE_INDEX)
        limit = self.seq_length
        for seg in sample.segments:
            if len(ids) >= limit:
                break
            if isinstance(seg, TextSeg):
                t = self.tok.encode_text(seg.text)
                ids += t
                labels += t
            elif isinstance(seg, ImageSeg):
                if self.tokens_per_image <= 0:
                    raise ValueError(f"source {sample.source!r} has images but the model has no vision encoder")
                if len(ids) + self.tokens_per_image > limit:
                    break  # never cut an image: the sequence ends before it
                ids += [self.tok.image_token_id] * self.tokens_per_image
                labels += [IGNORE_INDEX] * self.tokens_per_image
                images.append(seg.pixels)
            else:
                raise TypeError(f"unknown segment type {type(seg).__name__}")
        else:
            if self.tok.eos_id is not None:
                ids.append(self.tok.eos_id)
                labels.append(self.tok.eos_id)
        ids, labels = ids[:limit], labels[:limit]
        return Encoded(ids, labels, images, sample.source, modality, self.tokens_per_image * len(images),
                       getattr(sample, "index", -1))


@dataclasses.dataclass
class Batch:
    """A padded micro-batch and its CPU-side counts."""

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, IGNORE_INDEX on bos, images, padding
    pixel_values: torch.Tensor | None  # [N, 3, S, S] float32 or None
    n_image_tokens: int
    n_text_tokens: int
    n_label_tokens: int  # labels that count in the loss (after the shift)
    sources: list[str]  # per sample (row-major in a packed batch)
    modalities: list[str]
    indices: list[int]
    dummy: bool = False  # a stand-in with no real data (keeps collectives in step); loss weight 0
    position_ids: torch.Tensor | None = None  # [B, L] long: packed (restart per sample); None: unpacked
    spans: list[tuple[int, int, int]] | None = None  # packed: (row, start, length) per sample
    flash_kwargs: dict | None = None  # flattened: cu_seq_lens_q/k, max_length_q/k for flash-attention

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def n_tokens(self) -> int:
        return self.n_text_tokens + self.n_image_tokens

    @property
    def n_positions(self) -> int:
        """Positions the model computes (padding included): rows x padded length."""
        return 0 if self.dummy else int(self.input_ids.numel())

    @property
    def n_samples(self) -> int:
        return 0 if self.dummy else len(self.sources)

    @property
    def n_images(self) -> int:
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])

    @property
    def n_sequences(self) -> int:
        return 0 if self.dummy else int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        nb = device.type == "cuda"
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=nb),
            attention_mask=self.attention_mask.to(device, non_blocking=nb),
            labels=self.labels.to(device, non_blocking=nb),
            pixel_values=None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=nb),
            position_ids=None if self.position_ids is None else self.position_ids.to(device, non_blocking=nb),
            flash_kwargs=None if self.flash_kwargs is None else {
                k: v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v for k, v in self.flash_kwargs.items()},
        )

    def flattened(self) -> "Batch":
        """A packed batch as one row of its real tokens (padding dropped), with the
        ``cu_seq_lens`` / ``max_length`` keyword arguments of transformers' flash-attention
        path (what ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` gives), so
        no kernel looks at padding and nothing syncs the device to find the boundaries."""
        if not self.packed or self.dummy:
            return self
        keep = self.attention_mask.bool()
        lengths = [n for _, _, n in self.spans]
        cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32)
        longest = max(lengths) if lengths else 1
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[keep][None],
            attention_mask=self.attention_mask[keep][None],
            labels=self.labels[keep][None],
            position_ids=self.position_ids[keep][None],
            spans=[(0, int(cu[i]), n) for i, n in enumerate(lengths)],
            flash_kwargs={"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest},
        )


def collate(items: list[Encoded], pad_id: int, *, multiple_of: int = 8) -> Batch:
    if not items:
        raise ValueError("collate needs at least one sequence (use dummy_batch)")
    length = max(e.n_tokens for e in items)
    length = max(2, -(-length // multiple_of) * multiple_of)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    images: list[np.ndarray] = []
    n_img = n_label = 0
    for row, e in enumerate(items):
        n = e.n_tokens
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
        images.extend(e.images)
        n_img += e.n_image_tokens
        n_label += sum(1 for lab in e.labels[1:] if lab != IGNORE_INDEX)
    pixels = torch.from_numpy(np.stack(images)) if images else None
    if pixels is not None and torch.cuda.is_available():
        pixels = pixels.pin_memory()
    n_tok = int(mask.sum())
    return Batch(ids, mask, labels, pixels, n_img, n_tok - n_img, n_label,
                 [e.source for e in items], [e.modality for e in items], [e.index for e in items])


def collate_packed(rows: list[list[Encoded]], pad_id: int, *, multiple_of: int = 8) -> Batch:
    """Packed rows -> one micro-batch (see module doc). ``rows[i]`` are the samples of row i,
    in order; every row is padded to the fullest row (rounded up to ``multiple_of``)."""
    if not rows:
        raise ValueError("collate_packed needs at least one row (use dummy_batch)")
    length = max(sum(e.n_tokens for e in row) for row in rows)
    length = max(2, -(-length // multiple_of) * multiple_of)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    images: list[np.ndarray] = []
    spans: list[tuple[int, int, int]] = []
    items: list[Encoded] = []
    n_img = n_label = 0
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = e.n_tokens
            if n == 0:
                continue
            sample_labels = np.asarray(e.labels, dtype=np.int64)  # lists, or the loader's compact int32 arrays
            ids[r, start:start + n] = torch.from_numpy(np.asarray(e.input_ids, dtype=np.int64))
            labels[r, start:start + n] = torch.from_numpy(sample_labels)
            labels[r, start] = IGNORE_INDEX  # never predicted from the previous sample's last token
            mask[r, start:start + n] = 1
            positions[r, start:start + n] = torch.arange(n)
            images.extend(e.images)
            n_img += e.n_image_tokens
            n_label += int(np.count_nonzero(sample_labels[1:] != IGNORE_INDEX))
            spans.append((r, start, n))
            items.append(e)
            start += n
        positions[r, start:] = torch.arange(length - start)  # the padding is a sequence of its own
    pixels = torch.from_numpy(np.stack(images)) if images else None
    if pixels is not None and torch.cuda.is_available():
        pixels = pixels.pin_memory()
    n_tok = int(mask.sum())
    return Batch(ids, mask, labels, pixels, n_img, n_tok - n_img, n_label,
                 [e.source for e in items], [e.modality for e in items], [e.index for e in items],
                 position_ids=positions, spans=spans)


def dummy_batch(tok: TokenizerBundle) -> Batch:
    """One two-token sequence with no labels: contributes exactly 0 to loss and gradients."""
    first = tok.bos_id if tok.bos_id is not None else tok.pad_id
    ids = torch.tensor([[first, tok.pad_id]], dtype=torch.long)
    return Batch(ids, torch.tensor([[1, 0]]), torch.full_like(ids, IGNORE_INDEX), None, 0, 0, 0, [], [], [], dummy=True)

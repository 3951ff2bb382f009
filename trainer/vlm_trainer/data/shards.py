"""Reading webdataset tar shards into uniform :class:`Sample` objects.

A shard is a tar file at a local path, a ``file://`` URI or ``s3://bucket/key``. A sample is
the run of consecutive members sharing a key (the member name before its first dot, as
webdataset defines it). One decoder per modality turns a sample's members
into ``segments`` in document order:

- ``text``: ``<key>.txt`` -> ``[TextSeg]``
- ``image-text``: ``<key>.png|jpg|jpeg|webp`` + ``<key>.txt`` -> ``[ImageSeg, TextSeg]``
- ``interleaved``: ``<key>.json``, either ``{"segments": [{"type": "text", "text": ...},
  {"type": "image", "image": "0.png"}]}`` or OBELICS-style ``{"texts": [str|null, ...],
  "images": [null|"0.png", ...]}``; ``"0.png"`` names the member ``<key>.0.png``.

Addressing. :class:`ShardedSource` numbers the raw samples of a source 0, 1, 2, ... across
epochs: epoch ``e`` visits every shard once, in an order shuffled by ``(seed, name, e)``,
and each shard's samples in member order. A position therefore names one sample forever,
and ``raw(position)`` / ``samples(position)`` resume exactly there (skipping within a shard
without decoding). Bad samples (missing member, undecodable image, bad JSON) keep their
position but are skipped by :meth:`ShardedSource.samples` with a counted warning, so the
numbering does not depend on what decodes. Seeking needs the sample count of the shards
before the target: learnt while reading, by a scan of the shard when still unknown, or
declared up front with ``samples_per_shard``.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import random
import tarfile
import time
from contextlib import closing
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Sequence
from urllib.parse import unquote, urlparse

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError, IncompleteReadError
from PIL import Image
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vlm_api.quantities import expand_braces

log = logging.getLogger(__name__)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
MODALITIES = ("text", "image-text", "interleaved")
# Network failures opening or streaming a shard (after botocore's own retries): re-open it
# and skip what was already read, so positions stay exact.
_TRANSIENT = (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError, IncompleteReadError)
_READ_ATTEMPTS = 4


@dataclass(frozen=True)
class TextSeg:
    text: str


@dataclass(frozen=True, eq=False)
class ImageSeg:
    pixels: np.ndarray  # float32 (3, size, size), normalised with the transform's mean/std


@dataclass
class Sample:
    key: str
    source: str
    segments: list[TextSeg | ImageSeg]
    index: int  # the sample's position in its source (see ShardedSource)


@dataclass(frozen=True)
class RawSample:
    """A sample's undecoded members, keyed by lower-cased suffix (``txt``, ``0.png``)."""

    index: int
    key: str
    shard: str
    members: dict[str, bytes]


class BadSample(ValueError):
    """The sample's members do not form a valid sample of its modality."""


@dataclass(frozen=True)
class ImageTransform:
    """bytes -> float32 CHW array: RGB, bicubic resize to a square, (x/255 - mean) / std."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __call__(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (self.size, self.size))  # JPEG: let libjpeg decode at a reduced scale
            rgb = img.convert("RGB")
        if rgb.size != (self.size, self.size):
            rgb = rgb.resize((self.size, self.size), Image.Resampling.BICUBIC)
        x = np.asarray(rgb, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- decoders


def _text(members: dict[str, bytes], suffix: str) -> str:
    if suffix not in members:
        raise BadSample(f"missing .{suffix} member")
    return members[suffix].decode("utf-8")


def _image(members: dict[str, bytes], ref: object, image: ImageTransform) -> ImageSeg:
    if not isinstance(ref, str) or ref.lower() not in members:
        raise BadSample(f"missing image member {ref!r}")
    return ImageSeg(image(members[ref.lower()]))


def decode_text(members: dict[str, bytes], image: ImageTransform) -> list[TextSeg | ImageSeg]:
    return [TextSeg(_text(members, "txt"))]


def decode_image_text(members: dict[str, bytes], image: ImageTransform) -> list[TextSeg | ImageSeg]:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise BadSample("missing image member")
    return [_image(members, ext, image), TextSeg(_text(members, "txt"))]


def _document(doc: object) -> Iterator[tuple[str, object]]:
    """(kind, value) pairs in document order from either interleaved JSON style."""
    if isinstance(doc, dict) and isinstance(doc.get("segments"), list):
        for seg in doc["segments"]:
            kind = seg.get("type") if isinstance(seg, dict) else None
            if kind not in ("text", "image"):
                raise BadSample(f"segment without type text|image: {seg!r:.80}")
            yield kind, seg.get(kind)
    elif isinstance(doc, dict) and isinstance(doc.get("texts"), list) and isinstance(doc.get("images"), list):
        texts, images = doc["texts"], doc["images"]
        if len(texts) != len(images):
            raise BadSample("texts and images differ in length")
        for text, img in zip(texts, images):
            if text is not None and img is not None:
                raise BadSample("a position holds both a text and an image")
            if img is not None:
                yield "image", img
            elif text is not None:
                yield "text", text
    else:
        raise BadSample('JSON has neither "segments" nor "texts"/"images" lists')


def decode_interleaved(members: dict[str, bytes], image: ImageTransform) -> list[TextSeg | ImageSeg]:
    segments: list[TextSeg | ImageSeg] = []
    for kind, value in _document(json.loads(_text(members, "json"))):
        if kind == "image":
            segments.append(_image(members, value, image))
        elif isinstance(value, str):
            segments.append(TextSeg(value))
        else:
            raise BadSample(f"text segment is not a string: {value!r:.80}")
    if not segments:
        raise BadSample("empty document")
    return segments


DECODERS: dict[str, Callable[[dict[str, bytes], ImageTransform], list[TextSeg | ImageSeg]]] = {
    "text": decode_text,
    "image-text": decode_image_text,
    "interleaved": decode_interleaved,
}


# ----------------------------------------------------------------------------- opening shards


def s3_client(endpoint_url: str | None = None, credentials: dict[str, str] | None = None):
    """boto3 S3 client; ``endpoint_url`` (or env ``AWS_ENDPOINT_URL``) selects an S3-compatible
    store, addressed path-style since those rarely serve virtual-host buckets. ``credentials``:
    a source's own keys (vlm_api.cluster.secret_credentials); none: boto3's default chain."""
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path"} if endpoint else {},
    )
    # A private session: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config, **(credentials or {}))


def local_path(url: str) -> str:
    if not url.startswith("file://"):
        return url
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r}: file:// URIs must be local (file:///abs/path)")
    return unquote(parsed.path)


# ----------------------------------------------------------------------------- the source


@dataclass
class ShardedSource:
    """The samples of one data source, addressable by a global position (see module doc).

    ``shards`` is a URI with ``{000..099}`` ranges or the expanded list. With
    ``samples_per_shard`` every shard is taken to hold exactly that many samples (extra
    ones are ignored, fewer is an error), which spares the counting scan on a seek.
    """

    name: str
    modality: str
    shards: str | Sequence[str]
    seed: int = 0
    shuffle: bool = True
    image: ImageTransform = field(default_factory=ImageTransform)
    samples_per_shard: int | None = None
    endpoint_url: str | None = None
    credentials: dict[str, str] = field(default_factory=dict, repr=False)  # never shown
    # Bad samples by exception type, plus reads of corrupt shards and repeated member names.
    skipped: collections.Counter = field(default_factory=collections.Counter, init=False)
    _counts: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _client: object = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.modality not in DECODERS:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        self.shards = expand_braces(self.shards) if isinstance(self.shards, str) else list(self.shards)
        if not self.shards:
            raise ValueError(f"source {self.name!r} has no shards")
        if self.samples_per_shard is not None:
            self._counts = dict.fromkeys(self.shards, self.samples_per_shard)

    def __getstate__(self) -> dict:
        # boto3 clients do not survive pickling (DataLoader workers); each process makes its own.
        return {**self.__dict__, "_client": None}

    def epoch_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle:
            # str seeds hash with SHA-512: the same order in every process and Python version.
            random.Random(f"{self.seed}:{self.name}:{epoch}").shuffle(order)
        return order

    def epoch_length(self) -> int:
        """Raw samples per epoch (scans the shards whose count is not known yet)."""
        return sum(self._count(url) for url in self.shards)

    def raw(self, position: int = 0) -> Iterator[RawSample]:
        """Undecoded samples from ``position`` on, through endless epochs."""
        epoch, first, skip = self._locate(position)
        while True:
            for url in self.epoch_order(epoch)[first:]:
                for key, members in itertools.islice(self._read_shard(url), skip, None):
                    yield RawSample(position, key, url, members)
                    position += 1
                skip = 0
            epoch, first = epoch + 1, 0

    def decode(self, raw: RawSample, image: Callable[[bytes], object] | None = None) -> Sample | None:
        """The decoded sample, or None (counted, logged) when it is bad. ``image`` replaces
        the source's image transform (the packing loader measures samples with one that
        defers decoding the pixels)."""
        try:
            segments = DECODERS[self.modality](raw.members, image or self.image)
        # Untrusted bytes: PIL alone raises OSError, SyntaxError, ValueError or
        # DecompressionBombError for broken images. One bad sample must not stop training.
        except Exception as exc:
            reason = type(exc).__name__
            self.skipped[reason] += 1
            count = sum(self.skipped.values())
            if count <= 10 or count % 1000 == 0:
                log.warning("source %s: skipped sample %r in %s (%s: %s); %d skipped so far",
                            self.name, raw.key, raw.shard, reason, exc, count)
            return None
        return Sample(raw.key, self.name, segments, raw.index)

    def samples(self, position: int = 0) -> Iterator[Sample]:
        """Decoded samples from ``position`` on; bad ones are skipped (their positions too)."""
        for raw in self.raw(position):
            if (sample := self.decode(raw)) is not None:
                yield sample

    # --------------------------------------------------------------------- internals

    def _locate(self, position: int) -> tuple[int, int, int]:
        """position -> (epoch, index in the epoch's shard order, samples to skip in that shard)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch = 0
        while True:
            for k, url in enumerate(self.epoch_order(epoch)):
                count = self._count(url)
                if position < count:
                    return epoch, k, position
                position -= count
            total = self.epoch_length()  # every count is known after one epoch's walk
            if total == 0:
                raise ValueError(f"source {self.name!r}: its shards hold no samples")
            epoch += 1 + position // total
            position %= total

    def _count(self, url: str) -> int:
        if url not in self._counts:
            for _ in self._read_shard(url):  # records the count when it finishes
                pass
        return self._counts[url]

    def _read_shard(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """A shard's samples; retries transient read errors, enforces and records its count."""
        done, limit = 0, self._counts.get(url)
        for attempt in range(1, _READ_ATTEMPTS + 1):
            try:
                for sample in itertools.islice(self._samples_in(url), done, limit):
                    yield sample
                    done += 1
                break
            except _TRANSIENT as exc:
                if attempt == _READ_ATTEMPTS:
                    raise
                log.warning("source %s: reading %s failed after %d samples (%s); retrying",
                            self.name, url, done, exc)
                time.sleep(0.5 * 2**attempt)
        if limit is not None and done < limit:
            raise ValueError(f"source {self.name!r}: shard {url} holds {done} samples, expected {limit} "
                             "(samples_per_shard, or the shard changed while reading)")
        self._counts[url] = done

    def _samples_in(self, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        # webdataset's tar_file_iterator streams members (skipping __meta__ files, freeing each
        # member); grouping is ours because webdataset's group_by_keys aborts the whole shard
        # on a repeated member name, where we keep the first and go on.
        with closing(self._open(url)) as stream:
            try:
                files = (f for f in tar_file_iterator(stream) if base_plus_ext(f["fname"])[0] is not None)
                for key, group in itertools.groupby(files, key=lambda f: base_plus_ext(f["fname"])[0]):
                    members: dict[str, bytes] = {}
                    for f in group:
                        suffix = base_plus_ext(f["fname"])[1].lower()
                        if suffix in members:
                            self.skipped["duplicate member"] += 1
                            log.warning("source %s: %s repeats member %s.%s; keeping the first",
                                        self.name, url, key, suffix)
                        members.setdefault(suffix, f["data"])
                    yield key, members
            except (tarfile.TarError, EOFError) as exc:
                # A corrupt or truncated tar reads the same way every time, so the shard's
                # count stays stable: it simply ends here.
                self.skipped["corrupt shard"] += 1
                log.warning("source %s: shard %s is corrupt, reading stops there (%s)", self.name, url, exc)

    def _open(self, url: str) -> BinaryIO:
        if url.startswith("s3://"):
            bucket, _, key = url[len("s3://"):].partition("/")
            if self._client is None:
                self._client = s3_client(self.endpoint_url, self.credentials)
            return self._client.get_object(Bucket=bucket, Key=key)["Body"]
        return open(local_path(url), "rb")

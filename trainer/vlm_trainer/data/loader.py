"""The data path of a rank: shard readers -> plan -> encoded sequences -> micro-batches.

* :func:`open_sources` opens one `shards.ShardedSource` per data source (train shards
  shuffled per epoch by (seed, name, epoch); validation shards in order).
* :class:`SourceCursor` walks a source's raw samples sequentially from a global position.
  Every rank reads every planned sample of the step (sample positions are consecutive per
  source) but decodes only its own slots; reading raw tar members is cheap next to image
  decoding. A sample that fails to decode leaves its slot empty (counted as skipped), so
  positions never depend on which rank decoded what.
* :class:`StepLoader` does this for step k+1.. while step k trains (``prefetch`` steps
  ahead) and reports the time the loop waited for data. By default the work runs in a
  forked worker process (``worker="process"``, as torch's DataLoader workers do): in a
  thread, its Python work (tar parsing, decoding glue, tokenisation, collation) holds the
  GIL the training loop needs, which cost ~12-19% of a demo step (benchmarks/
  trainer_overhead.py). ``"thread"`` and ``"inline"`` (no prefetch) remain for tests and
  debugging; ``VLM_DATA_WORKER`` selects one in the trainer.
* Packed (``data.packing: true``, the planner a `packing.PackingPlanner`): the planner
  draws samples one at a time and asks the loader for each one's length
  (:meth:`StepLoader._measure`: every rank reads and tokenises every drawn sample, with the
  image bytes kept undecoded), packs its look-ahead buffer into the step's rows, and every
  rank decodes the images of its own rows only. The raw samples of the buffer stay in the
  loader's memory; after a resume the loader re-reads them by position (:meth:`_restore`).
  A sample whose images fail to decode leaves its place in the row empty (counted as
  skipped), so the plan never depends on which rank decoded what.
* :func:`probe_stats` measures each source's mean tokens per sample and image-token
  fraction over its first ``n`` samples (the mixture planner's `SourceStats`).
* :func:`validation_set` is a fixed, world-size independent held-out set per source.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback

import numpy as np

from vlm_api.cluster import data_secret, resolve_pvc, secret_credentials
from vlm_api.schema import DataSpec

from .mixture import MixturePlanner, Slot, SourceStats, StepPlan, micro_batches, rank_slice
from ..model import ImageSpec
from .packing import Measured, PackedPlan
from .sequences import Batch, Encoded, SequenceBuilder, collate, collate_packed, dummy_batch
from .shards import ImageTransform, RawSample, ShardedSource

log = logging.getLogger(__name__)


def open_sources(data: DataSpec, names, *, image: ImageSpec | None, seed: int, split: str = "train",
                 endpoint_url: str | None = None) -> dict[str, ShardedSource]:
    transform = ImageTransform(image.size, image.mean, image.std) if image else ImageTransform()
    out = {}
    for name in names:
        src = data.source(name)
        uri = src.uri if split == "train" else src.validation_uri
        if uri is None:
            continue
        # pvc://CLAIM/... is read where the claim is mounted (VLM_PVC_DIRS); each source reads
        # S3 with its own credentialsSecret, else the data spec's, else the default chain.
        out[name] = ShardedSource(name=name, modality=src.modality, shards=resolve_pvc(uri), seed=seed,
                                  shuffle=(split == "train"), image=transform, endpoint_url=endpoint_url,
                                  credentials=secret_credentials(data_secret(data, src)))
    return out


class SourceCursor:
    """Sequential raw reader of one source from a global sample position."""

    def __init__(self, source: ShardedSource, position: int = 0):
        self.source = source
        self.position = position
        self._it = source.raw(position)

    def take(self, position: int, n: int) -> list[RawSample]:
        if position != self.position:  # a seek (only after a resume; plans are sequential)
            self._it = self.source.raw(position)
            self.position = position
        out = [next(self._it) for _ in range(n)]
        self.position += n
        return out


def probe_stats(sources: dict[str, ShardedSource], builder: SequenceBuilder, n: int = 64) -> dict[str, SourceStats]:
    stats = {}
    for name, src in sorted(sources.items()):
        tokens = images = count = 0
        for raw in _first(src.raw(0), n):
            sample = src.decode(raw)
            if sample is None:
                continue
            enc = builder.encode(sample, src.modality)
            tokens += enc.n_tokens
            images += enc.n_image_tokens
            count += 1
        if count == 0:
            raise ValueError(f"source {name!r}: no decodable sample among its first {n}")
        stats[name] = SourceStats(mean_tokens=tokens / count, image_fraction=images / max(tokens, 1), probed=count)
    return stats


def _first(it, n):
    for i, x in enumerate(it):
        if i >= n:
            break
        yield x


class _Deferred:
    """An image's encoded bytes, decoded only by the rank whose row holds its sample."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def decode_images(source: ShardedSource, enc: Encoded) -> Encoded | None:
    """``enc`` with its deferred images decoded (None, counted as skipped, when one is bad)."""
    if not any(isinstance(img, _Deferred) for img in enc.images):
        return enc
    try:
        pixels = [source.image(img.data) if isinstance(img, _Deferred) else img for img in enc.images]
    except Exception as exc:  # untrusted bytes: see ShardedSource.decode
        source.skipped[type(exc).__name__] += 1
        log.warning("source %s: skipped sample at position %d (%s: %s)", source.name, enc.index, type(exc).__name__, exc)
        return None
    return dataclasses.replace(enc, images=pixels)


@dataclasses.dataclass
class RankStep:
    """What one rank trains at one step."""

    plan: StepPlan | PackedPlan
    micro: list[Batch]
    skipped: int  # planned samples of this rank that failed to decode
    load_seconds: float

    @property
    def n_positions(self) -> int:
        return sum(b.n_positions for b in self.micro)

    @property
    def n_samples(self) -> int:
        return sum(b.n_samples for b in self.micro)

    @property
    def n_rows(self) -> int:
        return sum(b.n_sequences for b in self.micro)

    @property
    def n_text_tokens(self) -> int:
        return sum(b.n_text_tokens for b in self.micro)

    @property
    def n_image_tokens(self) -> int:
        return sum(b.n_image_tokens for b in self.micro)

    @property
    def n_label_tokens(self) -> int:
        return sum(b.n_label_tokens for b in self.micro)


WORKERS = ("process", "thread", "inline")


class StepLoader:
    """Produces this rank's micro-batches for consecutive steps, prefetching in a worker
    process (default), a thread, or not at all (``inline``)."""

    def __init__(self, planner: MixturePlanner, sources: dict[str, ShardedSource], builder: SequenceBuilder, *,
                 rank: int, world_size: int, micro_batch_size: int, prefetch: int = 2, worker: str = "process"):
        if worker not in WORKERS:
            raise ValueError(f"data worker must be one of {', '.join(WORKERS)}, not {worker!r}")
        self.planner = planner.copy()  # the loader runs ahead; the trainer owns the consumed state
        self.sources = sources
        self.builder = builder
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.cursors = {name: SourceCursor(src, planner.counters.get(name, 0)) for name, src in sources.items()}
        self.packed = bool(getattr(planner, "packing", False))
        self._pending: dict[Slot, Encoded] = {}  # packed: the buffer's samples (tokenised, images undecoded)
        self._restored = not self.packed
        if self.packed:
            self.planner.measure = self._measure
        self.wait_seconds = 0.0
        self.worker = worker
        self._proc = None
        self._thread = None
        if worker == "process":
            ctx = multiprocessing.get_context("fork")  # the sources and planner as they are, no pickling
            self._queue = ctx.Queue(maxsize=max(1, prefetch))
            self._stop = ctx.Event()
            self._proc = ctx.Process(target=self._run_child, args=(os.getpid(),), name="vlm-data", daemon=True)
            self._proc.start()
        elif worker == "thread":
            self._queue = queue.Queue(maxsize=max(1, prefetch))
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, name="vlm-data", daemon=True)
            self._thread.start()

    # ---- building one step
    def build(self, plan: StepPlan | PackedPlan) -> RankStep:
        if isinstance(plan, PackedPlan):
            return self.build_packed(plan)
        t0 = time.perf_counter()
        mine = rank_slice(len(plan.slots), self.world_size, self.rank)
        wanted: dict[str, dict[int, int]] = {}
        for slot_no in mine:
            slot = plan.slots[slot_no]
            wanted.setdefault(slot.source, {})[slot.index] = slot_no
        encoded: dict[int, Encoded | None] = {}
        skipped = 0
        for name, count in sorted(plan.counts.items()):
            if count == 0:
                continue
            first = min(s.index for s in plan.slots if s.source == name)
            for raw in self.cursors[name].take(first, count):
                slot_no = wanted.get(name, {}).get(raw.index)
                if slot_no is None:
                    continue
                src = self.sources[name]
                sample = src.decode(raw)
                if sample is None:
                    skipped += 1
                    encoded[slot_no] = None
                else:
                    encoded[slot_no] = self.builder.encode(sample, src.modality)
        ordered = [encoded[i] for i in mine]
        micro = []
        for part in micro_batches(len(ordered), len(plan.slots), self.world_size, self.micro_batch_size):
            items = [e for e in (ordered[i] for i in part) if e is not None]
            micro.append(collate(items, self.builder.tok.pad_id) if items else dummy_batch(self.builder.tok))
        return RankStep(plan, micro, skipped, time.perf_counter() - t0)

    # ---- packed steps
    def _measure(self, source: str, index: int) -> Measured | None:
        """A drawn sample's length: read, decode with deferred images, tokenise; kept until trained."""
        if not self._restored:
            self._restore()
        src = self.sources[source]
        raw = self.cursors[source].take(index, 1)[0]
        enc = self._encode(src, raw)
        if enc is None:
            return None
        self._pending[Slot(source, index)] = enc
        return Measured(enc.n_tokens, enc.n_image_tokens)

    def _encode(self, src: ShardedSource, raw: RawSample) -> Encoded | None:
        sample = src.decode(raw, _Deferred)
        if sample is None:
            return None
        enc = self.builder.encode(sample, src.modality)
        # the buffer holds ~1.25 steps of samples: int32 arrays take a ninth of a list of ints
        return dataclasses.replace(enc, input_ids=np.asarray(enc.input_ids, dtype=np.int32),
                                   labels=np.asarray(enc.labels, dtype=np.int32))

    def _restore(self) -> None:
        """After a resume: re-read the samples the planner's buffer holds (positions behind
        each source's counter), then continue every cursor at its counter."""
        self._restored = True
        wanted: dict[str, dict[int, int]] = {}
        for p in self.planner.buffer:
            if Slot(p.source, p.index) not in self._pending:
                wanted.setdefault(p.source, {})[p.index] = p.tokens
        for name, lengths in sorted(wanted.items()):
            src, cursor = self.sources[name], self.cursors[name]
            first, last = min(lengths), max(lengths)
            it = src.raw(first)
            for raw in it:
                if raw.index in lengths:
                    enc = self._encode(src, raw)
                    if enc is None or enc.n_tokens != lengths[raw.index]:
                        got = None if enc is None else enc.n_tokens
                        raise RuntimeError(f"source {name!r} position {raw.index}: the packing buffer recorded "
                                           f"{lengths[raw.index]} tokens, re-reading gives {got} (data or tokenizer changed?)")
                    self._pending[Slot(name, raw.index)] = enc
                if raw.index >= last:
                    break
            if cursor.position == last + 1:  # continue from the same reader
                cursor._it = it
        self.planner.measure = self._measure

    def build_packed(self, plan: PackedPlan) -> RankStep:
        t0 = time.perf_counter()
        if not self._restored:
            self._restore()
        n_rows = len(plan.rows)
        mine = set(rank_slice(n_rows, self.world_size, self.rank))
        rows: list[list[Encoded]] = []
        skipped = plan.bad if self.rank == 0 else 0  # every rank saw them: count them once
        for r, row in enumerate(plan.rows):
            encoded = [self._pending.pop(slot) for slot in row]
            if r not in mine:
                continue
            kept = []
            for slot, enc in zip(row, encoded):
                enc = decode_images(self.sources[slot.source], enc)
                if enc is None:
                    skipped += 1
                else:
                    kept.append(enc)
            rows.append(kept)
        micro = []
        for part in micro_batches(len(rows), n_rows, self.world_size, self.micro_batch_size):
            batch_rows = [rows[i] for i in part]
            micro.append(collate_packed(batch_rows, self.builder.tok.pad_id) if any(batch_rows)
                         else dummy_batch(self.builder.tok))
        return RankStep(plan, micro, skipped, time.perf_counter() - t0)

    # ---- iteration
    def _run(self, alive=lambda: True, wire=lambda step: step) -> None:
        try:
            while not self._stop.is_set() and alive():
                item = wire(self.build(self.planner.next()))
                while not self._stop.is_set() and alive():
                    try:
                        self._queue.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced in the training loop
            self._queue.put(_Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc()))

    def _run_child(self, parent: int) -> None:
        """The worker process: dies with the trainer, leaves signals to it (a Ctrl-C or
        SIGTERM stops the trainer at a step boundary; the worker is stopped by `close`)."""
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        _prctl(_PR_SET_NAME, ctypes.c_char_p(b"vlm-data"))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        import torch

        torch.set_num_threads(1)  # collation only; OpenMP pools do not survive fork
        self._run(alive=lambda: os.getppid() == parent, wire=_to_wire)

    def next(self) -> RankStep:
        t0 = time.perf_counter()
        if self.worker == "inline":
            item = self.build(self.planner.next())
        elif self._proc is not None:
            while True:
                try:
                    item = _from_wire(self._queue.get(timeout=1.0))
                    break
                except queue.Empty:
                    if not self._proc.is_alive():
                        raise RuntimeError(f"data worker process exited with code {self._proc.exitcode}") from None
        else:
            item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(item, _Failure):
            raise RuntimeError(f"data loading failed: {item.error}\n{item.trace}")
        return item

    def close(self) -> None:
        if self.worker == "inline":
            return
        self._stop.set()
        if self._proc is not None:
            self._proc.join(timeout=1.0)
            if self._proc.is_alive():  # blocked writing a batch nobody reads: it holds nothing of value
                self._proc.kill()
                self._proc.join(timeout=5)
            self._queue.close()
            self._queue.cancel_join_thread()
        if self._thread is not None:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=5)


@dataclasses.dataclass
class _Failure:
    """An exception of the data worker, as text (it crosses a process boundary)."""

    error: str
    trace: str


_TENSORS = ("input_ids", "attention_mask", "labels", "pixel_values", "position_ids")


def _to_wire(step: RankStep) -> RankStep:
    """Tensors as numpy arrays across the process boundary: they pickle as plain buffers.
    (torch's own multiprocessing reduction moves each tensor through shared memory and a
    file-descriptor handshake: ~1 ms per tensor, more than building the step.)"""
    micro = [dataclasses.replace(b, **{f: getattr(b, f).numpy() for f in _TENSORS if getattr(b, f) is not None})
             for b in step.micro]
    return dataclasses.replace(step, micro=micro)


def _from_wire(item):
    if not isinstance(item, RankStep):
        return item
    import torch

    micro = [dataclasses.replace(b, **{f: torch.from_numpy(getattr(b, f)) for f in _TENSORS if getattr(b, f) is not None})
             for b in item.micro]
    return dataclasses.replace(item, micro=micro)


_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15


def _prctl(option: int, arg) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the worker still polls its parent
        pass


def validation_set(source: ShardedSource, builder: SequenceBuilder, n: int) -> list[Encoded]:
    """The first ``n`` decodable held-out samples, in shard order."""
    out = []
    for raw in _first(source.raw(0), min(n * 4, source.epoch_length())):  # bounded: bad samples cannot loop forever
        sample = source.decode(raw)
        if sample is not None:
            out.append(builder.encode(sample, source.modality))
            if len(out) >= n:
                break
    return out

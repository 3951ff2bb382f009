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

from vlm_api.schema import DataSpec

from .mixture import MixturePlanner, SourceStats, StepPlan, micro_batches, rank_slice
from .model import ImageSpec
from .sequences import Batch, Encoded, SequenceBuilder, collate, dummy_batch
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
        out[name] = ShardedSource(name=name, modality=src.modality, shards=uri, seed=seed,
                                  shuffle=(split == "train"), image=transform, endpoint_url=endpoint_url)
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


@dataclasses.dataclass
class RankStep:
    """What one rank trains at one step."""

    plan: StepPlan
    micro: list[Batch]
    skipped: int  # planned samples of this rank that failed to decode
    load_seconds: float

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
    def build(self, plan: StepPlan) -> RankStep:
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


_TENSORS = ("input_ids", "attention_mask", "labels", "pixel_values")


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

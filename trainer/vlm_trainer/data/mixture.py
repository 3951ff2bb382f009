"""The mixture sampler: which sample goes into which sequence slot of every global batch.

Pure bookkeeping, no I/O. A global batch is ``G = globalBatchTokens // seqLength``
sequences (slots), one sample each. For step ``k`` of a stage:

1. **Token fractions -> sample probabilities.** The stage mixture gives token fractions
   ``f_s``. Samples of different sources have different lengths, so source ``s`` is drawn
   with probability ``p_s = (f_s / t_s) / sum_j (f_j / t_j)`` where ``t_s`` is its mean
   tokens per sample (text + image tokens, after truncation), measured once per stage by
   a deterministic probe (`SourceStats`, kept in the state so a resume plans identically).
   Before ``visualIntroduceAt`` (step < ``intro_step = ceil(visualIntroduceAt * steps)``)
   multimodal sources weigh 0 and the text sources are renormalised; from ``intro_step`` on
   the stage mixture applies. (A stage with no text source ignores visualIntroduceAt.)
2. **Counts per source (low discrepancy, not random).** Each source carries a credit;
   every step adds ``p_s * G`` and the step takes ``floor(credit)`` samples of each source,
   then one more from the sources with the largest remaining fractions (ties by name)
   until ``G`` slots are filled; the credit is reduced by what was taken. Cumulative counts
   therefore never drift more than one sample from ``p_s * G * steps``, so measured token
   fractions hit the mixture within a few hundred samples.
3. **Slot order.** The step's ``G`` source labels are shuffled by a generator seeded with
   ``(seed, stage, step)``; the ``i``-th slot labelled ``s`` takes sample position
   ``counter_s + i`` of that source (positions per source are consecutive), then
   ``counter_s += count_s``.

The data position is the per-source global sample counters (+ credits + step): the global
batch of every step is a function of that state only, never of the world size. Rank ``r``
of ``W`` takes slots ``[r*G//W, (r+1)*G//W)`` (sizes differ by at most one) and splits
them into ``n_micro = ceil(ceil(G/W) / microBatchSize)`` micro-batches, the same count on
every rank (sizes differ by at most one; an empty one is a zero-weight dummy), so a
resume with a different world size neither repeats nor skips a sample, and the tokens per
optimizer step do not depend on ``W``.

That is the unpacked plan (``data.packing: false``). With packing (the default),
`vlm_trainer.data.packing.PackingPlanner` (a subclass) keeps steps 1 and 2's meaning per drawn
sample instead of per step (sample probabilities from token fractions, low-discrepancy
credits), and packs the drawn samples into rows of a token budget; its state adds the
look-ahead buffer, so the same guarantees hold.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib

import numpy as np

MULTIMODAL = ("image-text", "interleaved")


@dataclasses.dataclass
class SourceStats:
    """Mean composition of a source's sequences (from a probe of its first samples)."""

    mean_tokens: float
    image_fraction: float  # image tokens / tokens
    probed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Slot:
    source: str
    index: int  # global sample position within the source


@dataclasses.dataclass
class StepPlan:
    step: int
    slots: list[Slot]
    counts: dict[str, int]
    multimodal: bool  # multimodal sources were eligible at this step
    state_after: dict  # the planner state once this step has been consumed


def intro_step(visual_introduce_at: float, total_steps: int) -> int:
    return int(math.ceil(visual_introduce_at * total_steps - 1e-9))


def sample_probs(fractions: dict[str, float], stats: dict[str, SourceStats]) -> dict[str, float]:
    w = {s: f / max(stats[s].mean_tokens, 1e-9) for s, f in fractions.items() if f > 0}
    total = sum(w.values())
    return {s: v / total for s, v in sorted(w.items())}


def phase_fractions(mixture: dict[str, float], modality: dict[str, str], multimodal: bool) -> dict[str, float]:
    """Token fractions of a phase: the mixture, or text sources renormalised before images enter."""
    mix = {s: f for s, f in mixture.items() if f > 0}
    if multimodal:
        return mix
    text = {s: f for s, f in mix.items() if modality[s] not in MULTIMODAL}
    total = sum(text.values())
    if total <= 0:
        return mix  # nothing to renormalise to: images from the start
    return {s: f / total for s, f in text.items()}


def expected_image_fraction(fractions: dict[str, float], stats: dict[str, SourceStats]) -> float:
    return sum(f * stats[s].image_fraction for s, f in fractions.items())


def rank_slice(global_size: int, world_size: int, rank: int) -> range:
    return range(rank * global_size // world_size, (rank + 1) * global_size // world_size)


def micro_batches(n: int, global_size: int, world_size: int, micro_batch_size: int) -> list[range]:
    """Split ``n`` local sequences into the step's (rank-independent) number of micro-batches."""
    per_rank_max = -(-global_size // world_size)
    n_micro = max(1, -(-per_rank_max // micro_batch_size))
    out, start = [], 0
    for j in range(n_micro):
        size = n // n_micro + (1 if j < n % n_micro else 0)
        out.append(range(start, start + size))
        start += size
    return out


class MixturePlanner:
    """Plans global batches step by step from a resumable state (see module doc)."""

    packing = False  # `vlm_trainer.data.packing.PackingPlanner` packs several samples per sequence

    def __init__(self, *, stage: str, mixture: dict[str, float], modality: dict[str, str],
                 stats: dict[str, SourceStats], global_batch: int, total_steps: int,
                 visual_introduce_at: float, seed: int):
        unknown = set(mixture) - set(modality)
        if unknown:
            raise ValueError(f"mixture names unknown sources {sorted(unknown)}")
        self.stage = stage
        self.mixture = {s: float(f) for s, f in mixture.items() if f > 0}
        self.modality = dict(modality)
        self.stats = dict(stats)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.visual_introduce_at = float(visual_introduce_at)
        self.has_text = any(modality[s] not in MULTIMODAL for s in self.mixture)
        self.set_total_steps(total_steps)
        self.step = 0
        self.counters: dict[str, int] = {}
        self.credits: dict[str, float] = {s: 0.0 for s in sorted(self.mixture)}
        self.stage_samples: dict[str, int] = {s: 0 for s in sorted(self.mixture)}

    def set_total_steps(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        self.intro_step = intro_step(self.visual_introduce_at, self.total_steps) if self.has_text else 0

    # ---- phases
    def multimodal_at(self, step: int) -> bool:
        return step >= self.intro_step

    def fractions_at(self, step: int) -> dict[str, float]:
        return phase_fractions(self.mixture, self.modality, self.multimodal_at(step))

    def probs_at(self, step: int) -> dict[str, float]:
        return sample_probs(self.fractions_at(step), self.stats)

    def target_image_fraction(self, step: int) -> float:
        return expected_image_fraction(self.fractions_at(step), self.stats)

    # ---- planning
    def counts_for(self, probs: dict[str, float]) -> dict[str, int]:
        g = self.global_batch
        counts = {}
        for s in sorted(self.credits):
            self.credits[s] += probs.get(s, 0.0) * g
            counts[s] = max(0, math.floor(self.credits[s]))
        left = g - sum(counts.values())
        if left < 0:  # cannot happen with sum(probs) == 1 beyond float noise: trim the largest
            for s in sorted(counts, key=lambda s: (-counts[s], s))[: -left]:
                counts[s] -= 1
            left = 0
        eligible = [s for s in sorted(self.credits) if probs.get(s, 0.0) > 0]
        by_remainder = sorted(eligible, key=lambda s: (-(self.credits[s] - counts[s]), s))
        for s in by_remainder[:left]:
            counts[s] += 1
        for s in counts:
            self.credits[s] -= counts[s]
        return counts

    def next(self) -> StepPlan:
        step = self.step
        counts = self.counts_for(self.probs_at(step))
        labels = [s for s in sorted(counts) for _ in range(counts[s])]
        rng = np.random.default_rng([self.seed, zlib.crc32(self.stage.encode()), step])
        order = rng.permutation(len(labels))
        seen: dict[str, int] = {}
        slots = []
        for j in order:
            s = labels[j]
            slots.append(Slot(s, self.counters.get(s, 0) + seen.get(s, 0)))
            seen[s] = seen.get(s, 0) + 1
        for s, n in counts.items():
            self.counters[s] = self.counters.get(s, 0) + n
            self.stage_samples[s] = self.stage_samples.get(s, 0) + n
        self.step += 1
        return StepPlan(step, slots, counts, self.multimodal_at(step), self.state_dict())

    # ---- state (the data position)
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "counters": dict(self.counters),
            "credits": dict(self.credits),
            "stage_samples": dict(self.stage_samples),
            "stats": {s: st.to_dict() for s, st in self.stats.items()},
            "stage": self.stage,
        }

    def load_state_dict(self, state: dict, *, positions_only: bool = False) -> None:
        """Resume (same stage) or, with ``positions_only``, carry the per-source counters of
        a previous stage into a new one (a new stage starts its own step/credits/stats)."""
        self.counters = {s: int(n) for s, n in state.get("counters", {}).items()}
        if positions_only:
            return
        if state.get("packing") is not None and not self.packing:
            raise ValueError("the checkpoint's data position is a packed one (data.packing was true): "
                             "resume it with data.packing: true")
        self.step = int(state["step"])
        self.credits = {s: float(c) for s, c in state["credits"].items()}
        self.stage_samples = {s: int(n) for s, n in state.get("stage_samples", {}).items()}
        if state.get("stats"):
            self.stats = {s: SourceStats(**d) for s, d in state["stats"].items()}

    def copy(self) -> "MixturePlanner":
        return copy.deepcopy(self)


def _mean_tokens(probs: dict[str, float], stats: dict[str, SourceStats]) -> float:
    return max(1e-9, sum(p * stats[s].mean_tokens for s, p in probs.items()))


def steps_for_epochs(epochs: float, sizes: dict[str, int], planner: MixturePlanner) -> int:
    """Steps until every source of the mixture was seen ``epochs`` times (the slowest one
    bounds it), with the pre-/post-``visualIntroduceAt`` phases weighted by their share."""
    v = planner.visual_introduce_at if planner.has_text else 0.0
    pre = sample_probs(phase_fractions(planner.mixture, planner.modality, False), planner.stats)
    post = sample_probs(phase_fractions(planner.mixture, planner.modality, True), planner.stats)
    # samples per step: G sequences of one sample each, or (packed) the token budget over
    # the phase's mean sample length
    budget = getattr(planner, "token_budget", None) if planner.packing else None
    per_pre = planner.global_batch if budget is None else budget / _mean_tokens(pre, planner.stats)
    per_post = planner.global_batch if budget is None else budget / _mean_tokens(post, planner.stats)
    need = 0.0
    for s in planner.mixture:
        per_step = v * per_pre * pre.get(s, 0.0) + (1 - v) * per_post * post.get(s, 0.0)
        if per_step > 0:
            need = max(need, epochs * sizes[s] / per_step)
    return max(1, int(math.ceil(need - 1e-9)))

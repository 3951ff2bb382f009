"""The mixture sampler and the data path: token fractions, visualIntroduceAt, world-size
invariance and exact resume positions (real shards, no processes)."""

from __future__ import annotations

import collections

import pytest

from tests.fixtures_trainer import shared_data, tiny_bundle
from vlm_api.schema import DataSpec
from vlm_trainer.data.loader import StepLoader, open_sources, probe_stats
from vlm_trainer.data.mixture import MixturePlanner, SourceStats, micro_batches, rank_slice
from vlm_trainer.data.sequences import SequenceBuilder

MIX = {"text": 0.5, "captions": 0.35, "interleaved": 0.15}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = shared_data(tmp_path_factory)
    spec = DataSpec.model_validate({"seqLength": 96, "sources": [
        {"name": n, "modality": d["modality"], "uri": d["uri"], "validationUri": d["validationUri"]} for n, d in data.items()]})
    tok, vlm = tiny_bundle()
    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=96)
    modality = {s.name: s.modality for s in spec.sources}

    def sources():
        return open_sources(spec, sorted(MIX), image=vlm.image_spec, seed=0)

    stats = probe_stats(sources(), builder, 64)
    return spec, builder, modality, sources, stats


def planner(world, *, steps=40, intro=0.5, global_batch=16, mixture=MIX):
    _, _, modality, _, stats = world
    return MixturePlanner(stage="pretrain", mixture=mixture, modality=modality, stats=stats,
                          global_batch=global_batch, total_steps=steps, visual_introduce_at=intro, seed=7)


def loader(world, plan, rank=0, world_size=1, mbs=4):
    _, builder, _, sources, _ = world
    return StepLoader(plan, sources(), builder, rank=rank, world_size=world_size, micro_batch_size=mbs, worker="inline")


def test_image_token_fraction_zero_before_intro_and_on_target_after(world):
    """Measured on the real encoded sequences: 0 image tokens before visualIntroduceAt, and
    over the 320 samples after it the per-source token fractions and the image-token fraction
    are within +-0.02 of the stage mixture."""
    p = planner(world)
    assert p.intro_step == 20
    ld = loader(world, p)
    before = collections.Counter()
    after = collections.Counter()
    after_image = collections.Counter()
    n_after = 0
    for step in range(40):
        rs = ld.next()
        for batch in rs.micro:
            if step < 20:
                assert batch.n_image_tokens == 0 and batch.pixel_values is None
                before["image"] += batch.n_image_tokens
            rows = batch.attention_mask.sum(1).tolist()
            for row, src in enumerate(batch.sources):
                if step >= 20:
                    after[src] += rows[row]
                    after_image[src] += int((batch.input_ids[row] == ld.builder.tok.image_token_id).sum())
                    n_after += 1
                else:
                    assert src == "text"
    assert n_after == 320 and before["image"] == 0
    total = sum(after.values())
    for src, f in MIX.items():
        assert abs(after[src] / total - f) <= 0.02, (src, after[src] / total, f)
    measured = sum(after_image.values()) / total
    per_source_ratio = {s: after_image[s] / after[s] for s in MIX}
    expected = sum(MIX[s] * per_source_ratio[s] for s in MIX)
    assert expected > 0.1
    assert abs(measured - expected) <= 0.02, (measured, expected)
    # the planner's own target (from the probe) agrees too
    assert abs(p.target_image_fraction(30) - measured) <= 0.02
    assert p.target_image_fraction(0) == 0.0


def test_text_sources_renormalised_before_intro(world):
    p = planner(world, mixture={"text": 0.4, "captions": 0.6}, steps=10, intro=0.5)
    assert p.fractions_at(0) == {"text": 1.0}
    assert p.fractions_at(5) == {"text": 0.4, "captions": 0.6}
    only_images = planner(world, mixture={"captions": 1.0}, steps=10, intro=0.5)
    assert only_images.intro_step == 0  # nothing to renormalise to: images from the start


@pytest.mark.parametrize("g,w,mbs", [(16, 1, 4), (16, 2, 4), (16, 3, 4), (5, 2, 8), (3, 2, 1), (2, 4, 1), (37, 5, 3)])
def test_rank_slices_partition_and_micro_steps_agree(g, w, mbs):
    slices = [rank_slice(g, w, r) for r in range(w)]
    assert [i for s in slices for i in s] == list(range(g))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    counts = {len(micro_batches(len(s), g, w, mbs)) for s in slices}
    assert len(counts) == 1  # every rank runs the same number of micro-steps (FSDP collectives)
    for s in slices:
        sizes = [len(m) for m in micro_batches(len(s), g, w, mbs)]
        assert sum(sizes) == len(s) and max(sizes) <= mbs and max(sizes) - min(sizes) <= 1


def _global_steps(world, plan, world_size, steps):
    """Per step: the global batch as [(source, index, input_ids)] in slot order, and its token count."""
    loaders = [loader(world, plan, r, world_size) for r in range(world_size)]
    out = []
    for _ in range(steps):
        seqs, tokens = [], 0
        for ld in loaders:
            rs = ld.next()
            for b in rs.micro:
                if b.dummy:
                    continue
                tokens += int(b.attention_mask.sum())
                for row, (src, idx) in enumerate(zip(b.sources, b.indices)):
                    n = int(b.attention_mask[row].sum())
                    seqs.append((src, idx, tuple(b.input_ids[row, :n].tolist())))
        out.append((seqs, tokens, rs.plan.state_after))
    return out


def test_global_batch_is_world_size_invariant(world):
    runs = {w: _global_steps(world, planner(world, steps=12, intro=0.25), w, 6) for w in (1, 2, 3)}
    for w in (2, 3):
        for (s1, t1, _), (sw, tw, _) in zip(runs[1], runs[w]):
            assert tw == t1 and sw == s1


def test_resume_with_another_world_size_neither_repeats_nor_skips(world):
    """Uninterrupted at world size 2 vs. interrupted at step k=5 (2 ranks) and resumed at world size 1."""
    n, k = 12, 5
    full = _global_steps(world, planner(world, steps=n, intro=0.3), 2, n)
    first = _global_steps(world, planner(world, steps=n, intro=0.3), 2, k)
    state = first[-1][2]
    resumed_planner = planner(world, steps=n, intro=0.3)
    resumed_planner.load_state_dict(state)
    rest = _global_steps(world, resumed_planner, 1, n - k)
    sequence = [s for step in first + rest for s in step[0]]
    assert sequence == [s for step in full for s in step[0]]
    keys = [(src, idx) for src, idx, _ in sequence]
    assert len(keys) == len(set(keys))  # no sample twice
    for src in {s for s, _ in keys}:  # and none skipped: consecutive positions per source
        idx = sorted(i for s, i in keys if s == src)
        assert idx == list(range(idx[0], idx[0] + len(idx)))


def test_counts_track_probabilities_tightly():
    stats = {"a": SourceStats(100.0, 0.0), "b": SourceStats(30.0, 0.5), "c": SourceStats(60.0, 0.2)}
    p = MixturePlanner(stage="s", mixture={"a": 0.5, "b": 0.3, "c": 0.2},
                       modality={"a": "text", "b": "image-text", "c": "interleaved"}, stats=stats,
                       global_batch=7, total_steps=100, visual_introduce_at=0.0, seed=0)
    probs = p.probs_at(0)
    taken = collections.Counter()
    for step in range(100):
        plan = p.next()
        assert len(plan.slots) == 7
        taken.update(plan.counts)
        for s, q in probs.items():
            assert abs(taken[s] - q * 7 * (step + 1)) < 1.0 + 1e-9


def test_epochs_to_steps_is_bounded_by_the_slowest_source():
    stats = {"a": SourceStats(100.0, 0.0), "b": SourceStats(50.0, 0.5)}
    p = MixturePlanner(stage="sft", mixture={"a": 0.5, "b": 0.5}, modality={"a": "text", "b": "image-text"},
                       stats=stats, global_batch=10, total_steps=1, visual_introduce_at=0.0, seed=0)
    # sample probabilities 1/3 (a) and 2/3 (b): a needs 2 x 300 / (10/3) = 180 steps, b 2 x 1000 / (20/3) = 300
    from vlm_trainer.data.mixture import steps_for_epochs

    assert steps_for_epochs(2, {"a": 300, "b": 1000}, p) == 300
    assert steps_for_epochs(2, {"a": 3000, "b": 1000}, p) == 1800
    p.visual_introduce_at = 0.5  # b only drawn in the second half: it needs twice the steps
    assert steps_for_epochs(2, {"a": 300, "b": 1000}, p) == 600


def _fingerprint(rs) -> tuple:
    return (rs.plan.step, tuple((b.input_ids.tolist(), b.labels.tolist(), None if b.pixel_values is None
                                 else round(float(b.pixel_values.sum()), 4), tuple(b.sources)) for b in rs.micro))


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_prefetching_workers_deliver_exactly_the_inline_sequence(world, worker):
    """The worker process (the trainer's default) and the thread produce the same steps, in
    the same order, with the same tensors and planner states as building them inline."""
    _, builder, _, sources, _ = world
    inline = loader(world, planner(world, steps=12, intro=0.25))
    expected = [_fingerprint(inline.next()) for _ in range(12)]
    ld = StepLoader(planner(world, steps=12, intro=0.25), sources(), builder, rank=1, world_size=2,
                    micro_batch_size=4, worker=worker)
    ref = StepLoader(planner(world, steps=12, intro=0.25), sources(), builder, rank=1, world_size=2,
                     micro_batch_size=4, worker="inline")
    try:
        got = [ld.next() for _ in range(12)]
        want = [ref.next() for _ in range(12)]
    finally:
        ld.close()
    assert [_fingerprint(g) for g in got] == [_fingerprint(w) for w in want]
    assert [g.plan.state_after for g in got] == [w.plan.state_after for w in want]
    assert all(b.input_ids.dtype == w.input_ids.dtype for g, w in zip(got, want) for b, w in zip(g.micro, w.micro))
    assert expected != [_fingerprint(g) for g in got]  # rank 1 of 2 is not rank 0 of 1: the check can fail
    if worker == "process":
        assert not ld._proc.is_alive()  # close() ends the worker


def test_worker_process_failure_reaches_the_training_loop(world):
    """A data error in the worker process is raised by next() with the worker's traceback."""
    _, builder, _, sources, _ = world
    srcs = sources()
    srcs["captions"].shards = ["/nonexistent/shard-00000.tar"]
    ld = StepLoader(planner(world, steps=8, intro=0.0), srcs, builder, rank=0, world_size=1, micro_batch_size=4)
    try:
        with pytest.raises(RuntimeError, match="data loading failed") as err:
            for _ in range(8):
                ld.next()
        assert "Traceback" in str(err.value)
    finally:
        ld.close()


def test_unknown_worker_kind_is_refused(world):
    _, builder, _, sources, _ = world
    with pytest.raises(ValueError, match="process, thread, inline"):
        StepLoader(planner(world), sources(), builder, rank=0, world_size=1, micro_batch_size=4, worker="fork")


def test_worker_process_dies_with_its_trainer(tmp_path):
    """SIGKILL of the training process (a lost node, torchrun's kill) takes its data worker
    with it (PR_SET_PDEATHSIG; the worker also polls its parent), so no orphan keeps reading
    shards."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from tests.fixtures_trainer import REPO
    from tests.support import torchrun_util as TU

    def gone(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    code = (
        "import sys, time, pathlib; sys.path.insert(0, %r)\n"
        "from tests.fixtures_trainer import make_data, tiny_bundle\n"
        "from vlm_api.schema import DataSpec\n"
        "from vlm_trainer.data.loader import StepLoader, open_sources, probe_stats\n"
        "from vlm_trainer.data.mixture import MixturePlanner\n"
        "from vlm_trainer.data.sequences import SequenceBuilder\n"
        "data = make_data(pathlib.Path(%r), shards={'text': 1})\n"
        "spec = DataSpec.model_validate({'seqLength': 96, 'sources': [{'name': 'text', 'modality': 'text', 'uri': data['text']['uri']}]})\n"
        "tok, vlm = tiny_bundle()\n"
        "b = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=96)\n"
        "src = open_sources(spec, ['text'], image=vlm.image_spec, seed=0)\n"
        "p = MixturePlanner(stage='s', mixture={'text': 1.0}, modality={'text': 'text'}, stats=probe_stats(src, b, 8),"
        " global_batch=4, total_steps=100, visual_introduce_at=0.0, seed=0)\n"
        "ld = StepLoader(p, src, b, rank=0, world_size=1, micro_batch_size=2)\n"
        "ld.next(); print(ld._proc.pid, flush=True); time.sleep(120)\n") % (str(REPO), str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        child = psutil.Process(int(proc.stdout.readline()))
        assert child.pid in TU.children(proc.pid)
        assert child.name() == "vlm-data"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        TU.wait_for(lambda: gone(child), 10, "the data worker to exit")
    finally:
        if proc.poll() is None:
            proc.kill()

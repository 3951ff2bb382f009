"""Sequence packing (issue 18), in one process: the packer, packed batches, per-sample
isolation (losses and gradients equal unpacked ones), token accounting of a step and of a
``tokens:`` stage, padding on the demo mixture, the mixture's meaning under packing, exact
resume with a half-full buffer across world sizes, the refusal of LLMs that cannot isolate
packed samples, and what the local view shows. DDP/FSDP2 at world size 2 and a real
2 -> 1 process resume: tests/test_packing_distributed.py."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from tests.fixtures_trainer import REPO, make_data, one_thread, shared_data, spec_dict, stage, tiny_bundle
from tests.support import packing_check as PC
from vlm_api.schema import DataSpec, VLMPretrainRunSpec
from vlm_trainer.data.loader import StepLoader, open_sources, probe_stats
from vlm_trainer.data.mixture import SourceStats
from vlm_trainer.model import IGNORE_INDEX, PackingUnsupported, check_packing, packing_isolation_error
from vlm_trainer.data.packing import Measured, PackingPlanner, fill_rows
from vlm_trainer.data.sequences import SequenceBuilder, collate_packed

MIX = {"text": 0.5, "captions": 0.35, "interleaved": 0.15}
SEQ = 192


# --------------------------------------------------------------------------- the packer, no data


def test_fill_rows_places_whole_items_within_capacity_deterministically():
    import random

    rng = random.Random(0)
    items = [(k, rng.choice([7, 30, 50, 64, 90, 128, 200, 256])) for k in range(200)]
    rows = fill_rows(items, 12, 256, overdue=5)
    assert rows == fill_rows(items, 12, 256, overdue=5)
    placed = [k for row in rows for k in row]
    assert len(placed) == len(set(placed))
    length = dict(items)
    assert all(sum(length[k] for k in row) <= 256 for row in rows)
    assert set(range(5)) <= set(placed)  # overdue items go first
    fill = sum(length[k] for k in placed) / (12 * 256)
    assert fill > 0.99, fill  # the subset-sum fill leaves (almost) no padding with a varied buffer
    assert fill_rows([(0, 300), (1, 10)], 1, 256) == [[1]]  # an item longer than a row never fits (truncated upstream)


def _planner(seq=256, budget=1024, **kw):
    stats = {"a": SourceStats(138.0, 0.0), "b": SourceStats(45.0, 0.35), "c": SourceStats(130.0, 0.12)}  # as _lengths draws
    base = dict(stage="s", mixture={"a": 0.5, "b": 0.3, "c": 0.2}, modality={"a": "text", "b": "image-text", "c": "interleaved"},
                stats=stats, global_batch=budget // seq, total_steps=500, visual_introduce_at=0.0, seed=3)
    base.update(kw)
    return PackingPlanner(seq_length=seq, token_budget=budget, **base)


def _lengths(source: str, index: int) -> Measured:
    import random

    r = random.Random(f"{source}:{index}")
    n = {"a": r.randint(20, 256), "b": r.randint(30, 60), "c": r.randint(60, 200)}[source]
    return Measured(n, 16 if source != "a" else 0)


def test_a_step_carries_the_token_budget_and_the_stream_keeps_the_mixture():
    """Cumulative real tokens stay within one sequence (plus the last step's padding) of
    steps x budget; per-source token fractions of the trained samples track the mixture."""
    p = _planner()
    trained = collections.Counter()
    total = 0
    for k in range(1, 301):
        plan = p.next_packed(_lengths)
        assert all(sum(plan.lengths[s] for s in row) <= 256 for row in plan.rows)
        assert len(plan.rows) in (4, 5)
        total += plan.tokens
        padding = len(plan.rows) * 256 - plan.tokens
        assert k * 1024 - 256 - padding < total <= k * 1024
        for s in plan.slots:
            trained[s.source] += plan.lengths[s]
    tokens = sum(trained.values())
    for s, f in p.mixture.items():
        assert abs(trained[s] / tokens - f) < 0.02, (s, trained[s] / tokens)
    assert 1 - total / (300 * 1024) < 0.005


def test_every_drawn_sample_is_trained_once_and_in_order_per_source():
    p = _planner()
    seen = []
    for _ in range(100):
        seen += p.next_packed(_lengths).slots
    assert len(seen) == len(set(seen))
    for src in "abc":
        idx = sorted(s.index for s in seen if s.source == src)
        waiting = sorted(b.index for b in p.buffer if b.source == src)
        assert sorted(idx + waiting) == list(range(p.counters[src]))  # drawn = trained + waiting
    assert max(p.step - b.drawn for b in p.buffer) <= p.max_wait + 1


def test_planner_state_round_trip_continues_exactly():
    a = _planner()
    for _ in range(7):
        a.next_packed(_lengths)
    assert a.buffer, "the buffer holds samples between steps"
    b = _planner()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # JSON-able: it goes into the checkpoint as is
    for _ in range(20):
        pa, pb = a.next_packed(_lengths), b.next_packed(_lengths)
        assert pa.rows == pb.rows and pa.state_after == pb.state_after


def test_packed_and_unpacked_positions_do_not_mix():
    from vlm_trainer.data.mixture import MixturePlanner

    packed = _planner()
    packed.next_packed(_lengths)
    plain = MixturePlanner(stage="s", mixture={"a": 1.0}, modality={"a": "text"}, stats={"a": SourceStats(10, 0)},
                           global_batch=4, total_steps=5, visual_introduce_at=0.0, seed=0)
    with pytest.raises(ValueError, match="data.packing: true"):
        plain.load_state_dict(packed.state_dict())
    with pytest.raises(ValueError, match="data.packing: false"):
        _planner().load_state_dict(plain.state_dict())
    nxt = _planner(mixture={"a": 0.5, "b": 0.5})  # a new stage carries the buffered samples of its sources
    nxt.load_state_dict(packed.state_dict(), positions_only=True)
    assert {b.source for b in nxt.buffer} <= {"a", "b"} and nxt.counters == packed.counters and nxt.step == 0


# --------------------------------------------------------------------------- batches and isolation


@pytest.fixture(scope="module")
def bundle():
    with one_thread():
        yield tiny_bundle()


def test_collate_packed_restarts_positions_and_masks_sample_starts(bundle):
    tok, vlm = bundle
    b = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=SEQ)
    from vlm_trainer.data.sequences import Encoded

    e1 = Encoded([1, 10, 11, 12], [IGNORE_INDEX, 10, 11, 12], [], "t", "text", 0, 0)
    e2 = Encoded([13, 14, 15], [13, 14, 15], [], "t", "text", 0, 1)  # no bos: its first label must not count
    batch = collate_packed([[e1, e2], [e2]], tok.pad_id)
    assert batch.input_ids.shape == (2, 8)
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0] and batch.position_ids[1].tolist()[:4] == [0, 1, 2, 0]
    assert batch.labels[0, 4] == IGNORE_INDEX and batch.labels[0, 5] == 14
    assert batch.spans == [(0, 0, 4), (0, 4, 3), (1, 0, 3)]
    assert (batch.n_text_tokens, batch.n_label_tokens, batch.n_positions, batch.n_samples) == (10, 3 + 2 + 2, 16, 3)
    flat = batch.flattened()
    assert flat.input_ids.shape == (1, 10) and flat.flash_kwargs["cu_seq_lens_q"].tolist() == [0, 4, 7, 10]
    assert flat.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]] and flat.n_label_tokens == batch.n_label_tokens


def test_per_sample_losses_and_gradients_equal_unpacked(bundle, tmp_path_factory):
    """Text, image-text and interleaved samples in one packed row: every sample's summed
    loss and its gradient equal the unpacked ones (fp32, CPU; rtol 1e-4, atol 1e-6 x the
    gradient's scale; measured ~1e-7), with transformers' SDPA document mask and padding-free."""
    tok, vlm = bundle
    data = make_data(tmp_path_factory.mktemp("iso"), samples_per_shard=8,
                     shards={"text": 1, "captions": 1, "interleaved": 1})
    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=96)
    sets = PC.encoded_samples(data, builder, vlm.image_spec, per_source=2)
    items = [e for name in PC.SOURCES for e in sets[name]]
    assert {e.source for e in items} == set(PC.SOURCES) and sum(e.n_image_tokens > 0 for e in items) >= 4
    results = PC.run_variants(vlm, vlm, items, tok.pad_id)
    worst = PC.compare(results)
    assert all(w["loss_rel"] < 1e-5 and w["grad_rel"] < 1e-5 for w in worst.values()), worst
    # evaluation and grounding collate unpacked (right-padded) batches: under the packed
    # attention (no mask, causal per row) their losses are those of SDPA with the mask
    from vlm_trainer.model import PACKED_SDPA, set_attention, token_losses
    from vlm_trainer.data.sequences import collate

    plain = collate(items, tok.pad_id)
    with torch.no_grad():
        ref = token_losses(vlm(plain.input_ids, plain.attention_mask, plain.pixel_values), plain.labels)
        set_attention(vlm.llm, PACKED_SDPA)
        got = token_losses(vlm(plain.input_ids, plain.attention_mask, plain.pixel_values), plain.labels)
        set_attention(vlm.llm, "sdpa")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the check can fail: the same row with one causal mask over it (no restarted positions)
    batch = collate_packed([items], tok.pad_id)
    with torch.no_grad():
        logits = vlm(batch.input_ids, batch.attention_mask, batch.pixel_values)
        leaky = PC._sample_losses(logits, batch.labels, batch.spans)
    assert any(abs(float(a) - b) > 1e-3 * abs(b) for a, b in zip(leaky[1:], results["unpacked"]["losses"][1:]))


def test_llms_that_cannot_isolate_packed_samples_are_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **small, max_position_embeddings=64))
    assert "see each other" in packing_isolation_error(opt)  # the measurement behind the list
    with pytest.raises(PackingUnsupported, match="set data.packing: false"):
        check_packing(opt, "sdpa")
    llama = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **small, num_key_value_heads=2))
    assert check_packing(llama, "vlm_packed_sdpa") == "vlm_packed_sdpa"
    assert packing_isolation_error(llama) is None
    # at validation, where the model type is known
    spec = spec_dict({"text": {"modality": "text", "uri": "/d/t-{0..1}.tar", "validationUri": None}},
                     stages=[stage(mixture={"text": 1.0})])
    spec["model"]["llm"]["config"] = {"model_type": "mamba", "hidden_size": 32}
    del spec["model"]["visionEncoder"]
    with pytest.raises(ValueError, match="data.packing.*mamba.*set data.packing: false"):
        VLMPretrainRunSpec.model_validate(spec)
    spec["data"]["packing"] = False
    assert VLMPretrainRunSpec.model_validate(spec).data.packing is False


# --------------------------------------------------------------------------- the data path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = shared_data(tmp_path_factory)
    spec = DataSpec.model_validate({"seqLength": SEQ, "sources": [
        {"name": n, "modality": d["modality"], "uri": d["uri"], "validationUri": d["validationUri"]} for n, d in data.items()]})
    tok, vlm = tiny_bundle()
    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=SEQ)
    modality = {s.name: s.modality for s in spec.sources}

    def sources():
        return open_sources(spec, sorted(MIX), image=vlm.image_spec, seed=0)

    return spec, builder, modality, sources, probe_stats(sources(), builder, 64)


def packed_planner(world, *, steps=40, intro=0.5, budget=4 * SEQ, mixture=MIX):
    _, _, modality, _, stats = world
    return PackingPlanner(seq_length=SEQ, token_budget=budget, stage="pretrain", mixture=mixture, modality=modality,
                          stats=stats, global_batch=budget // SEQ, total_steps=steps, visual_introduce_at=intro, seed=7)


def loader(world, plan, rank=0, world_size=1, mbs=2, worker="inline"):
    _, builder, _, sources, _ = world
    return StepLoader(plan, sources(), builder, rank=rank, world_size=world_size, micro_batch_size=mbs, worker=worker)


def test_packed_steps_keep_the_mixture_and_visual_introduce_at(world):
    """Under packing: no image token before visualIntroduceAt; once the text samples drawn
    before it have left the buffer (max_wait + 1 steps), the per-source token fractions and
    the image-token fraction within +-0.02 of the mixture (real sequences)."""
    p = packed_planner(world, steps=70, intro=2 / 7)
    assert p.intro_step == 20
    ld = loader(world, p)
    after, after_image = collections.Counter(), collections.Counter()
    for step in range(70):
        rs = ld.next()
        for b in rs.micro:
            if b.dummy:
                continue
            if step < 20:
                assert b.n_image_tokens == 0 and set(b.sources) == {"text"}
                continue
            if step < 20 + p.max_wait + 1:
                continue
            for (row, start, n), src in zip(b.spans, b.sources):
                after[src] += n
                after_image[src] += int((b.input_ids[row, start:start + n] == ld.builder.tok.image_token_id).sum())
    total = sum(after.values())
    for src, f in MIX.items():
        assert abs(after[src] / total - f) <= 0.02, (src, after[src] / total, f)
    measured = sum(after_image.values()) / total
    expected = sum(MIX[s] * after_image[s] / after[s] for s in MIX)
    assert abs(measured - expected) <= 0.02 and abs(p.target_image_fraction(40) - measured) <= 0.03


def _global(world, plan, world_size, steps):
    """Per step: [(source, index, token ids)] over all ranks' rows, in rank order, the
    step's real tokens, and the planner state after it."""
    loaders = [loader(world, plan, r, world_size) for r in range(world_size)]
    out = []
    for _ in range(steps):
        seqs, tokens = [], 0
        for ld in loaders:
            rs = ld.next()
            for b in rs.micro:
                if b.dummy:
                    continue
                tokens += b.n_tokens
                for (row, start, n), src, idx in zip(b.spans, b.sources, b.indices):
                    seqs.append((src, idx, tuple(b.input_ids[row, start:start + n].tolist())))
        out.append((seqs, tokens, rs.plan.state_after))
    for ld in loaders:
        ld.close()
    return out


def test_packed_global_batch_is_world_size_invariant(world):
    runs = {w: _global(world, packed_planner(world, steps=12, intro=0.25), w, 6) for w in (1, 2, 3)}
    for w in (2, 3):
        assert [(sorted(s), t) for s, t, _ in runs[w]] == [(sorted(s), t) for s, t, _ in runs[1]]
        assert [s for s, _, _ in runs[w]] == [s for s, _, _ in runs[1]]  # rows in order, ranks in order


def test_resume_with_a_half_full_buffer_from_2_ranks_on_1(world):
    """Uninterrupted at world size 2 vs interrupted at step 5 (2 ranks; samples waiting in
    the packing buffer) and resumed at world size 1 from the saved data position: the same
    samples in the same rows, none repeated, none skipped."""
    n, k = 12, 5
    full = _global(world, packed_planner(world, steps=n, intro=0.3), 2, n)
    first = _global(world, packed_planner(world, steps=n, intro=0.3), 2, k)
    state = json.loads(json.dumps(first[-1][2]))  # what the checkpoint keeps
    buffered = state["packing"]["buffer"]
    assert len(buffered) >= 3, buffered  # a resume must re-read these
    resumed = packed_planner(world, steps=n, intro=0.3)
    resumed.load_state_dict(state)
    rest = _global(world, resumed, 1, n - k)
    assert [s for step in first + rest for s in step[0]] == [s for step in full for s in step[0]]
    assert [t for _, t, _ in first + rest] == [t for _, t, _ in full]
    keys = [(src, idx) for step in full for src, idx, _ in step[0]]
    assert len(keys) == len(set(keys))
    assert {(s, i) for s, i, *_ in buffered} <= {(src, idx) for step in rest for src, idx, _ in step[0]}


@pytest.mark.parametrize("worker", ["process", "thread"])
def test_packed_prefetching_workers_match_inline(world, worker):
    ref = loader(world, packed_planner(world, steps=10, intro=0.2), rank=1, world_size=2)
    ld = loader(world, packed_planner(world, steps=10, intro=0.2), rank=1, world_size=2, worker=worker)
    try:
        got, want = [ld.next() for _ in range(10)], [ref.next() for _ in range(10)]
    finally:
        ld.close()
    key = lambda rs: (rs.plan.rows, [(b.input_ids.tolist(), b.position_ids.tolist() if b.packed else None,  # noqa: E731
                                      b.labels.tolist()) for b in rs.micro], rs.plan.state_after)
    assert [key(g) for g in got] == [key(w) for w in want]


def test_padding_on_the_demo_mixture_is_at_most_3_percent(tmp_path):
    """examples/demo.yaml's stages on its generated data (vlm_trainer.data.synthdata, fewer
    samples per shard): padding / positions <= 3% over each stage's plan (steps scaled down,
    visualIntroduceAt's share kept)."""
    import yaml

    from vlm_trainer.data import synthdata
    from vlm_trainer.model import build_vlm
    from vlm_trainer.tokenizer import load_tokenizer

    data = synthdata.generate(tmp_path / "demo-data", samples_per_shard=120)
    doc = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    for src in doc["spec"]["data"]["sources"]:
        src.update(uri=data[src["name"]]["uri"], validationUri=data[src["name"]]["validationUri"])
    spec = VLMPretrainRunSpec.model_validate(doc["spec"])
    assert spec.data.packing
    tok = load_tokenizer(spec.model)
    vlm = build_vlm(spec.model, tok)
    S = spec.data.seq_length
    builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=S)
    modality = {s.name: s.modality for s in spec.data.sources}
    report = {}
    for st in spec.stages:
        steps = 100
        srcs = open_sources(spec.data, sorted(st.mixture), image=vlm.image_spec, seed=0)
        p = PackingPlanner(seq_length=S, token_budget=st.batch_tokens, stage=st.name, mixture=st.mixture, modality=modality,
                           stats=probe_stats(srcs, builder, 64), global_batch=st.batch_tokens // S, total_steps=steps,
                           visual_introduce_at=st.visual_introduce_at, seed=0)
        ld = StepLoader(p, srcs, builder, rank=0, world_size=1, micro_batch_size=st.micro_batch_size, worker="inline")
        real = positions = 0
        for _ in range(steps):
            rs = ld.next()
            real += sum(b.n_tokens for b in rs.micro)
            positions += rs.n_positions
        report[st.name] = (1 - real / positions, real / (steps * st.batch_tokens))
    print("padding, real / stated tokens:", report)
    for name, (padding, trained) in report.items():
        assert padding <= 0.03, (name, padding)
        assert abs(trained - 1) <= S / (100 * 1536) + 0.01, (name, trained)


# --------------------------------------------------------------------------- the trainer


def test_a_tokens_stage_trains_its_stated_tokens_within_one_global_batch(make_trainer, tmp_path, monkeypatch):
    progress = tmp_path / "p.jsonl"
    monkeypatch.setenv("VLM_PROGRESS_FILE", str(progress))
    budget, stated = 4 * 96, 12 * 4 * 96 + 100
    t = make_trainer(steps=None, tokens=stated, globalBatchTokens=budget, visualIntroduceAt=0.25)
    assert t.total_steps == math.ceil(stated / budget) == 13
    assert t.train().exit_code == 0
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    trained = sum(e["text_tokens"] + e["image_tokens"] for e in steps)
    assert abs(trained - stated) < budget, (trained, stated)
    assert trained == t.progress.tokens == steps[-1]["tokens"]
    assert events[0]["tokens_stated"] == stated and events[0]["packing"] is True
    assert all(e["padding_fraction"] < 0.2 and e["samples_per_sequence"] >= 1 for e in steps)
    # data.packing: false (the ablation): the same recipe trains what its padded sequences hold
    monkeypatch.setenv("VLM_PROGRESS_FILE", str(tmp_path / "unpacked.jsonl"))
    unpacked = make_trainer(packing=False, steps=None, tokens=stated, globalBatchTokens=budget, visualIntroduceAt=0.25)
    assert not unpacked.packing and unpacked.total_steps == 13
    assert unpacked.train().exit_code == 0
    plain = [json.loads(line) for line in (tmp_path / "unpacked.jsonl").read_text().splitlines()]
    plain = [e for e in plain if e["event"] == "step"]
    assert unpacked.progress.tokens <= 13 * budget and all(e["samples_per_sequence"] == 1 for e in plain)
    assert sum(e["positions"] for e in plain) - unpacked.progress.tokens > sum(e["positions"] for e in steps) - trained


def test_summary_shows_stated_tokens_padding_and_samples_per_sequence():
    from vlm_local import view as V

    st = V.StageState("pretrain")
    st.apply({"event": "start", "step": 0, "total_steps": 2, "tokens_stated": 3072})
    for s in (1, 2):
        st.apply({"event": "step", "step": s, "total_steps": 2, "tokens": 1500 * s, "text_tokens": 1200,
                  "image_tokens": 300, "positions": 1536, "samples": 12, "sequences": 4, "padding_fraction": 0.023,
                  "samples_per_sequence": 3.0, "loss": 1.0})
    header, rows = V.summary_rows([st])
    assert header[:7] == ["stage", "status", "steps", "tokens", "stated", "padding", "samples/seq"]
    assert rows[0][3:7] == ["3.0k", "3.1k", "2.3%", "3.00"]
    assert "pad 2.3% | 3.0/seq" in V.StageView(st, mode="plain").status_text()
    d = V.summary_dict([st])[0]
    assert d["tokens_stated"] == 3072 and d["padding_fraction"] == pytest.approx(1 - 3000 / 3072)

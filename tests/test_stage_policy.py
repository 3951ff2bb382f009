"""The one stage policy (vlm_api/stage_policy.py): what is final, where a stage starts,
and the trainer's confirmation of a final checkpoint (its termination message)."""

from __future__ import annotations

import json

from hypothesis import given, strategies as hs

from vlm_api import schema, stage_policy as sp
from tests.support.operator_harness import spec as harness_spec


def _spec():
    return schema.parse_spec(harness_spec())


def test_retry_delay_doubles_and_caps():
    assert [sp.retry_delay(a, 30, 300) for a in range(6)] == [30, 60, 120, 240, 300, 300]


def test_is_final_by_manifest_or_by_the_stage_s_last_step():
    stage = schema.Stage.model_validate({"name": "s", "steps": 100, "mixture": {"a": 1.0}})
    by_tokens = schema.Stage.model_validate({"name": "t", "tokens": "1M", "mixture": {"a": 1.0}})
    assert sp.is_final(stage, 100, False) and sp.is_final(stage, 120, False)
    assert not sp.is_final(stage, 99, False)
    assert sp.is_final(stage, 5, True)
    assert not sp.is_final(by_tokens, 10**9, False)  # only the manifest knows when a token budget ended


def test_init_from_is_the_previous_stage_s_confirmed_final_checkpoint_only():
    spec = _spec()
    assert len(spec.stages) >= 2
    first = spec.stages[0].name
    assert sp.init_from(spec, 0, {first: {"uri": "s3://x/"}}) is None
    assert sp.init_from(spec, 1, {}) is None  # unconfirmed: no guess at a prefix
    assert sp.init_from(spec, 1, {first: {"uri": "s3://b/r/pretrain/step-000000100/"}}) == "s3://b/r/pretrain/step-000000100/"


PRUNE = {"removeLayers": 1, "calibration": {"source": "caps"}}


@given(prunes=hs.lists(hs.booleans(), min_size=1, max_size=6))
def test_steps_are_the_stages_each_followed_by_its_pruning_step(prunes):
    base = harness_spec()
    stages = [{**base["stages"][1], "name": f"s{i}", **({"prune": PRUNE} if p else {})} for i, p in enumerate(prunes)]
    spec = schema.parse_spec({**base, "stages": stages})
    plan = sp.steps(spec)
    assert [x.name for x in plan if not x.prune] == [st.name for st in spec.stages]
    assert len(plan) == len(prunes) + sum(prunes) and len({x.name for x in plan}) == len(plan)
    for k, x in enumerate(plan):
        if x.prune:  # right after its own stage, named for it
            assert plan[k - 1] == sp.Step(spec.stages[x.stage].name, x.stage) and x.name == f"s{x.stage}-pruned"
    # every stage starts from the confirmed output of the step just before it
    finals = {x.name: {"uri": f"file:///c/{x.name}/step-1/"} for x in plan}
    for k, x in enumerate(plan):
        start = sp.step_input(spec, x, finals)
        assert start == (finals[plan[k - 1].name]["uri"] if k else None)
        assert sp.step_input(spec, x, {}) is None  # nothing confirmed: no guess


def test_the_stage_after_a_pruning_one_starts_from_the_pruned_checkpoint_only():
    base = harness_spec()
    spec = schema.parse_spec({**base, "stages": [{**base["stages"][0], "prune": PRUNE}, base["stages"][1]]})
    assert [x.name for x in sp.steps(spec)] == ["pretrain", "pretrain-pruned", "sft"]
    trained = {"pretrain": {"uri": "s3://b/pretrain/step-000000100/"}}
    assert sp.init_from(spec, 1, trained) is None  # the unpruned model is not the next stage's start
    pruned = {**trained, "pretrain-pruned": {"uri": "s3://b/pretrain-pruned/step-000000100/"}}
    assert sp.init_from(spec, 1, pruned) == "s3://b/pretrain-pruned/step-000000100/"
    assert sp.step_input(spec, sp.steps(spec)[1], trained) == "s3://b/pretrain/step-000000100/"


def test_rdzv_id_differs_per_attempt_and_stage():
    ids = {sp.rdzv_id("uid", stage, attempt) for stage in ("a", "b") for attempt in range(3)}
    assert len(ids) == 6


@given(step=hs.integers(0, 10**12), tokens=hs.integers(0, 10**18),
       uri=hs.text(min_size=1, max_size=500).filter(lambda u: u.strip() == u and u),
       losses=hs.dictionaries(hs.sampled_from(["text", "image-text", "interleaved"]),
                              hs.floats(allow_nan=True, allow_infinity=True), max_size=3))
def test_confirmation_round_trips_and_fits_a_termination_message(step, tokens, uri, losses):
    text = sp.confirmation("pretrain", step, uri, tokens, losses)
    assert len(text.encode()) <= sp.MAX_CONFIRMATION_BYTES
    got = sp.parse_confirmation(text, "pretrain")
    assert got is not None and (got["step"], got["uri"], got["tokens"]) == (step, uri, tokens)
    finite = {k: round(v, 6) for k, v in losses.items() if v == v and abs(v) != float("inf")}
    assert got.get("validationLoss", {}) == finite
    assert sp.parse_confirmation(text, "sft") is None  # another stage's confirmation


def test_anything_else_confirms_nothing():
    good = sp.confirmation("s", 10, "s3://b/s/step-000000010/", 1000)
    for text in (None, "", "Traceback (most recent call last):\n  ...", "{", "[1]", json.dumps({"stage": "s"}),
                 json.dumps({"stage": "s", "step": -1, "uri": "u", "tokens": 1}),
                 json.dumps({"stage": "s", "step": 1, "uri": "", "tokens": 1}),
                 json.dumps({"stage": "s", "step": "1", "uri": "u", "tokens": 1}), good[:-1]):
        assert sp.parse_confirmation(text, "s") is None, text


def test_confirmed_final_takes_the_highest_confirmed_step():
    msgs = [None, "log tail", sp.confirmation("s", 10, "u10", 1), sp.confirmation("s", 12, "u12", 2),
            sp.confirmation("other", 99, "u99", 3)]
    assert sp.confirmed_final(msgs, "s")["uri"] == "u12"
    assert sp.confirmed_final(msgs[:2], "s") is None


def test_an_oversized_uri_is_refused_not_truncated():
    import pytest

    with pytest.raises(ValueError):
        sp.confirmation("s", 1, "s3://b/" + "x" * 5000, 1)

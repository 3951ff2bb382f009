"""The API's three validation layers: each bad manifest is rejected with its field's path."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml

from vlm_api import schema, validate
from vlm_api.quantities import expand_braces, parse_duration, parse_interval, parse_quantity

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
RUN = yaml.safe_load((REPO / "examples/run.yaml").read_text())


def _set(path: str, value):
    """A mutation setting a dotted path (list indices as numbers); value DELETE removes it."""

    def mutate(obj):
        *parents, last = path.split(".")
        node = obj
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is DELETE:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return mutate


DELETE = object()

# (id, base manifest, mutation, expected path, expected words in the reason, layer)
CASES = [
    # --- schema layer: types, enums, bounds, patterns, required, unknown fields
    ("seq-too-short", DEMO, _set("spec.data.seqLength", 8), "spec.data.seqLength", "minimum", "schema"),
    ("modality-enum", DEMO, _set("spec.data.sources.0.modality", "video"), "spec.data.sources[0].modality", "video", "schema"),
    ("source-name-pattern", DEMO, _set("spec.data.sources.0.name", "Bad_Name"), "spec.data.sources[0].name", "match", "schema"),
    ("no-sources", DEMO, _set("spec.data.sources", []), "spec.data.sources", "", "schema"),
    ("no-stages", DEMO, _set("spec.stages", []), "spec.stages", "", "schema"),
    ("visual-above-1", DEMO, _set("spec.stages.0.visualIntroduceAt", 1.01), "spec.stages[0].visualIntroduceAt", "maximum", "schema"),
    ("visual-negative", DEMO, _set("spec.stages.0.visualIntroduceAt", -0.1), "spec.stages[0].visualIntroduceAt", "minimum", "schema"),
    ("schedule-enum", DEMO, _set("spec.stages.0.optimizer.schedule", "step"), "spec.stages[0].optimizer.schedule", "step", "schema"),
    ("lr-zero", DEMO, _set("spec.stages.0.optimizer.lr", 0), "spec.stages[0].optimizer.lr", "minimum", "schema"),
    ("strategy-enum", DEMO, _set("spec.parallelism.strategy", "tp"), "spec.parallelism.strategy", "tp", "schema"),
    ("precision-enum", DEMO, _set("spec.parallelism.precision", "fp8"), "spec.parallelism.precision", "fp8", "schema"),
    ("projector-enum", DEMO, _set("spec.model.projector.type", "qformer"), "spec.model.projector.type", "qformer", "schema"),
    ("keep-zero", DEMO, _set("spec.checkpoint.keep", 0), "spec.checkpoint.keep", "minimum", "schema"),
    ("port-low", DEMO, _set("spec.metrics.port", 80), "spec.metrics.port", "minimum", "schema"),
    ("gpus-negative", DEMO, _set("spec.resources.gpusPerNode", -1), "spec.resources.gpusPerNode", "minimum", "schema"),
    ("nodes-zero", DEMO, _set("spec.resources.nodes.min", 0), "spec.resources.nodes.min", "minimum", "schema"),
    ("checkpoint-missing", DEMO, _set("spec.checkpoint", DELETE), "spec.checkpoint", "required", "schema"),
    ("uri-missing", DEMO, _set("spec.checkpoint.uri", DELETE), "spec.checkpoint.uri", "required", "schema"),
    ("llm-missing", DEMO, _set("spec.model.llm", DELETE), "spec.model.llm", "required", "schema"),
    ("unknown-spec-field", DEMO, _set("spec.replicas", 3), "spec", "unknown field(s) replicas", "schema"),
    ("unknown-stage-field", DEMO, _set("spec.stages.0.learningRate", 0.1), "spec.stages[0]", "learningRate", "schema"),
    ("retries-negative", DEMO, _set("spec.maxRetries", -1), "spec.maxRetries", "minimum", "schema"),
    ("toleration-effect", RUN, _set("spec.resources.tolerations.0.effect", "Sometimes"), "spec.resources.tolerations[0].effect", "Sometimes", "schema"),
    ("seq-type", DEMO, _set("spec.data.seqLength", "long"), "spec.data.seqLength", "integer", "schema"),
    ("s3-bucket-pattern", RUN, _set("spec.checkpoint.uri", "s3://B/x"), "spec.checkpoint.uri", "match", "schema"),
    # --- CEL layer: cross-field rules
    ("mixture-sum", DEMO, _set("spec.stages.0.mixture.text", 0.2), "spec.stages[0].mixture", "sum to 1", "cel"),
    ("mixture-unknown-source", DEMO, _set("spec.stages.1.mixture", {"nope": 1.0}), "spec.stages", "declared in data.sources", "cel"),
    ("mixture-range", DEMO, _set("spec.stages.0.mixture", {"text": 1.5, "captions": -0.5}), "spec.stages[0].mixture.text", "maximum", "schema"),
    ("nodes-order", DEMO, _set("spec.resources.nodes", {"min": 3, "max": 2}), "spec.resources.nodes.min", "<= max", "cel"),
    ("no-vision-encoder", DEMO, _set("spec.model.visionEncoder", DELETE), "spec.model", "visionEncoder is required", "cel"),
    ("two-durations", DEMO, _set("spec.stages.0.tokens", "1M"), "spec.stages[0]", "exactly one of tokens, steps or epochs", "cel"),
    ("no-duration", DEMO, _set("spec.stages.0.steps", DELETE), "spec.stages[0]", "exactly one of tokens, steps or epochs", "cel"),
    ("tokens-suffix", RUN, _set("spec.stages.0.tokens", "100X"), "spec.stages[0].tokens", "K/M/B/T", "cel"),
    ("batch-suffix", RUN, _set("spec.stages.0.globalBatchTokens", "4 million"), "spec.stages[0].globalBatchTokens", "K/M/B/T", "cel"),
    ("interval-format", DEMO, _set("spec.checkpoint.interval", "soon"), "spec.checkpoint.interval", "duration", "cel"),
    ("llm-policy-string", DEMO, _set("spec.stages.1.trainable.llm", "half"), "spec.stages[1].trainable.llm", "'all', 'none'", "cel"),
    ("llm-policy-both", DEMO, _set("spec.stages.1.trainable.llm", {"layers": [0], "visualRegion": {"fraction": 0.5}}), "spec.stages[1].trainable.llm", "'all', 'none'", "cel"),
    ("model-part-both", DEMO, _set("spec.model.llm.path", "/models/x"), "spec.model.llm", "exactly one of path or config", "cel"),
    # list-type map: the API server refuses a duplicate name itself (in the schema layer)
    ("duplicate-source", DEMO, lambda o: o["spec"]["data"]["sources"].append(dict(o["spec"]["data"]["sources"][0])), "spec.data.sources[5].name", "unique", "schema"),
    ("duplicate-stage", DEMO, lambda o: o["spec"]["stages"].append(copy.deepcopy(o["spec"]["stages"][0])), "spec.stages[2].name", "unique", "schema"),
    # --- semantic layer: what needs code
    ("brace-range-reversed", DEMO, _set("spec.data.sources.0.uri", "./d/{009..000}.tar"), "spec.data.sources[0].uri", "start > end", "semantic"),
    ("brace-range-malformed", DEMO, _set("spec.data.sources.0.uri", "./d/{0..}.tar"), "spec.data.sources[0].uri", "brace", "semantic"),
    ("layer-out-of-range", DEMO, _set("spec.stages.1.trainable.llm", {"layers": [0, 7]}), "spec.stages[1].trainable.llm.layers", "4 layers", "semantic"),
    ("visual-region-empty", DEMO, _set("spec.stages.1.trainable.llm", {"visualRegion": {"fraction": 0.1}}), "spec.stages[1].trainable.llm.visualRegion.fraction", "selects no layer", "semantic"),
    ("trains-nothing", DEMO, _set("spec.stages.1.trainable", {"visionEncoder": False, "projector": False, "llm": "none"}), "spec.stages[1].trainable", "trains nothing", "semantic"),
    ("batch-below-sequence", DEMO, _set("spec.stages.0.globalBatchTokens", 32), "spec.stages[0].globalBatchTokens", "less than one sequence", "semantic"),
    ("image-does-not-fit", DEMO, _set("spec.data.seqLength", 20), "spec.data.seqLength", "cannot hold one image", "semantic"),
    ("config-without-model-type", DEMO, lambda o: o["spec"]["model"]["llm"]["config"].pop("model_type"), "spec.model.llm", "model_type", "semantic"),
    ("tokenizer-needed", DEMO, _set("spec.model.tokenizer", {}), "spec.model", "tokenizer", "semantic"),
    ("duplicate-layers", DEMO, _set("spec.stages.1.trainable.llm", {"layers": [1, 1]}), "spec.stages[1].trainable.llm", "unique", "semantic"),
    ("prune-unknown-source", DEMO, _set("spec.stages.0.prune", {"removeLayers": 1, "calibration": {"source": "nope"}}), "spec.stages[0].prune.calibration.source", "unknown source", "semantic"),
    ("prune-too-many", DEMO, _set("spec.stages.0.prune", {"removeLayers": 4, "calibration": {"source": "captions"}}), "spec.stages[0].prune.removeLayers", "cannot remove", "semantic"),
    ("betas-range", DEMO, _set("spec.stages.0.optimizer.betas", [0.9, 1.5]), "spec.stages[0].optimizer.betas", "[0, 1)", "semantic"),
]


@pytest.mark.parametrize("case_id,base,mutate,path,words,layer", CASES, ids=[c[0] for c in CASES])
def test_invalid_manifest_is_rejected_with_its_field(case_id, base, mutate, path, words, layer):
    obj = copy.deepcopy(base)
    mutate(obj)
    problems = validate.validate_object(obj)
    assert problems, f"{case_id}: accepted"
    hits = [p for p in problems if p.path == path and words in p.reason]
    assert hits, f"{case_id}: expected {path}: ...{words}...; got {[str(p) for p in problems]}"
    # The layer that owns the rule is the one that reports it.
    spec = validate.apply_defaults(obj["spec"])
    by_layer = {
        "schema": validate.schema_problems(spec),
        "cel": [] if validate.schema_problems(spec) else validate.cel_problems(spec),
    }
    if layer in by_layer:
        assert any(p.path == path for p in by_layer[layer]), f"{case_id} not caught by the {layer} layer"
    else:
        assert not by_layer["schema"] and not by_layer["cel"], f"{case_id} should pass admission: {problems}"


def test_there_are_at_least_30_distinct_invalid_cases_across_all_layers():
    assert len({c[0] for c in CASES}) >= 30
    assert {c[5] for c in CASES} == {"schema", "cel", "semantic"}


@pytest.mark.parametrize("name", ["demo.yaml", "run.yaml"])
def test_examples_are_valid(name):
    assert validate.validate_text((REPO / "examples" / name).read_text()) == []


@pytest.mark.parametrize(
    "text,path,words",
    [
        ("spec: [unclosed", "<yaml>", "(while parsing a flow sequence at line 1, column 7)"),
        ("", "<yaml>", "no documents"),
        ("- a\n- b\n", "<document>", "not a mapping"),
        ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", "apiVersion", "pretrain.vlm.dev/v1alpha1"),
        ("apiVersion: pretrain.vlm.dev/v1alpha1\nkind: Foo\nmetadata: {name: x}\nspec: {}\n", "kind", "VLMPretrainRun"),
        ("apiVersion: pretrain.vlm.dev/v1alpha1\nkind: VLMPretrainRun\nmetadata: {name: Bad}\nspec: {}\n", "metadata.name", "DNS label"),
        ("apiVersion: pretrain.vlm.dev/v1alpha1\nkind: VLMPretrainRun\nmetadata: {name: x}\n", "spec", "required"),
    ],
)
def test_documents_that_are_not_runs_get_one_clear_line(text, path, words):
    problems = validate.validate_text(text)
    assert any(p.path == path and words in p.reason for p in problems), problems


def test_immutable_fields_are_rejected_on_update_only():
    old = copy.deepcopy(DEMO["spec"])
    assert validate.validate_spec(copy.deepcopy(old), old_spec=old) == []
    new = copy.deepcopy(old)
    new["stages"][0]["steps"] = 999
    assert [str(p) for p in validate.validate_spec(new, old_spec=old)] == [
        "spec.stages: is immutable once created; a changed recipe is a new run"
    ]
    # Day-2 fields stay mutable.
    new = copy.deepcopy(old)
    new["resources"]["nodes"]["max"] = 4
    new["suspend"] = True
    new["checkpoint"]["keep"] = 9
    assert validate.validate_spec(new, old_spec=old) == []


def test_defaults_fill_what_a_user_leaves_out():
    minimal = {
        "model": {"llm": {"path": "s3://models/llm/"}},
        "data": {"sources": [{"name": "web", "modality": "text", "uri": "s3://data/web/{0..9}.tar"}]},
        "stages": [{"name": "pretrain", "tokens": "1B", "mixture": {"web": 1}}],
        "checkpoint": {"uri": "s3://ckpt/run/"},
    }
    assert validate.validate_spec(minimal) == []
    spec = schema.parse_spec(minimal)
    assert spec.data.seq_length == 2048
    assert spec.resources.nodes.min == spec.resources.nodes.max == 1
    assert spec.stages[0].optimizer.schedule == "cosine"
    assert spec.stages[0].trainable.llm == "all" and spec.stages[0].trainable.vision_encoder is False
    assert spec.checkpoint.keep == 3 and spec.checkpoint.interval == "30m"
    # The API server's defaulting (from the CRD) agrees with pydantic's.
    served = validate.apply_defaults(minimal)
    assert served["stages"][0]["optimizer"]["lr"] == spec.stages[0].optimizer.lr
    assert served["resources"]["gpusPerNode"] == 8 and served["metrics"]["port"] == 9400


@pytest.mark.parametrize(
    "value,expected",
    [(4096, 4096), ("4M", 4_000_000), ("100B", 100_000_000_000), ("1.5K", 1500), ("2T", 2 * 10**12), ("7", 7)],
)
def test_quantities(value, expected):
    assert parse_quantity(value) == expected


@pytest.mark.parametrize("bad", ["4Mi", "-1", "", "1e9", True, -5, 1.5])
def test_bad_quantities(bad):
    with pytest.raises(ValueError):
        parse_quantity(bad)


def test_durations_and_intervals():
    assert parse_duration("1h30m") == 5400
    assert parse_interval("30m") == ("seconds", 1800)
    assert parse_interval(500) == ("steps", 500)
    with pytest.raises(ValueError):
        parse_interval(0)


def test_brace_expansion_keeps_padding_and_multiplies():
    assert expand_braces("s3://b/{000..002}.tar") == ["s3://b/000.tar", "s3://b/001.tar", "s3://b/002.tar"]
    assert expand_braces("a{0..1}-{8..9}") == ["a0-8", "a0-9", "a1-8", "a1-9"]
    assert len(expand_braces("s3://data/dcdr/{00000..09999}.tar")) == 10000


def test_brace_alternatives_are_refused_so_counting_and_expansion_agree():
    """braceexpand (the reader's expansion) also expands {a,b}; validation counts ranges
    only, so it refuses alternatives, with the field's path, rather than miscount them."""
    from vlm_api import quantities

    for uri in ("s3://b/{a,b}.tar", "s3://b/{0..1}-{x,y}.tar", "s3://b/{{0..1},{5..6}}.tar", "s3://b/{,}.tar"):
        with pytest.raises(ValueError, match="alternatives like {a,b} are not supported"):
            quantities.count_shards(uri)
        with pytest.raises(ValueError, match="alternatives"):
            expand_braces(uri)
    for uri in ("s3://b/x.tar", "s3://b/{7..7}.tar", "a{0..2}/{08..11}-{1..3}.tar", "a{8..010}"):
        shards = expand_braces(uri)
        assert len(shards) == len(set(shards)) == quantities.count_shards(uri)
    assert expand_braces("a{8..010}") == ["a008", "a009", "a010"]  # as webdataset pads (braceexpand)
    spec = copy.deepcopy(RUN["spec"])
    spec["data"]["sources"][1]["validationUri"] = "s3://data/val-{a,b}.tar"
    assert [str(p) for p in validate.validate_spec(spec)] == [
        "spec.data.sources[1].validationUri: brace alternatives like {a,b} are not supported; "
        "name shards with ranges like {000..099}"]


def test_brace_ranges_are_counted_not_expanded():
    """Validation counts shards arithmetically: a million-shard range costs microseconds,
    and an oversized one is refused before a single string is built."""
    from vlm_api import quantities

    t0 = time.perf_counter()
    assert quantities.count_shards("s3://b/{000000..999999}.tar") == 1_000_000
    assert quantities.count_shards("s3://b/{000..999}/{000..999}.tar") == 1_000_000
    with pytest.raises(ValueError, match="at most 1000000"):
        quantities.count_shards("s3://b/{0..999999999999999999}.tar")
    with pytest.raises(ValueError, match="at most 1000000"):
        quantities.expand_braces("s3://b/{0..99999}/{0..99}.tar")
    with pytest.raises(ValueError, match="at most 8"):
        quantities.count_shards("s3://b/" + "{0..1}" * 9)
    with pytest.raises(ValueError, match="18 digits"):
        quantities.count_shards("s3://b/{0..9999999999999999999}.tar")
    assert time.perf_counter() - t0 < 0.05
    assert expand_braces("a{0..1}-{08..10}") == ["a0-08", "a0-09", "a0-10", "a1-08", "a1-09", "a1-10"]
    spec = copy.deepcopy(RUN["spec"])
    spec["data"]["sources"][0]["uri"] = "s3://data/dclm/{000000..999999}.tar"
    t0 = time.perf_counter()
    assert validate.validate_spec(spec) == []
    assert time.perf_counter() - t0 < 2.0  # was ~0.8 s per such URI, expanded


def test_visual_region_rule_is_the_documented_one():
    assert validate.visual_region_layers(0.25, 32) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert validate.visual_region_layers(0.5, 4) == [1, 3]
    assert validate.visual_region_layers(1.0, 3) == [0, 1, 2]

"""VLMPretrainSweep: the grid (paths, expansion, names), its CRD, and every rejection with its path."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from vlm_api import celrules, sweep as sw, sweep_crd, sweep_grid as g, validate
from vlm_api.sweep_validate import MAX_RUNS, validate_sweep_object

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "examples/demo.yaml").read_text())
INTRO = "stages[pretrain].visualIntroduceAt"


def sweep(**spec) -> dict:
    body = {"template": copy.deepcopy(DEMO["spec"]),
            "parameters": [{"path": INTRO, "values": [0.0, 0.4, 0.8]},
                           {"path": "stages[sft].trainable.llm", "values": ["all", {"visualRegion": {"fraction": 0.25}}]}],
            "seeds": [0, 1], "maxConcurrent": 2, "objective": {"stage": "sft", "modality": "image-text"}}
    body.update(spec)
    return {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainSweep", "metadata": {"name": "intro"},
            "spec": body}


def problems(obj: dict) -> list[str]:
    return [str(p) for p in validate_sweep_object(obj)]


def test_the_example_sweeps_are_valid():
    assert problems(sweep()) == []
    for path in sorted(REPO.glob("examples/sweep-*.yaml")):
        assert problems(yaml.safe_load(path.read_text())) == [], path


# (id, mutation of the sweep, expected path, words of the reason)
REJECTIONS = [
    ("unknown-field", lambda o: o["spec"]["parameters"][0].update(path="stages[pretrain].visualIntroducAt"),
     "spec.parameters[0].path", "has no field visualIntroducAt (did you mean visualIntroduceAt?)"),
    ("unknown-stage", lambda o: o["spec"]["parameters"][0].update(path="stages[warmup].visualIntroduceAt"),
     "spec.parameters[0].path", "no item named warmup"),
    ("list-without-name", lambda o: o["spec"]["parameters"][0].update(path="stages.visualIntroduceAt"),
     "spec.parameters[0].path", "address its items by name"),
    ("name-on-a-mapping", lambda o: o["spec"]["parameters"][0].update(path="model[llm].config"),
     "spec.parameters[0].path", "not a list of named items"),
    ("into-a-string", lambda o: o["spec"]["parameters"].append(
        {"path": "stages[pretrain].trainable.llm.visualRegion.fraction", "values": [0.5]}),
     "spec.parameters[2].path", "stages[pretrain].trainable.llm is \"all\" in the template, not a mapping"),
    ("seed-is-the-sweeps", lambda o: o["spec"]["parameters"].append({"path": "seed", "values": [1, 2]}),
     "spec.parameters[2].path", "spec.seeds sets it"),
    ("malformed-path", lambda o: o["spec"]["parameters"][0].update(path="stages[pretrain]..lr"),
     "spec.parameters[0].path", "does not match the expected form"),
    ("value-out-of-range", lambda o: o["spec"]["parameters"][0]["values"].append(1.5),
     "spec.parameters[0].values[3]", "stages[pretrain].visualIntroduceAt = 1.5 makes spec.template.stages[0].visualIntroduceAt"),
    ("value-wrong-type", lambda o: o["spec"]["parameters"][1]["values"].append({"visualRegion": {"fraction": 2}}),
     "spec.parameters[1].values[2]", "makes spec.template.stages[1].trainable.llm"),
    ("point-invalid-as-a-whole",
     lambda o: o["spec"].update(parameters=[{"path": "stages[pretrain].globalBatchTokens", "values": [1536, 400]},
                                            {"path": "data.seqLength", "values": [384, 512]}]),
     "spec.parameters", "point {stages[pretrain].globalBatchTokens: 400, data.seqLength: 512} makes spec.template"),
    ("too-many-points", lambda o: o["spec"]["parameters"].append(
        {"path": "stages[pretrain].optimizer.lr", "values": [1e-4 * (i + 1) for i in range(43)]}),
     "spec.parameters", "3 x 2 x 43 = 258 points: at most 256"),
    ("too-many-runs", lambda o: o["spec"].update(
        parameters=[{"path": "stages[pretrain].optimizer.lr", "values": [1e-4 * (i + 1) for i in range(200)]}],
        seeds=list(range(6))),
     "spec.seeds", f"200 points x 6 seeds = 1200 runs: at most {MAX_RUNS}"),
    ("objective-stage", lambda o: o["spec"]["objective"].update(stage="nope"),
     "spec.objective.stage", "must name a stage of the template"),
    ("objective-modality", lambda o: o["spec"]["objective"].update(modality="audio"),
     "spec.objective.modality", "is not one of"),
    ("duplicate-path", lambda o: o["spec"]["parameters"].append({"path": INTRO, "values": [0.2]}),
     "spec.parameters[2].path", "duplicate"),
    ("seed-range", lambda o: o["spec"].update(seeds=[0, 1000]), "spec.seeds[1]", "greater than the maximum of 999"),
    ("max-concurrent", lambda o: o["spec"].update(maxConcurrent=0), "spec.maxConcurrent", "less than the minimum"),
    ("no-values", lambda o: o["spec"]["parameters"][0].update(values=[]), "spec.parameters[0].values", "at least 1 item"),
    ("template-invalid", lambda o: o["spec"]["template"]["stages"][0].update(steps=0),
     "spec.template.stages[0].steps", "less than the minimum of 1"),
    ("template-missing", lambda o: o["spec"].pop("template"), "spec.template", "required field is missing"),
    ("long-name", lambda o: o["metadata"].update(name="a" * (sw.MAX_SWEEP_NAME + 1)),
     "metadata.name", f"at most {sw.MAX_SWEEP_NAME} characters"),
]


@pytest.mark.parametrize("mutate,path,words", [c[1:] for c in REJECTIONS], ids=[c[0] for c in REJECTIONS])
def test_each_rejection_names_its_path(mutate, path, words):
    obj = sweep()
    mutate(obj)
    found = problems(obj)
    assert found, "accepted"
    assert any(p.startswith(f"{path}: ") and words in p for p in found), found


def test_list_map_duplicates_use_the_list_map_check():
    # The API server refuses duplicate parameter paths itself (x-kubernetes-list-type: map).
    params = sweep_crd.spec_schema()["properties"]["parameters"]
    assert params["x-kubernetes-list-type"] == "map" and params["x-kubernetes-list-map-keys"] == ["path"]


def test_the_crd_is_generated_with_short_names_columns_and_the_run_schema_as_template():
    assert (REPO / sweep_crd.SWEEP_CRD_FILE).read_text() == sweep_crd.sweep_crd_yaml(), \
        "run `vlmpretrain crd --kind sweep -o crds/pretrain.vlm.dev_vlmpretrainsweeps.yaml`"
    crd = sweep_crd.build_sweep_crd()
    assert crd["spec"]["names"]["shortNames"] == ["vlmsweep", "vps"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Done", "Best", "Age"]
    root = version["schema"]["openAPIV3Schema"]
    assert root["properties"]["spec"]["properties"]["template"]["properties"] == \
        sweep_crd.run_spec_schema()["properties"]

    def described(node, path="spec"):
        if isinstance(node, dict) and "properties" in node:
            for k, sub in node["properties"].items():
                assert sub.get("description"), f"{path}.{k} has no description"
                if k != "template":
                    described(sub, f"{path}.{k}")
    described(root["properties"]["spec"])


@pytest.mark.parametrize("change,message", [
    (lambda o: o["spec"]["objective"].update(stage="nope"), "objective.stage must name a stage"),
    (lambda o: o["spec"]["parameters"][0].update(path="stages[nope].visualIntroduceAt"), "must name a stage"),
    (lambda o: o["metadata"].update(name="x" * 27), "at most 26 characters"),
])
def test_the_crds_cel_rules_reject_at_admission(change, message):
    """The rules the API server runs, evaluated as it does (vlm_api.celrules)."""
    root = sweep_crd.build_sweep_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    obj = sweep()
    assert celrules.evaluate(root, obj) == []
    change(obj)
    assert any(message in m for _, m in celrules.evaluate(root, obj))


def test_render_of_a_point_sets_the_value_the_seed_and_its_own_checkpoints():
    obj = sweep()
    obj["metadata"]["namespace"] = "team"
    kids = list(g.children(obj))
    assert len(kids) == 12
    assert [seed for _, seed, _ in kids] == [0] * 6 + [1] * 6
    point, seed, run = kids[5]
    assert point == {INTRO: 0.8, "stages[sft].trainable.llm": {"visualRegion": {"fraction": 0.25}}}
    assert run["metadata"]["name"] == f"intro-{g.point_hash(point)}-s0"
    assert run["metadata"]["namespace"] == "team"
    assert run["metadata"]["labels"] == {sw.LABEL_SWEEP: "intro", sw.LABEL_POINT: g.point_hash(point), sw.LABEL_SEED: "0"}
    assert json.loads(run["metadata"]["annotations"][sw.ANNOTATION_PARAMETERS]) == point
    assert run["spec"]["stages"][0]["visualIntroduceAt"] == 0.8
    assert run["spec"]["stages"][1]["trainable"]["llm"] == {"visualRegion": {"fraction": 0.25}}
    assert run["spec"]["seed"] == 0
    assert run["spec"]["checkpoint"]["uri"] == f"file://./runs/demo/checkpoints/{run['metadata']['name']}/"
    assert validate.validate_object(run) == []
    assert obj["spec"]["template"] == DEMO["spec"]  # the template is not modified


# ---------------------------------------------------------------------------- properties of the grid

values = st.one_of(st.integers(-5, 5), st.floats(0, 1, allow_nan=False), st.text(max_size=3), st.booleans())
params = st.lists(st.tuples(st.sampled_from(["a", "b.c", "stages[x].d", "e[y].f.g"]), st.lists(values, min_size=1, max_size=4)),
                  min_size=0, max_size=3, unique_by=lambda p: p[0])


@given(params)
@settings(max_examples=60, deadline=None)
def test_the_grid_is_the_cartesian_product_with_distinct_names(ps):
    parameters = [{"path": p, "values": v} for p, v in ps]
    points = g.grid(parameters)
    assert len(points) == g.grid_size(parameters)
    for pt in points:
        assert list(pt) == [p for p, _ in ps]
        assert all(pt[p] in v for p, v in ps)
    distinct = {json.dumps(pt, sort_keys=True) for pt in points}
    names = {g.run_name("s", pt, 3) for pt in points}
    assert len(names) == len(distinct)  # one name per distinct point
    assert all(len(n) == len("s-") + sw.HASH_CHARS + len("-s3") for n in names)


@given(st.sampled_from(["pretrain", "sft"]), st.floats(0, 1, allow_nan=False))
@settings(max_examples=30, deadline=None)
def test_apply_sets_exactly_the_addressed_field(stage, value):
    out = g.apply(DEMO["spec"], f"stages[{stage}].visualIntroduceAt", value)
    index = [s["name"] for s in DEMO["spec"]["stages"]].index(stage)
    assert out["stages"][index]["visualIntroduceAt"] == value
    out["stages"][index] = DEMO["spec"]["stages"][index]
    assert out == DEMO["spec"]


def test_best_averages_seeds_and_ignores_failed_runs():
    def pt(name, seed, phase, loss=None):
        return {"name": name, "parameters": {"x": name}, "seed": seed, "phase": phase,
                **({"validationLoss": {"image-text": loss}} if loss is not None else {})}
    points = [pt("a", 0, "Succeeded", 2.0), pt("a", 1, "Succeeded", 3.0), pt("b", 0, "Succeeded", 2.4),
              pt("b", 1, "Failed"), pt("c", 0, "Failed")]
    assert g.best(points, {"modality": "image-text", "goal": "minimize"}) == \
        {"name": "b", "parameters": {"x": "b"}, "value": 2.4, "seeds": 1}
    assert g.best(points, {"modality": "image-text", "goal": "maximize"})["name"] == "a"
    assert g.best([pt("c", 0, "Failed")], {"modality": "image-text"}) is None

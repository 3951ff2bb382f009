"""The operator's pure core: property-based over generated specs and job histories, plus
unit tests of the pure pieces (status mapping, pipeline rules, day-2 diffs, metric parsing).

The property test plays a whole cluster in memory: generated specs (valid and not) go
through `core.decide` the way every handler sends them, while a random history of
Kubeflow job conditions, deletions, spec edits (suspend, rescale), clock jumps, scrapes
and a CRD appearing or vanishing unfolds. Whatever happens: no exception escapes, every
decision carries a phase and the three conditions, the status fits the CRD's status schema,
no live child is created twice, retries stay within maxRetries and a finished run stays
finished.
"""

from __future__ import annotations

import copy
import json
import datetime
import functools

import jsonschema
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as hs

from tests.support.operator_harness import SPEC
import vlm_api.validate  # noqa: F401  (cel-python raises the recursion limit on import: do it before hypothesis runs)
from vlm_api import crd, render, stage_policy
from vlm_operator import config, core, day2, pipeline, scrape
from vlm_operator import status as st

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
CFG = config.Config(retry_backoff=30, retry_backoff_max=300, crd_retry=60)
STATUS_SCHEMA = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
STATUS_VALIDATOR = jsonschema.Draft4Validator(STATUS_SCHEMA)
JOB_STATES = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


@functools.lru_cache(maxsize=512)
def _check(digest: str, spec_json: str) -> tuple[str, ...]:
    import json

    return tuple(core.check_spec(json.loads(spec_json)))


def check(spec) -> list[str]:
    import json

    text = json.dumps(spec, sort_keys=True, default=str)
    return list(_check(core.digest(spec), text))


# ---------------------------------------------------------------------------- strategies

stage_names = hs.sampled_from(["pretrain", "sft", "align", "Bad_Name", ""])


@hs.composite
def stage(draw):
    out: dict = {"name": draw(stage_names)}
    length = draw(hs.sampled_from(["steps", "tokens", "epochs", "none", "two"]))
    if length in ("steps", "two"):
        out["steps"] = draw(hs.integers(-1, 300))
    if length in ("tokens", "two"):
        out["tokens"] = draw(hs.sampled_from(["100B", "4M", 10_000, "x", 0]))
    if length == "epochs":
        out["epochs"] = draw(hs.floats(0, 3, allow_nan=False))
    sources = draw(hs.lists(hs.sampled_from(["text", "caps", "nope"]), min_size=1, max_size=3, unique=True))
    if draw(hs.booleans()):
        out["mixture"] = {src: 1.0 / len(sources) for src in sources}
    else:
        out["mixture"] = {src: draw(hs.floats(-0.5, 1.5, allow_nan=False)) for src in sources}
    out["globalBatchTokens"] = draw(hs.sampled_from([2048, "4M", 64, "1K"]))
    return out


@hs.composite
def specs(draw):
    """Mostly valid specs (the interesting paths need them), the rest broken in one or two ways."""
    kind = draw(hs.sampled_from(["valid", "valid", "valid", "mutated", "mutated", "junk"]))
    if kind == "junk":
        return draw(hs.one_of(hs.none(), hs.just([]), hs.just("spec"), hs.just({}), hs.dictionaries(hs.text(max_size=5), hs.integers(), max_size=3)))
    out = copy.deepcopy(SPEC)
    out["maxRetries"] = draw(hs.integers(0, 3))
    out["suspend"] = draw(hs.booleans()) and draw(hs.booleans())
    out["stages"] = out["stages"][: draw(hs.integers(1, 2))]
    out["metrics"] = {"port": draw(hs.integers(1024, 65535)), "podMonitor": draw(hs.booleans())}
    if kind == "valid":
        return out
    for mutation in draw(hs.lists(hs.sampled_from(["stages", "nodes", "retries", "port", "drop", "checkpoint"]),
                                  min_size=1, max_size=2, unique=True)):
        if mutation == "stages":
            out["stages"] = draw(hs.lists(stage(), min_size=0, max_size=3))
        elif mutation == "nodes":
            out["resources"] = {"nodes": {"min": draw(hs.integers(0, 5)), "max": draw(hs.integers(0, 5))},
                                "gpusPerNode": draw(hs.integers(-1, 9))}
        elif mutation == "retries":
            out["maxRetries"] = draw(hs.integers(-1, 3))
        elif mutation == "port":
            out["metrics"]["port"] = draw(hs.integers(0, 70_000))
        elif mutation == "drop":
            out.pop(draw(hs.sampled_from(["model", "data", "checkpoint", "image", "stages"])), None)
        elif mutation == "checkpoint":
            out["checkpoint"] = {"uri": draw(hs.sampled_from(["s3://ckpt/x/", "s3://UPPER/x", "", "/local/ckpt"])),
                                 "keep": draw(hs.integers(0, 5))}
    return out


actions = hs.one_of(
    hs.tuples(hs.just("job"), hs.sampled_from(JOB_STATES)),
    hs.tuples(hs.just("job"), hs.sampled_from(["Succeeded", "Failed"])),  # weight the transitions that advance
    hs.tuples(hs.just("unconfirmed"), hs.none()),  # Succeeded, but no pod confirmed the final checkpoint
    hs.tuples(hs.just("delete"), hs.none()),
    hs.tuples(hs.just("time"), hs.sampled_from([1, 29, 31, 120, 1000])),
    hs.tuples(hs.just("suspend"), hs.booleans()),
    hs.tuples(hs.just("rescale"), hs.tuples(hs.integers(1, 4), hs.integers(1, 6))),
    hs.tuples(hs.just("crd"), hs.booleans()),
    hs.tuples(hs.just("scrape"), hs.integers(0, 500)),
    hs.tuples(hs.just("scrape_error"), hs.none()),
)


# ---------------------------------------------------------------------------- the simulated cluster


class World:
    def __init__(self, spec) -> None:
        self.run = {"apiVersion": "pretrain.vlm.dev/v1alpha1", "kind": "VLMPretrainRun",
                    "metadata": {"name": "prop", "namespace": "ns", "uid": "u-1", "generation": 1},
                    "spec": copy.deepcopy(spec), "status": {}}
        self.jobs: dict[str, dict] = {}
        self.ever: set[str] = set()
        self.confirmed: dict[str, str] = {}  # job -> termination message of its rank-0 pod
        self.stores: dict[str, tuple[str, int]] = {}  # rendezvous-store Deployments that exist: (stage, attempt)
        self.now = T0
        self.crd = True
        self.sample: scrape.Sample | None = None
        self.scrape_error: str | None = None
        self.terminal: str | None = None
        self.decisions = 0
        self.invalid_from_start = False

    @property
    def status(self) -> dict:
        return self.run["status"]

    def edit(self, key: str, value) -> None:
        if isinstance(self.run["spec"], dict):
            self.run["spec"][key] = value
            self.run["metadata"]["generation"] += 1

    def act(self, action) -> None:
        kind, arg = action
        job = self.jobs.get(self.status.get("jobName", ""))
        if kind in ("job", "unconfirmed") and job is not None:
            state = arg or "Succeeded"
            conds = [c for c in job.setdefault("status", {}).get("conditions", []) if c["type"] != state]
            conds.append({"type": state, "status": "True", "reason": f"PyTorchJob{state}", "message": "m",
                          "lastTransitionTime": st.fmt_time(self.now)})
            job["status"]["conditions"] = conds
            if kind == "job" and state == "Succeeded":
                name, stage = job["metadata"]["name"], job["metadata"]["labels"][render.LABEL_STAGE]
                self.confirmed[name] = stage_policy.confirmation(stage, 100, f"s3://ckpt/x/{name}/step-100/", 5000)
        elif kind == "delete" and job is not None:
            del self.jobs[job["metadata"]["name"]]
        elif kind == "time":
            self.now += datetime.timedelta(seconds=arg)
        elif kind == "suspend":
            self.edit("suspend", arg)
        elif kind == "rescale":
            lo, hi = arg
            res = copy.deepcopy((self.run["spec"] or {}).get("resources") or {}) if isinstance(self.run["spec"], dict) else {}
            res["nodes"] = {"min": lo, "max": hi}
            self.edit("resources", res)
        elif kind == "crd":
            self.crd = arg
        elif kind == "scrape":
            self.sample = scrape.Sample(job=self.status.get("jobName", ""), step=arg, tokens=arg * 100, loss=2.0,
                                        image_token_fraction=0.1, world_size=8, restarts=0, checkpoint_step=arg,
                                        checkpoint_time=1.7e9, checkpoint_uri=f"s3://ckpt/x/step-{arg}/")
            self.scrape_error = None
        elif kind == "scrape_error":
            self.scrape_error = "connection refused"

    def reconcile(self) -> core.Decision:
        job = self.jobs.get(self.status.get("jobName", ""))
        obs = core.Observed(pytorchjob_crd=self.crd, podmonitor_crd=True, check_drift=True,
                            job=copy.deepcopy(job), sample=self.sample, scrape_error=self.scrape_error,
                            stores=tuple(sorted((n, *sa) for n, sa in self.stores.items())))
        if job is not None and st.job_state(job).state == "Succeeded":
            obs.confirmation = stage_policy.confirmed_final([self.confirmed.get(self.status["jobName"])],
                                                            self.status.get("stage"))
        spec = self.run["spec"]
        problems = check(spec)
        decision = core.decide(copy.deepcopy(self.run), problems, obs, self.now, CFG)
        self.decisions += 1
        self.verify(decision, problems)
        for kind, _, name in decision.delete:
            if kind == "Deployment":
                self.stores.pop(name, None)
        for obj in decision.create:
            name = obj["metadata"]["name"]
            if obj["kind"] == "Deployment":
                labels = obj["metadata"]["labels"]
                self.stores[name] = (labels[render.LABEL_STAGE], int(labels[render.LABEL_ATTEMPT]))
            if obj["kind"] == "PyTorchJob":
                assert name not in self.jobs, f"second generation of live job {name}"
                self.jobs[name] = copy.deepcopy(obj)
                self.ever.add(name)
        for kind, _, name, patch in decision.patch:
            if kind == "PyTorchJob":
                assert name in self.jobs
                _merge(self.jobs[name], patch)
        self.run["status"] = decision.status
        s = decision.status
        if s["phase"] in st.TERMINAL:
            assert not self.stores, "a finished run keeps no rendezvous store"
        elif not decision.invalid and s.get("stage") and isinstance(self.run["spec"], dict):
            current = render.store_name("prop", s["stage"], s["attempt"])
            assert set(self.stores) <= {current}, "only the current attempt's store runs"
            if decision.create and any(o["kind"] == "PyTorchJob" for o in decision.create):
                assert current in self.stores, "a new attempt gets its own store"
        return decision

    def verify(self, d: core.Decision, problems: list[str]) -> None:
        s = d.status
        assert s["phase"] in st.PHASES
        assert [c["type"] for c in s["conditions"]][:3] == ["Ready", "Progressing", "Degraded"]
        assert {c["type"] for c in s["conditions"][3:]} <= {"RendezvousReady"}
        assert all(c["status"] in ("True", "False", "Unknown") and c["reason"] for c in s["conditions"])
        errors = [e.message for e in STATUS_VALIDATOR.iter_errors(s)]
        assert not errors, errors
        if self.terminal:
            assert s["phase"] == self.terminal, "a finished run must stay finished"
            assert not d.create and not d.patch
        elif d.invalid:
            assert s["phase"] == "Invalid"
            assert not d.create and not d.patch
            if self.decisions == 1:
                self.invalid_from_start = True
        else:
            spec = self.run["spec"]
            assert isinstance(spec, dict)
            assert 0 <= s["attempt"] <= max(0, spec.get("maxRetries", 3))
            assert s["jobName"] == render.job_name("prop", s["stage"], s["attempt"])
            for obj in d.create:
                assert obj["metadata"]["namespace"] == "ns"
                assert obj["metadata"]["labels"][render.LABEL_RUN] == "prop"
        if s["phase"] in st.TERMINAL:
            self.terminal = s["phase"]


def _merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), history=hs.lists(actions, max_size=25))
def test_any_spec_and_history_ends_with_a_phase_and_conditions(spec, history):
    world = World(spec)
    world.reconcile()
    for action in history:
        world.act(action)
        world.reconcile()
    final = world.reconcile()  # settle
    assert final.status["phase"] and final.status["conditions"]
    event(f"final phase {final.status['phase']}")
    event(f"jobs created: {min(len(world.ever), 3)}{'+' if len(world.ever) > 3 else ''}")
    if world.invalid_from_start and all(kind not in ("suspend", "rescale") for kind, _ in history):
        assert not world.ever, "an invalid run never gets a child"


@settings(max_examples=40, deadline=None)
@given(retries=hs.integers(0, 3), failures=hs.lists(hs.integers(0, 4), min_size=2, max_size=2),
       stages=hs.integers(1, 2))
def test_valid_runs_finish_with_the_right_outcome(retries, failures, stages):
    """Every job fails `failures[i]` times before it succeeds: the run succeeds with
    exactly one job per stage attempt, or fails after maxRetries retries of one stage."""
    spec = copy.deepcopy(SPEC)
    spec["maxRetries"] = retries
    spec["stages"] = spec["stages"][:stages]
    world = World(spec)
    world.reconcile()
    expected_fail = any(f > retries for f in failures[:stages])
    for i in range(stages):
        for _ in range(min(failures[i], retries + 1)):
            world.act(("job", "Failed"))
            world.reconcile()  # backoff
            world.act(("time", 10_000))
            world.reconcile()
        if world.status["phase"] == "Failed":
            break
        world.act(("job", "Succeeded"))
        world.reconcile()
    final = world.reconcile()
    assert final.status["phase"] == ("Failed" if expected_fail else "Succeeded")
    if not expected_fail:
        assert len(world.ever) == sum(failures[i] + 1 for i in range(stages))
        assert final.status["completionTime"]
        assert set(final.status["finalCheckpoints"]) == {s["name"] for s in spec["stages"]}


def test_a_stage_advances_only_on_its_confirmed_final_checkpoint():
    spec = copy.deepcopy(SPEC)
    spec["maxRetries"] = 1
    world = World(spec)
    world.reconcile()
    first = world.status["jobName"]
    world.act(("unconfirmed", None))
    d = world.reconcile()
    assert world.status["stage"] == spec["stages"][0]["name"] and world.status["phase"] == "Pending"
    assert core.condition(d.status, "Degraded")["reason"] == "FinalCheckpointUnconfirmed"
    assert [e[1] for e in d.events] == ["FinalCheckpointUnconfirmed"] and not d.create
    assert "finalCheckpoints" not in d.status
    world.act(("time", 10_000))
    d = world.reconcile()  # a new attempt: it resumes the final checkpoint, trains nothing and confirms it
    retry = world.status["jobName"]
    assert retry != first and world.status["attempt"] == 1
    assert render.store_name("prop", world.status["stage"], 0) not in world.stores
    world.act(("job", "Succeeded"))
    d = world.reconcile()
    final = d.status["finalCheckpoints"][spec["stages"][0]["name"]]
    assert (final["uri"], final["step"], final["tokens"]) == (f"s3://ckpt/x/{retry}/step-100/", 100, 5000)
    cm = next(o for o in d.create if o["kind"] == "ConfigMap")
    assert f"initFrom: {final['uri']}" in cm["data"]["config.yaml"]  # the next stage starts from what was confirmed


def test_unconfirmed_success_with_no_retry_left_fails_the_run_saying_why():
    spec = copy.deepcopy(SPEC)
    spec["maxRetries"] = 0
    world = World(spec)
    world.reconcile()
    world.act(("unconfirmed", None))
    d = world.reconcile()
    assert d.status["phase"] == "Failed"
    assert core.condition(d.status, "Degraded")["reason"] == "FinalCheckpointUnconfirmed"


# ---------------------------------------------------------------------------- unit tests of the pure pieces


def job(*conds: tuple[str, str]) -> dict:
    return {"status": {"conditions": [{"type": t, "status": s, "reason": f"R{t}", "message": t,
                                       "lastTransitionTime": "2026-01-01T00:00:00Z"} for t, s in conds]}}


@pytest.mark.parametrize("conds, state", [
    ((), "Pending"),
    ((("Created", "True"),), "Created"),
    ((("Created", "True"), ("Running", "True")), "Running"),
    ((("Created", "True"), ("Running", "False"), ("Restarting", "True")), "Restarting"),
    ((("Created", "True"), ("Running", "True"), ("Suspended", "True")), "Suspended"),
    ((("Created", "True"), ("Running", "False"), ("Succeeded", "True")), "Succeeded"),
    ((("Created", "True"), ("Running", "True"), ("Failed", "True")), "Failed"),
])
def test_job_state_precedence(conds, state):
    assert st.job_state(job(*conds)).state == state
    assert st.job_state(None).state == "Absent"


def test_conditions_keep_their_transition_time_while_unchanged():
    view = st.for_job(st.JobState("Running"), suspend=False, stage="s", attempt=0, job="j")
    first = view.conditions(None, 3, T0)
    later = view.conditions(first, 4, T0 + datetime.timedelta(hours=1))
    assert [c["lastTransitionTime"] for c in later] == [c["lastTransitionTime"] for c in first]
    assert {c["observedGeneration"] for c in later} == {4}
    flipped = st.for_job(st.JobState("Running"), suspend=True, stage="s", attempt=0, job="j").conditions(later, 4, T0 + datetime.timedelta(hours=2))
    assert flipped[0]["lastTransitionTime"] != later[0]["lastTransitionTime"]


def test_day2_job_patch():
    from vlm_api import schema

    spec = schema.parse_spec(SPEC)
    run = {"name": "r", "namespace": "ns", "uid": "u"}
    live = render.build_pytorchjob(run, spec, "pretrain")
    assert day2.job_patch(live, live) is None
    bigger = render.build_pytorchjob(run, spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"nodes": spec.resources.nodes.model_copy(update={"min": 2, "max": 6})})}), "pretrain")
    assert day2.job_patch(live, bigger) == {"spec": {"elasticPolicy": {"minReplicas": 2, "maxReplicas": 6},
                                                     "pytorchReplicaSpecs": {"Worker": {"replicas": 6}}}}
    paused = render.build_pytorchjob(run, spec.model_copy(update={"suspend": True}), "pretrain")
    patch = day2.job_patch(live, paused)
    assert patch == {"spec": {"runPolicy": {"suspend": True}}}
    assert day2.describe(patch, paused) == [("Suspended", "job suspended")]
    # The watch cache keeps a cut-down job: the same day-2 decisions, a fraction of the body.
    from vlm_operator.registry import slim_job

    live["status"] = {"conditions": [{"type": "Running", "status": "True"}]}
    live["metadata"].update(uid="job-uid", resourceVersion="7", managedFields=[{"manager": "kubectl"}],
                            ownerReferences=[{"kind": "VLMPretrainRun", "name": "r", "uid": "u"}])
    cached = slim_job(live)
    for desired in (live, bigger, paused):
        assert day2.job_patch(cached, desired) == day2.job_patch(live, desired)
    assert st.job_state(cached) == st.job_state(live) and cached["metadata"]["ownerReferences"]
    assert "template" not in str(cached) and "managedFields" not in cached["metadata"]
    assert len(json.dumps(cached)) < len(json.dumps(live)) / 3


def test_status_patch_sets_and_removes():
    assert core.status_patch({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {"c": 3, "b": None}
    assert core.status_patch({"a": 1}, {"a": 1}) == {}


def test_clean_status_drops_garbage_keeps_the_rest():
    assert core.clean_status({"phase": "Running", "step": "many", "bogus": 1, "attempt": 2}) == {"phase": "Running", "attempt": 2}
    assert core.clean_status(["not", "a", "dict"]) == {}


def test_parse_trainer_metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    reg = CollectorRegistry()
    Counter("vlmtrain_steps", "", registry=reg).inc(12)
    tokens = Counter("vlmtrain_tokens", "", ["modality"], registry=reg)
    tokens.labels(modality="text").inc(900)
    tokens.labels(modality="image").inc(100)
    Gauge("vlmtrain_loss", "", registry=reg).set(float("nan"))
    Gauge("vlmtrain_image_token_ratio", "", registry=reg).set(0.1)
    Gauge("vlmtrain_checkpoint_last_step", "", registry=reg).set(10)
    Gauge("vlmtrain_checkpoint_last_success_timestamp_seconds", "", registry=reg).set(0)
    sample = scrape.parse(generate_latest(reg).decode(), "job")
    assert (sample.step, sample.tokens, sample.loss, sample.image_token_fraction) == (12, 1000, None, 0.1)
    status: dict = {}
    scrape.apply(status, sample, "pretrain", "s3://x/pretrain/")
    assert "lastCheckpoint" not in status and "loss" not in status  # nothing committed yet; NaN is not a loss
    with pytest.raises(scrape.ScrapeError):
        scrape.parse("# just a comment\nother_metric 1\n")
    from vlm_trainer.metrics import node_registry

    with pytest.raises(scrape.ScrapeError, match="not the trainer's rank 0"):  # another node's endpoint
        scrape.parse(generate_latest(node_registry(rank=8, group_rank="1")).decode())
    with pytest.raises(scrape.ScrapeError):
        scrape.parse("vlmtrain_steps_total{ 12\n")


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("VLM_PODMONITOR_LABELS", "release=prom, team = vision ,bad")
    monkeypatch.setenv("VLM_OPERATOR_SCRAPE_INTERVAL", "not-a-number")
    cfg = config.Config.from_env()
    assert cfg.podmonitor_labels == {"release": "prom", "team": "vision"}
    assert cfg.scrape_interval == config.Config().scrape_interval


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs())
def test_operator_validation_agrees_with_the_three_layers(spec):
    """The operator skips the CEL layer for specs the other layers accept (the pydantic
    validators carry the same rules): same verdict as `vlmpretrain validate`, same lines
    when invalid."""
    assert core.check_spec(spec) == core.check_spec(spec, cel=True)


def test_scrape_loop_spreads_runs_over_the_period(monkeypatch):
    """1,000 running runs must not be scraped (pod LIST + scrape + status PATCH) in one burst
    every period: each run is scraped once per period at its own phase, ~1/SLICES of them
    per wake-up, and a run seen for the first time (e.g. after an operator restart) waits
    for its phase instead of joining a burst."""
    import asyncio
    from collections import Counter

    from vlm_operator.registry import REGISTRY

    monkeypatch.setattr(config, "CONFIG", config.Config(scrape_interval=30, resync_interval=300))
    n, step = 400, 30 / scrape.SLICES
    listed: Counter = Counter()  # (tick, run) -> pod LISTs: one per scrape
    poked: list = []

    class Pods:
        tick = 0

        async def list(self, kind, namespace, selector):
            run = dict(part.split("=") for part in selector.split(","))[render.LABEL_RUN]
            listed[(self.tick, run)] += 1
            return []  # no pod yet: a scrape error, which is news for the first scrape

    async def poke(key, trigger):
        poked.append((Pods.tick, key, trigger))

    async def ticks(count: int, start: float = 1_000_000.0) -> None:
        client = Pods()
        for i in range(count):
            Pods.tick = i
            await scrape.tick(client, poke, now=start + i * step)

    REGISTRY.reset()
    try:
        for i in range(n):
            state = REGISTRY.get(f"team-{i % 7}", f"run-{i:04d}")
            state.body = {"spec": {}}
            state.status = {"phase": "Running", "jobName": f"run-{i:04d}-pretrain", "stage": "pretrain", "attempt": 0}
        asyncio.run(ticks(1 + 2 * scrape.SLICES))
    finally:
        REGISTRY.reset()
    per_tick = Counter(t for t, _ in listed)
    per_run = Counter(run for _, run in listed)
    assert per_tick[0] == 0, "first sight: every run waits for its phase"
    assert set(per_run.values()) == {2} and len(per_run) == n, "two periods: each run scraped exactly twice"
    assert max(per_tick.values()) <= 2 * n / scrape.SLICES, per_tick  # spread, not a burst
    assert min(per_tick[t] for t in range(1, 1 + 2 * scrape.SLICES)) >= n / scrape.SLICES / 3, per_tick
    first = {run: t for t, run in sorted(listed, reverse=True)}
    assert all(listed[(first[run] + scrape.SLICES, run)] == 1 for run in per_run), "one period apart"
    scraped = [key for _, key, trigger in poked if trigger == "scrape"]
    resynced = [key for _, key, trigger in poked if trigger == "resync"]
    assert len(scraped) == len(set(scraped)) == n  # only the first scrape error is news
    # 60 s of a 300 s resync period: ~1/5 of the runs reach their resync phase, each once
    assert len(resynced) == len(set(resynced)) and n / 10 <= len(resynced) <= n * 3 / 10


def test_pods_are_tried_in_the_order_torchrun_ranks_nodes():
    """torchrun's rendezvous gives node rank 0 (hence global rank 0) to the smallest node
    address, and a worker pod's host name is its pod name: the scrape tries that pod first,
    also past ten nodes (`-worker-10` sorts before `-worker-2`) and after worker-0 is gone."""
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc

    names = [f"llama-pretrain-worker-{i}" for i in (2, 10, 1, 11, 3)]  # worker-0 lost
    pods = [{"metadata": {"name": n}} for n in names]
    ranked = [n.addr for n in sorted(_NodeDesc(addr=n, pid=1, local_id=0) for n in names)]
    assert [p["metadata"]["name"] for p in sorted(pods, key=scrape._pod_order)] == ranked
    assert ranked[0] == "llama-pretrain-worker-1" and ranked[2] == "llama-pretrain-worker-11"

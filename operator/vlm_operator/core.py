"""The pure core of the operator: (run, what was observed, now) -> a Decision.

No I/O, no kopf, no clock of its own: `reconcile.py` gathers the observations, calls
`decide()` and carries the decision out (create children, patch, write status, post
events, wait). The same function serves every trigger (create, resume, spec update, job
event, scrape, backoff wake-up): the operator is level-triggered, and re-running a
decision after a crash or restart yields the same deterministic child names.

Every decision carries a full status with a phase and the Ready/Progressing/Degraded
conditions, whatever the input (the property test feeds it arbitrary specs and job
histories).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import itertools
import json
from typing import Any

import yaml
from pydantic import ValidationError

from vlm_api import render, schema as s, stage_policy

from . import config, day2, pipeline, scrape
from . import status as st
from .config import Config


@dataclasses.dataclass
class Observed:
    """What the executor saw in the cluster for one run."""

    pytorchjob_crd: bool = True
    podmonitor_crd: bool = False
    job: dict | None = None  # the current attempt's PyTorchJob; None = absent or never created
    configmap: dict | None = None  # the current stage's ConfigMap (read when the spec changed)
    check_drift: bool = False  # compare live objects with the spec (day-2 changes)
    sample: scrape.Sample | None = None
    scrape_error: str | None = None
    failed_seen: datetime.datetime | None = None  # when this process first saw the current job Failed
    store: dict | None = None  # the current attempt's rendezvous-store Deployment (spec.elastic.externalStore)
    stores: tuple[tuple[str, str, int], ...] = ()  # (name, stage, attempt) of every rendezvous store of this run
    confirmation: dict | None = None  # the current job's confirmed final checkpoint (stage_policy.confirmed_final)
    workload: dict | None = None  # Kueue's Workload of a Kueue-managed job (when the spec changed or says suspend)


@dataclasses.dataclass
class Decision:
    status: dict
    create: list[dict] = dataclasses.field(default_factory=list)
    patch: list[tuple[str, str, str, dict]] = dataclasses.field(default_factory=list)  # kind, ns, name, merge patch
    delete: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # kind, ns, name
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # type, reason, message
    wait: float | None = None
    wait_reason: str = ""
    invalid: str | None = None

    @property
    def result(self) -> str:
        return "invalid" if self.invalid else "waiting" if self.wait else "success"


# ---------------------------------------------------------------------------- validation


def digest(spec: Any) -> str:
    try:
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
    except (RecursionError, ValueError, TypeError):  # nested past json's limit: never cached, rejected anyway
        return f"undigestable {next(_UNIQUE)}"


_UNIQUE = itertools.count()


# Macro iterations of the CRD's CEL rules a spec may cost before the operator skips CEL and
# reports the pydantic layer's lines instead (cel-python: ~0.1-0.5 ms per iteration; the
# largest spec costs ~3,000, ~0.5-1 s). The verdict is the same either way.
CEL_BUDGET = 400


def cel_cost(spec: dict) -> int:
    """Macro iterations of the CRD's CEL rules for this spec, roughly: per stage its mixture
    (the sum) and the sources (mixture keys, image data)."""
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    stages = spec.get("stages") if isinstance(spec.get("stages"), list) else []
    mixtures = sum(len(x["mixture"]) for x in stages if isinstance(x, dict) and isinstance(x.get("mixture"), dict))
    return mixtures + 2 * len(stages) * len(sources)


def check_spec(spec: Any, *, name: str | None = None, cel: bool = False) -> list[str]:
    """All problems of a spec (and of the run's name, when given), as `path: reason` lines.

    vlm_api.validate has four layers: bounds (nesting, size, credential-shaped values),
    the CRD's OpenAPI schema, its CEL rules, and the pydantic models plus semantic checks.
    The operator runs all but CEL: the API server enforces CEL at admission, and the
    pydantic validators carry the same cross-field rules in Python (schema.py keeps them
    twice on purpose), so a spec that reaches the operator without admission (no CRD
    installed) is still fully checked. A spec the pydantic models accept in strict mode (no
    coercion: exactly the JSON types the schema names; the CRD's schema is generated from
    the same models) needs neither the schema layer (jsonschema: ~30 ms for the largest
    spec) nor CEL (cel-python: ~15 ms for a small spec, ~1 s for the largest). Both run only
    for a spec already found invalid, to report the problems exactly as `vlmpretrain
    validate` and admission do, CEL only while that stays cheap (CEL_BUDGET; `cel=True`
    runs all layers always). Immutability (CEL transition rules) is checked against the
    running stage's config instead (immutable_problems). Every line is scrubbed of
    credential-shaped values. The operator calls this off its event loop
    (reconcile._problems), once per spec generation."""
    from vlm_api import validate as v

    try:
        why = s.run_name_problem(name) if name is not None else None
        named = [str(v.Problem("metadata.name", why))] if why else []
        if cel or not isinstance(spec, dict):
            return named + [str(p) for p in v.validate_spec(spec)]
        problems = v.bound_problems(spec)
        if problems:
            return named + [str(p) for p in problems]
        try:  # the common case, fast: pydantic in strict mode (no coercion) accepts only what the schema does
            problems = v.semantic_problems(s.VLMPretrainRunSpec.model_validate(spec, strict=True))
            if not problems:
                return named
        except ValidationError:
            pass
        # rare: explain it the way admission and `vlmpretrain validate` would (the first
        # layer that finds something speaks: schema, CEL, then pydantic and semantic)
        full = v.apply_defaults(spec)
        problems = v.schema_problems(full)
        if not problems:
            problems, model = v._pydantic_problems(full)
            problems = problems or v.semantic_problems(model)
            if problems and cel_cost(full) <= CEL_BUDGET:
                problems = v.cel_problems(full) or problems
        return named + [str(p) for p in problems]
    except Exception as exc:  # a validator bug must not take the operator down
        return [str(v.Problem("spec", f"could not be validated: {type(exc).__name__}: {exc}"))]


IMMUTABLE = ("model", "data", "stages")
# libyaml's loader: ~10x the pure-Python one; every resume (all runs, at operator start) parses a config.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def running_spec(configmap: dict | None) -> s.VLMPretrainRunSpec | None:
    """The spec the current stage was started with (from its ConfigMap), if readable."""
    try:
        config = yaml.load(((configmap or {}).get("data") or {}).get("config.yaml") or "", Loader=_LOADER)
        return s.VLMPretrainRunSpec.model_validate(config["spec"])
    except Exception:
        return None


def immutable_problems(spec: s.VLMPretrainRunSpec, before: s.VLMPretrainRunSpec | None) -> list[str]:
    """`model`, `data` and `stages` must not change once the run started. The CRD's CEL
    rejects such edits at admission; without the CRD the operator marks the run Invalid."""
    if before is None:
        return []
    out = []
    for field in IMMUTABLE:
        if getattr(spec, field) != getattr(before, field):
            out.append(f"spec.{field}: is immutable once created; a changed recipe is a new run")
    return out


# ---------------------------------------------------------------------------- status


def clean_status(raw: Any) -> dict:
    """The status fields we understand, each kept only if it is valid on its own."""
    if not isinstance(raw, dict):
        return {}
    fields = s.VLMPretrainRunStatus.model_fields
    aliases = {f.alias or name for name, f in fields.items()}
    out = {}
    for key, value in raw.items():
        if key not in aliases or value is None:
            continue
        try:
            out.update(s.VLMPretrainRunStatus.model_validate({key: value}).dump())
        except ValidationError:
            continue
    return out


def status_patch(old: dict, new: dict) -> dict:
    """A merge patch from old to new status (top-level keys; removed keys become null)."""
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch


def _normalize(status: dict) -> dict:
    return s.VLMPretrainRunStatus.model_validate(status).dump()


def condition(status: dict, ctype: str) -> dict:
    for c in status.get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == ctype:
            return c
    return {}


# ---------------------------------------------------------------------------- decide


class RenderFailed(Exception):
    """The spec passed validation but its children cannot be rendered."""


def _render(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except (ValueError, KeyError, TypeError) as exc:
        raise RenderFailed(str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}") from exc


def decide(run: dict, problems: list[str], obs: Observed, now: datetime.datetime, cfg: Config | None = None) -> Decision:
    """The decision for one run. A spec whose children cannot be rendered makes the run
    Invalid with the renderer's reason (a permanent verdict), never an error to retry."""
    try:
        return _decide(run, problems, obs, now, cfg)
    except RenderFailed as exc:
        from vlm_api.validate import clean

        return _decide(run, [clean(f"spec: cannot be rendered into Kubernetes objects: {exc}")], obs, now, cfg)


def _decide(run: dict, problems: list[str], obs: Observed, now: datetime.datetime, cfg: Config | None = None) -> Decision:
    cfg = cfg or config.CONFIG
    meta = run.get("metadata") or {}
    gen = meta.get("generation") if isinstance(meta.get("generation"), int) else None
    ns = meta.get("namespace") or "default"
    name = meta.get("name") or ""
    old = clean_status(run.get("status"))
    new = dict(old)
    if gen is not None:
        new["observedGeneration"] = gen
    new.setdefault("startTime", st.fmt_time(now))
    events: list[tuple[str, str, str]] = []
    rendezvous: list[st.Cond] = []  # RendezvousReady, once the spec asks for an external store

    def ended_stores(order: list[str] | None) -> list[tuple[str, str, str]]:
        """Stores of ended attempts and stages go: those before the current (stage, attempt)
        in `order` (the step names), all of them when the run is over (`order` None). A store
        of a later attempt or stage stays: status may lag behind children after a crash."""
        def ended(stage: str, attempt: int) -> bool:
            if order is None or stage not in order:
                return True
            return (order.index(stage), attempt) < (order.index(new["stage"]), new["attempt"])
        return [(kind, ns, d) for d, stage, attempt in sorted(obs.stores) if ended(stage, attempt)
                for kind in render.STORE_KINDS]

    def finish(view: st.View, **kw: Any) -> Decision:
        new["phase"] = view.phase
        new["conditions"] = view.conditions(old.get("conditions"), gen, now)
        live = view.phase not in st.TERMINAL and spec is not None and new.get("stage") and isinstance(new.get("attempt"), int)
        kw.setdefault("delete", ended_stores([x.name for x in stage_policy.steps(spec)] if live else None))
        created_store = next((o for o in kw.get("create") or () if o["kind"] == "Deployment"), None)
        if rendezvous and obs.store is None and created_store is not None:
            # created just now: "not ready yet", as its first watch event will say
            rendezvous[0] = st.rendezvous_ready(created_store)
        if rendezvous and view.phase not in st.TERMINAL:
            new["conditions"].append(st.extra_condition("RendezvousReady", rendezvous[0], old.get("conditions"), gen, now))
        return Decision(_normalize(new), events=events, **kw)

    if old.get("phase") in st.TERMINAL:
        # A finished run stays finished: later edits (even invalid ones) change nothing.
        if old.get("conditions"):
            return Decision(_normalize(new), delete=ended_stores(None))
        if old["phase"] == "Succeeded":
            stages = run.get("spec", {}).get("stages") if isinstance(run.get("spec"), dict) else None
            return finish(st.succeeded(len(stages) if isinstance(stages, list) else 0))
        return finish(st.failed(st.JobState("Failed", "Unknown"), job=old.get("jobName", ""), retries=old.get("attempt", 0)))

    spec: s.VLMPretrainRunSpec | None = None
    if not problems:
        try:
            spec = s.VLMPretrainRunSpec.model_validate(run.get("spec"))
        except ValidationError as exc:
            from vlm_api.validate import clean

            problems = [clean(f"spec: {e['msg']}") for e in exc.errors(include_input=False)[:5]]
    if problems or spec is None:
        msg = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        msg = msg or "spec: invalid"
        if old.get("phase") != "Invalid" or old.get("observedGeneration") != gen:
            events.append(("Warning", "InvalidSpec", msg))
        return finish(st.invalid(msg), invalid=msg, delete=[])

    nstages = len(spec.stages)
    plan = stage_policy.steps(spec)  # each stage, and a pruning step after a stage that prunes
    pos = step_position(plan, old)
    step = plan[pos]
    idx, stage = step.stage, spec.stages[step.stage]
    if spec.elastic.external_store and not step.prune:  # a pruning step is one process: no rendezvous
        rendezvous.append(st.rendezvous_ready(obs.store))
    attempt = old.get("attempt") if isinstance(old.get("attempt"), int) and old["attempt"] >= 0 else 0
    job = render.job_name(name, step.name, attempt)
    new.update(stage=step.name, stageIndex=idx, attempt=attempt, jobName=job)
    finals = dict(old.get("finalCheckpoints") or {})
    prefix = stage_policy.stage_prefix(spec, step.name)
    if obs.sample is not None and obs.sample.job == job:
        scrape.apply(new, obs.sample, step.name, prefix)
    if isinstance(new.get("worldSize"), int) and new["worldSize"] > 0:  # nodes in the rendezvous, not requested
        new["nodes"] = -(-new["worldSize"] // spec.resources.procs_per_node)
    else:
        new.pop("nodes", None)
    note = f"metrics: {obs.scrape_error}" if obs.scrape_error and not step.prune else ""

    def view_for(js: st.JobState, att: int, job_name: str, stage_name: str) -> st.View:
        # A Kueue-managed job is suspended until Kueue admits it, and again when it evicts it.
        held = js.state in ("Absent", "Suspended") or bool(day2.get_path(obs.job, *day2.SUSPEND_PATH))
        return st.for_job(js, suspend=spec.suspend, stage=stage_name, attempt=att, job=job_name, note=note,
                          queue=spec.scheduling.queue_name, held=held)

    if not obs.pytorchjob_crd:
        msg = "the PyTorchJob CRD (pytorchjobs.kubeflow.org/v1) is not installed: install the Kubeflow Training Operator"
        if condition(old, "Degraded").get("reason") != "PyTorchJobCRDMissing":
            events.append(("Warning", "PyTorchJobCRDMissing", msg))
        return finish(st.crd_missing(msg), wait=cfg.crd_retry, wait_reason="PyTorchJob CRD missing", delete=[])

    js = st.job_state(obs.job)
    where = pipeline.describe_step(spec, step)

    if js.state == "Absent":
        created = _render(pipeline.children, run, spec, step, attempt, finals, podmonitor=obs.podmonitor_crd,
                                    metrics_namespaces=cfg.metrics_sources)
        if old.get("jobName") != job:
            start = stage_policy.step_input(spec, step, finals)
            events.append(("Normal", "StageStarted", f"{where}: created {job}" + (f", initialised from {start}" if start else "")))
        return finish(view_for(js, attempt, job, step.name), create=created)

    if js.state == "Succeeded" and obs.confirmation is not None:
        finals[step.name] = pipeline.final_record(obs.confirmation, st.fmt_time(now))
        new["finalCheckpoints"] = finals
        # The trainer's own figures of the stage's end, whatever the last scrape caught.
        new.update(step=obs.confirmation["step"], tokens=obs.confirmation["tokens"],
                   lastCheckpoint={k: finals[step.name][k] for k in ("uri", "step", "time", "stage")})
        events.append(("Normal", "StageSucceeded", f"{where} succeeded ({job}); final checkpoint {finals[step.name]['uri']} "
                       f"(step {finals[step.name]['step']}, confirmed by the trainer)"))
        if pos + 1 < len(plan):
            nxt = plan[pos + 1]
            nxt_job = render.job_name(name, nxt.name, 0)
            for key in ("step", "tokens", "loss", "imageTokenFraction", "worldSize", "restarts", "nodes"):
                new.pop(key, None)
            new.update(stage=nxt.name, stageIndex=nxt.stage, attempt=0, jobName=nxt_job)
            created = _render(pipeline.children, run, spec, nxt, 0, finals, podmonitor=obs.podmonitor_crd,
                                        metrics_namespaces=cfg.metrics_sources)
            start = stage_policy.step_input(spec, nxt, finals)
            events.append(("Normal", "StageStarted", f"{pipeline.describe_step(spec, nxt)}: created {nxt_job}, "
                           f"initialised from {start}"))
            return finish(view_for(st.JobState("Absent"), 0, nxt_job, nxt.name), create=created)
        new["completionTime"] = st.fmt_time(now)
        events.append(("Normal", "RunSucceeded", f"all {nstages} stages succeeded"))
        return finish(st.succeeded(nstages))

    if js.state in ("Failed", "Succeeded"):  # Succeeded here: no pod confirmed the final checkpoint
        reason, what = st.attempt_failure(js, job)
        if attempt < spec.max_retries:
            degraded = condition(old, "Degraded")
            reported = degraded.get("reason") == reason and job in str(degraded.get("message"))
            # Backoff counts from the failure as precisely as known: when this process saw it,
            # else the job's condition time, else our own Degraded condition (after a restart).
            failed_at = obs.failed_seen or st.parse_time(js.since)
            if failed_at is None and reported:
                failed_at = st.parse_time(degraded.get("lastTransitionTime"))
            failed_at = min(failed_at or now, now)
            delay = stage_policy.retry_delay(attempt, cfg.retry_backoff, cfg.retry_backoff_max)
            remaining = delay - (now - failed_at).total_seconds()
            if remaining > 0:
                retry_at = st.fmt_time(failed_at + datetime.timedelta(seconds=delay))
                if not reported:
                    events.append(("Warning", reason, f"{what}; retry {attempt + 1} of {spec.max_retries} at {retry_at}"))
                return finish(st.backoff(js, job=job, attempt=attempt, max_retries=spec.max_retries, at=retry_at),
                              wait=remaining, wait_reason=f"retry backoff after {job} failed")
            nxt_attempt = attempt + 1
            nxt_job = render.job_name(name, step.name, nxt_attempt)
            new.update(attempt=nxt_attempt, jobName=nxt_job)
            created = _render(pipeline.children, run, spec, step, nxt_attempt, finals, podmonitor=obs.podmonitor_crd,
                                        metrics_namespaces=cfg.metrics_sources)
            resume = (stage_policy.step_input(spec, step, finals) if step.prune else stage_policy.resume_point(
                spec, stage.name, new.get("lastCheckpoint"), stage_policy.init_from(spec, idx, finals)))
            events.append(("Warning", "StageRetry", f"{job} ended without a confirmed final checkpoint ({reason}); "
                           f"retry {nxt_attempt} of {spec.max_retries} as {nxt_job}, resuming from {resume}"))
            return finish(view_for(st.JobState("Absent"), nxt_attempt, nxt_job, step.name), create=created)
        view = st.failed(js, job=job, retries=attempt)
        events.append(("Warning", "RunFailed", view.ready.message))
        return finish(view)

    # The job is live: bring it (and the stage config) to the current spec.
    patches: list[tuple[str, str, str, dict]] = []
    if obs.check_drift and obs.job is not None and not step.prune:
        desired = _render(render.build_pytorchjob, pipeline.run_ref(run), spec, stage.name, attempt)
        jp = day2.job_patch(obs.job, desired)
        if jp:
            patches.append(("PyTorchJob", ns, job, jp))
            events.extend(("Normal", reason, f"{job}: {message}") for reason, message in day2.describe(jp, desired))
        if obs.configmap is not None:
            want = _render(render.build_configmap, pipeline.run_ref(run), spec, stage.name,
                           stage_policy.init_from(spec, idx, finals))
            cp = day2.configmap_patch(obs.configmap, want)
            if cp:
                cm = want["metadata"]["name"]
                patches.append(("ConfigMap", ns, cm, cp))
                events.append(("Normal", "ConfigUpdated", f"{cm}: trainer config follows the spec (e.g. checkpoint.keep)"))
    wp = day2.workload_patch(obs.workload, spec.suspend) if spec.scheduling.queue_name else None
    if wp:
        wl = obs.workload["metadata"]["name"]
        patches.append(("Workload", ns, wl, wp))
        events.append(("Normal", "Suspended" if spec.suspend else "Resumed",
                       f"{job}: Kueue Workload {wl} {'deactivated' if spec.suspend else 'reactivated'}"))
    return finish(view_for(js, attempt, job, step.name), patch=patches)


def step_position(plan: list[stage_policy.Step], status: dict) -> int:
    """The current step of `plan`: status.stage names it (a stage or a pruning step), else
    status.stageIndex's stage, else the first step."""
    names = [p.name for p in plan]
    if status.get("stage") in names:
        return names.index(status["stage"])
    idx = status.get("stageIndex")
    return next((k for k, p in enumerate(plan) if p.stage == idx and not p.prune), 0)


def blocked(run: dict, reason: str, message: str, now: datetime.datetime, cfg: Config | None = None) -> Decision:
    """The API server refused a write that retrying as-is will not fix by itself (422 from
    validation or a webhook, 403 from RBAC): say so in status and an Event, retry later."""
    cfg = cfg or config.CONFIG
    meta = run.get("metadata") or {}
    gen = meta.get("generation") if isinstance(meta.get("generation"), int) else None
    old = clean_status(run.get("status"))
    new = dict(old)
    if gen is not None:
        new["observedGeneration"] = gen
    new.setdefault("startTime", st.fmt_time(now))
    events = []
    if condition(old, "Degraded").get("reason") != reason:
        events.append(("Warning", reason, message))
    view = st.View(old.get("phase") if old.get("phase") in ("Pending", "Running", "Suspended") else "Pending",
                   st.Cond("False", reason, message),
                   st.Cond("False", "Retrying", f"retrying every {cfg.api_retry:g}s"),
                   st.Cond("True", reason, message))
    new["phase"] = view.phase
    new["conditions"] = view.conditions(old.get("conditions"), gen, now)
    return Decision(_normalize(new), events=events, wait=cfg.api_retry, wait_reason=message)

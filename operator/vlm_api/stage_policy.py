"""The one stage policy: which stage runs, from which checkpoint, and what makes it done.

Pure (no I/O). The operator (`vlm_operator/core.py`), the local runner
(`vlm_local/runner.py`) and the trainer (`vlm_trainer/train.py`) all decide with these
functions, so "is this stage final?" has one answer:

- Stages run in order. Stage k > 0 starts from stage k-1's *confirmed* final checkpoint
  (`init_from`); a stage with committed checkpoints of its own resumes the newest one.
- A stage is done when its final checkpoint is committed (manifest `final: true`) and the
  trainer confirmed it: global rank 0 writes a `Confirmation` as the container's
  termination message. Exit codes of replicas say nothing about completion (a lost
  replica exits non-zero while the survivors finish the stage).
- A failed attempt is retried as a new attempt (own job, own rendezvous), at most
  `spec.maxRetries` times, after a backoff of `retryBackoff * 2**attempt` seconds (capped).
- A stage that declares `prune` is followed by a step of its own, `<stage>-pruned`
  (`steps`): one process prunes the stage's confirmed final checkpoint into
  `<checkpoint.uri>/<stage>-pruned/` and confirms it like a stage; the next stage starts
  from that confirmed pruned checkpoint. Nothing else rewrites the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from . import schema as s

# Kubernetes' default `terminationMessagePath`; the kubelet keeps at most 4096 bytes of it.
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "VLM_TERMINATION_LOG"
MAX_CONFIRMATION_BYTES = 4096


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after the failure of attempt `attempt` (0-based) before the next."""
    return float(min(cap, base * (2 ** min(max(attempt, 0), 30))))


def stage_prefix(spec: s.VLMPretrainRunSpec, stage: str) -> str:
    return f"{spec.checkpoint.uri.rstrip('/')}/{stage}/"


def is_final(stage: s.Stage, step: int, final_flag: bool) -> bool:
    """A committed checkpoint ends its stage when its manifest says so, or (for a stage
    stated in steps) when it is at or past the stage's last step."""
    return bool(final_flag) or (stage.steps is not None and step >= stage.steps)


PRUNED_SUFFIX = "-pruned"  # the schema reserves it: no stage name ends in it


def pruned_name(stage: str) -> str:
    """The pruning step after `stage`, and its checkpoint prefix under `checkpoint.uri`."""
    return f"{stage}{PRUNED_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a run: a stage's training, or the pruning after it."""

    name: str    # the stage's name, or `<stage>-pruned`
    stage: int   # index into spec.stages
    prune: bool = False


def steps(spec: s.VLMPretrainRunSpec) -> list[Step]:
    """The steps of a run in order: each stage, then its pruning step when it declares `prune`."""
    out = []
    for i, stage in enumerate(spec.stages):
        out.append(Step(stage.name, i))
        if stage.prune is not None:
            out.append(Step(pruned_name(stage.name), i, prune=True))
    return out


def output_step(stage: s.Stage) -> str:
    """The step whose confirmed checkpoint is what `stage` hands to the next stage."""
    return pruned_name(stage.name) if stage.prune is not None else stage.name


def init_from(spec: s.VLMPretrainRunSpec, index: int, finals: dict | None) -> str | None:
    """The checkpoint stage `index` starts from when it has none of its own: the previous
    stage's output confirmed (its pruning step's when it prunes; None for the first stage,
    or while unconfirmed)."""
    if index <= 0:
        return None
    ref = (finals or {}).get(output_step(spec.stages[index - 1]))
    if isinstance(ref, dict) and isinstance(ref.get("uri"), str) and ref["uri"]:
        return ref["uri"]
    return None


def step_input(spec: s.VLMPretrainRunSpec, step: Step, finals: dict | None) -> str | None:
    """What a step starts from: a stage's `init_from`; a pruning step's, the confirmed final
    checkpoint of the stage it prunes (None while unconfirmed)."""
    if not step.prune:
        return init_from(spec, step.stage, finals)
    ref = (finals or {}).get(spec.stages[step.stage].name)
    if isinstance(ref, dict) and isinstance(ref.get("uri"), str) and ref["uri"]:
        return ref["uri"]
    return None


def resume_point(spec: s.VLMPretrainRunSpec, stage: str, last: dict | None, start: str | None) -> str:
    """Human-readable: where a retried attempt continues from."""
    if isinstance(last, dict) and last.get("stage") == stage and last.get("uri"):
        return f"{last['uri']} (step {last.get('step')})"
    return f"the newest committed checkpoint under {stage_prefix(spec, stage)}" + (
        f", else {start}" if start else ", else from scratch"
    )


def rdzv_id(run_uid: str, stage: str, attempt: int) -> str:
    """One rendezvous per attempt: a retry never meets a rendezvous its predecessor closed."""
    return f"{run_uid}-{stage}-a{attempt}"


# ---------------------------------------------------------------------------- confirmation


def _round(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return round(v, 6) if math.isfinite(v) else None


def confirmation(stage: str, step: int, uri: str, tokens: int, validation_loss: dict | None = None) -> str:
    """The termination message of a finished stage (JSON, at most 4096 bytes): the stage's
    final committed checkpoint and its final validation loss per modality."""
    body: dict[str, Any] = {"stage": stage, "step": int(step), "uri": uri, "tokens": int(tokens)}
    losses = {str(k): _round(v) for k, v in (validation_loss or {}).items()}
    losses = {k: v for k, v in sorted(losses.items()) if v is not None}
    if losses:
        body["validationLoss"] = losses
    text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > MAX_CONFIRMATION_BYTES:  # the losses are the optional part
        body.pop("validationLoss", None)
        text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > MAX_CONFIRMATION_BYTES:
        raise ValueError(f"checkpoint URI too long for a termination message ({len(uri)} characters)")
    return text


def parse_confirmation(text: Any, stage: str) -> dict | None:
    """A termination message that confirms `stage`'s final checkpoint, as
    {stage, step, uri, tokens[, validationLoss]}; None for anything else (a crash's log
    tail, another stage, a malformed or foreign message)."""
    if not isinstance(text, str) or not text.strip().startswith("{"):
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("stage") != stage:
        return None
    step, tokens, uri = body.get("step"), body.get("tokens"), body.get("uri")
    if not (isinstance(step, int) and step >= 0 and isinstance(tokens, int) and tokens >= 0):
        return None
    if not (isinstance(uri, str) and uri):
        return None
    out: dict[str, Any] = {"stage": stage, "step": step, "uri": uri, "tokens": tokens}
    losses = body.get("validationLoss")
    if isinstance(losses, dict):
        clean = {str(k): v for k, v in ((k, _round(v)) for k, v in losses.items()) if v is not None}
        if clean:
            out["validationLoss"] = clean
    return out


def confirmed_final(messages: list[Any], stage: str) -> dict | None:
    """Of the termination messages of a stage's pods (or local replicas), the confirmation
    with the highest step; None when no replica confirmed the stage."""
    found = [c for c in (parse_confirmation(m, stage) for m in messages) if c is not None]
    return max(found, key=lambda c: c["step"]) if found else None

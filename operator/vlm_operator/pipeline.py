"""Pure stage-pipeline rules: which stage and attempt runs, from which checkpoint, when to retry.

- Stages run in order, each as its own PyTorchJob `<run>-<stage>`; a failed job is
  replaced by `<run>-<stage>-r<N>` (N = attempt), at most `spec.maxRetries` times, after a
  backoff of `retryBackoff * 2**attempt` seconds (capped) counted from the job's failure.
- A retry needs no special config: the trainer resumes from the newest *committed*
  checkpoint under `<checkpoint.uri>/<stage>/` (the ConfigMap is per stage, shared by all
  attempts); the operator records which checkpoint that is in status and the Event.
- The next stage starts from the previous stage's final checkpoint (`init_from`): the exact
  URI when the operator saw it committed (the last scraped checkpoint is at the stage's
  final step), else the stage prefix `<checkpoint.uri>/<stage>/`, where the trainer picks
  the newest committed checkpoint whose manifest says `final: true`.
"""

from __future__ import annotations

from typing import Any

from vlm_api import render, schema as s


def retry_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait after the failure of attempt `attempt` (0-based) before the next."""
    return float(min(cap, base * (2 ** min(max(attempt, 0), 30))))


def stage_prefix(spec: s.VLMPretrainRunSpec, stage: str) -> str:
    return f"{spec.checkpoint.uri.rstrip('/')}/{stage}/"


def final_checkpoint(spec: s.VLMPretrainRunSpec, stage: s.Stage, last: dict | None, when: str) -> dict:
    """What status.finalCheckpoints[stage] records when the stage's job succeeded."""
    if isinstance(last, dict) and last.get("stage") == stage.name and isinstance(last.get("uri"), str):
        step = last.get("step")
        exact = last["uri"] != stage_prefix(spec, stage.name)
        if exact and isinstance(step, int) and stage.steps is not None and step >= stage.steps:
            return {"uri": last["uri"], "step": step, "time": last.get("time") or when, "stage": stage.name}
        return {"uri": stage_prefix(spec, stage.name), "step": step if isinstance(step, int) else 0,
                "time": when, "stage": stage.name}
    return {"uri": stage_prefix(spec, stage.name), "step": 0, "time": when, "stage": stage.name}


def init_from(spec: s.VLMPretrainRunSpec, index: int, finals: dict | None) -> str | None:
    """The checkpoint stage `index` starts from when it has none of its own."""
    if index <= 0:
        return None
    prev = spec.stages[index - 1].name
    ref = (finals or {}).get(prev)
    if isinstance(ref, dict) and isinstance(ref.get("uri"), str) and ref["uri"]:
        return ref["uri"]
    return stage_prefix(spec, prev)


def resume_point(spec: s.VLMPretrainRunSpec, stage: str, last: dict | None, start: str | None) -> str:
    """Human-readable: where a retried attempt continues from."""
    if isinstance(last, dict) and last.get("stage") == stage and last.get("uri"):
        return f"{last['uri']} (step {last.get('step')})"
    return f"the newest committed checkpoint under {stage_prefix(spec, stage)}" + (
        f", else {start}" if start else ", else from scratch"
    )


def run_ref(run: dict) -> dict[str, str]:
    meta = run.get("metadata") or {}
    return {"name": meta.get("name", ""), "namespace": meta.get("namespace") or "default", "uid": meta.get("uid") or ""}


def children(run: dict, spec: s.VLMPretrainRunSpec, index: int, attempt: int, finals: dict | None,
             *, podmonitor: bool) -> list[dict[str, Any]]:
    """All objects of one stage attempt, in creation order (generic: the renderer decides
    what a stage needs, e.g. a rendezvous store Deployment + Service)."""
    stage = spec.stages[index].name
    return render.build_children(
        run_ref(run), spec, stage, attempt=attempt, init_from=init_from(spec, index, finals),
        podmonitor=bool(spec.metrics.pod_monitor and podmonitor),
    )

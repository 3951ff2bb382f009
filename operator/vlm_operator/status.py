"""Pure status logic: PyTorchJob conditions -> the run's phase and conditions.

A Kubeflow PyTorchJob reports `status.conditions` of types Created, Running, Restarting,
Succeeded, Failed and Suspended; several can be True at once (Created stays True), so the
job's state is the first True one in `JOB_PRECEDENCE`. Note the elastic quirk: one Worker
exiting 0 marks the whole job Succeeded. The trainer makes that trustworthy by exiting 0
only after the stage-final checkpoint is committed (and non-zero on any other end).

The run reports three standard condition types, each with reason, message,
lastTransitionTime (kept while the status does not change) and observedGeneration:
- Ready: the run is doing (or has done) what was asked;
- Progressing: training is moving forward (or about to), with a scrape note when metrics
  could not be read (a scrape failure changes nothing else);
- Degraded: something needs attention (invalid spec, failed job, missing CRD, restarts).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended", "Invalid")
TERMINAL = ("Succeeded", "Failed")
JOB_PRECEDENCE = ("Succeeded", "Failed", "Suspended", "Restarting", "Running", "Created")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")


@dataclasses.dataclass(frozen=True)
class JobState:
    """Where one PyTorchJob is, from its conditions."""

    state: str  # Absent | Pending | Created | Running | Restarting | Suspended | Succeeded | Failed
    reason: str = ""
    message: str = ""
    since: str | None = None  # lastTransitionTime of the deciding condition

    @property
    def finished(self) -> bool:
        return self.state in ("Succeeded", "Failed")


def job_state(job: dict | None) -> JobState:
    if job is None:
        return JobState("Absent")
    conds = ((job.get("status") or {}).get("conditions")) or []
    true = {}
    for c in conds:
        if isinstance(c, dict) and str(c.get("status")) == "True" and c.get("type") in JOB_PRECEDENCE:
            true[c["type"]] = c
    for kind in JOB_PRECEDENCE:
        if kind in true:
            c = true[kind]
            return JobState(
                kind,
                str(c.get("reason") or ""),
                str(c.get("message") or ""),
                c.get("lastTransitionTime") or c.get("lastUpdateTime"),
            )
    return JobState("Pending")


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        out = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return out if out.tzinfo else out.replace(tzinfo=datetime.timezone.utc)


def fmt_time(when: datetime.datetime) -> str:
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Cond:
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


@dataclasses.dataclass(frozen=True)
class View:
    """What the run should say about itself: a phase and its three conditions."""

    phase: str
    ready: Cond
    progressing: Cond
    degraded: Cond = Cond("False", "AsExpected", "")

    def conditions(self, previous: list | None, generation: int | None, now: datetime.datetime) -> list[dict]:
        prev = {c.get("type"): c for c in (previous or []) if isinstance(c, dict)}
        out = []
        for ctype, cond in zip(CONDITION_TYPES, (self.ready, self.progressing, self.degraded)):
            old = prev.get(ctype) or {}
            since = old.get("lastTransitionTime") if old.get("status") == cond.status else None
            entry = {
                "type": ctype,
                "status": cond.status,
                "reason": cond.reason,
                "message": cond.message[:1024],
                "lastTransitionTime": since or fmt_time(now),
            }
            if generation is not None:
                entry["observedGeneration"] = generation
            out.append(entry)
        return out


def extra_condition(ctype: str, cond: Cond, previous: list | None, generation: int | None,
                    now: datetime.datetime) -> dict:
    """One condition beyond the three of a View (e.g. RendezvousReady), same bookkeeping."""
    old = next((c for c in (previous or []) if isinstance(c, dict) and c.get("type") == ctype), {})
    since = old.get("lastTransitionTime") if old.get("status") == cond.status else None
    entry = {"type": ctype, "status": cond.status, "reason": cond.reason, "message": cond.message[:1024],
             "lastTransitionTime": since or fmt_time(now)}
    if generation is not None:
        entry["observedGeneration"] = generation
    return entry


def rendezvous_ready(deployment: dict | None) -> Cond:
    """RendezvousReady from the store Deployment's ``status.readyReplicas``."""
    if not isinstance(deployment, dict):
        return Cond("False", "StoreAbsent", "the rendezvous store Deployment does not exist (yet)")
    name = (deployment.get("metadata") or {}).get("name", "")
    ready = (deployment.get("status") or {}).get("readyReplicas")
    if isinstance(ready, int) and ready >= 1:
        return Cond("True", "StoreReady", f"rendezvous store {name} ready")
    return Cond("False", "StoreNotReady", f"rendezvous store {name}: no ready replica (agents cannot rendezvous)")


def invalid(message: str) -> View:
    return View(
        "Invalid",
        Cond("False", "InvalidSpec", message),
        Cond("False", "InvalidSpec", "fix the spec; nothing runs until it is valid"),
        Cond("True", "InvalidSpec", message),
    )


def crd_missing(message: str) -> View:
    return View(
        "Pending",
        Cond("False", "PyTorchJobCRDMissing", message),
        Cond("False", "WaitingForCRD", "retrying until the PyTorchJob CRD is installed"),
        Cond("True", "PyTorchJobCRDMissing", message),
    )


def for_job(js: JobState, *, suspend: bool, stage: str, attempt: int, job: str, note: str = "",
            queue: str | None = None, held: bool = False) -> View:
    """The view while a stage job is live (not finished). `queue`: the run's Kueue
    LocalQueue; `held`: its job is suspended, so Kueue has not admitted it (or evicted it)."""
    where = f"stage {stage}, job {job}" + (f" (attempt {attempt + 1})" if attempt else "")
    suffix = f"; {note}" if note else ""
    if suspend:
        return View(
            "Suspended",
            Cond("False", "Suspended", f"suspended by spec.suspend: {where}"),
            Cond("False", "Suspended", f"resumes from the last committed checkpoint when spec.suspend is false{suffix}"),
        )
    if queue and held:
        msg = f"{where}: queued in Kueue LocalQueue {queue}, waiting for admission (quota)"
        return View("Pending", Cond("False", QUEUED, msg), Cond("True", QUEUED, f"{msg}{suffix}"))
    if js.state == "Suspended":  # spec says resume; the controller has not picked it up yet
        return View("Pending", Cond("False", "Resuming", f"resuming {where}"), Cond("True", "Resuming", f"{where}{suffix}"))
    if js.state == "Restarting":
        return View(
            "Running",
            Cond("True", "Running", f"{where}"),
            Cond("True", "JobRestarting", f"{where}: pods restarting{suffix}"),
            Cond("True", "JobRestarting", js.message or "the job is restarting pods"),
        )
    if js.state == "Running":
        return View("Running", Cond("True", "Running", where), Cond("True", "Training", f"{where}{suffix}"))
    # Absent (just created), Pending or Created: waiting for pods.
    return View("Pending", Cond("False", "JobPending", f"waiting for pods: {where}"), Cond("True", "JobCreated", f"{where}{suffix}"))


def attempt_failure(js: JobState, job: str) -> tuple[str, str]:
    """(reason, message) of an attempt that ended without a confirmed final checkpoint."""
    if js.state == "Succeeded":
        return UNCONFIRMED, (f"job {job} succeeded but no pod confirmed the stage's final checkpoint "
                             "(the termination message of global rank 0)")
    return "JobFailed", f"job {job} failed ({js.reason or 'Failed'}: {js.message or 'no message'})"


UNCONFIRMED = "FinalCheckpointUnconfirmed"
QUEUED = "QueuedByKueue"


def backoff(js: JobState, *, job: str, attempt: int, max_retries: int, at: str) -> View:
    reason, msg = attempt_failure(js, job)
    return View(
        "Pending",
        Cond("False", reason, msg),
        Cond("True", "RetryBackoff", f"retry {attempt + 1} of {max_retries} at {at}, resuming from the last committed checkpoint"),
        Cond("True", reason, msg),
    )


def failed(js: JobState, *, job: str, retries: int) -> View:
    reason, msg = attempt_failure(js, job)
    msg = f"{msg} after {retries} retr{'y' if retries == 1 else 'ies'}"
    return View("Failed", Cond("False", "RetriesExhausted", msg), Cond("False", "RetriesExhausted", msg), Cond("True", reason, msg))


def succeeded(stages: int) -> View:
    msg = f"all {stages} stage{'s' if stages != 1 else ''} succeeded"
    return View("Succeeded", Cond("True", "Succeeded", msg), Cond("False", "Completed", msg))

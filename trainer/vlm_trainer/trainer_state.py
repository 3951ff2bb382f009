"""The trainer's own state beyond model and optimizer tensors, as a checkpoint carries it
(the ``trainer`` component, `vlm_trainer/checkpoint/state.py`): progress counters, data
positions, the LR schedule, the seed. Small, picklable and identical on every rank."""

from __future__ import annotations

import dataclasses
import logging

from .schedule import LRSchedule

log = logging.getLogger("vlm_trainer")


@dataclasses.dataclass
class Progress:
    step: int = 0  # completed optimizer steps in this stage
    global_step_offset: int = 0  # steps of earlier stages whose schedule this one continues
    text_tokens: int = 0
    image_tokens: int = 0
    skipped_samples: int = 0

    @property
    def global_step(self) -> int:
        return self.global_step_offset + self.step

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.image_tokens


class TrainerState:
    """The trainer's small state as a DCP ``Stateful``; ``load_init_state_dict`` starts a new
    stage from a previous stage's state."""

    def __init__(self, trainer):
        self.t = trainer

    def state_dict(self) -> dict:
        t = self.t
        return {
            "format": "vlm-trainer/1",
            "stage": t.stage.name,
            "step": t.progress.step,
            "global_step_offset": t.progress.global_step_offset,
            "text_tokens": t.progress.text_tokens,
            "image_tokens": t.progress.image_tokens,
            "skipped_samples": t.progress.skipped_samples,
            "data": t.planner.state_dict(),
            "schedule": t.schedule.state_dict(),
            "rng": {"scheme": "reseed(seed, global_step, rank)", "seed": t.seed},
            "world_size": t.ctx.world_size,
            "total_steps": t.total_steps,
        }

    def _check_seed(self, state: dict) -> None:
        if state.get("rng", {}).get("seed", self.t.seed) != self.t.seed:
            log.warning("checkpoint seed %s differs from spec.seed %s", state["rng"]["seed"], self.t.seed)

    def load_state_dict(self, state: dict) -> None:
        """The same stage continues exactly."""
        t = self.t
        self._check_seed(state)
        if state.get("stage") not in (None, t.stage.name):
            raise ValueError(f"checkpoint of stage {state.get('stage')!r} cannot resume stage {t.stage.name!r}")
        t.progress = Progress(step=int(state["step"]), global_step_offset=int(state.get("global_step_offset", 0)),
                              text_tokens=int(state.get("text_tokens", 0)), image_tokens=int(state.get("image_tokens", 0)),
                              skipped_samples=int(state.get("skipped_samples", 0)))
        t.planner.load_state_dict(state["data"])
        if int(state.get("total_steps", t.total_steps)) != t.total_steps:
            log.warning("checkpoint planned %s steps, this stage now has %d", state.get("total_steps"), t.total_steps)
        if t.stage.optimizer.continue_schedule and state["schedule"].get("continued"):
            t.schedule = LRSchedule(t.stage.optimizer, t.total_steps, start_lr=state["schedule"]["peak"])
        t.schedule.load_state_dict(state["schedule"])

    def load_init_state_dict(self, state: dict) -> None:
        """Data positions carry over; with ``continueSchedule`` the schedule continues from the
        previous last lr and the global step count goes on."""
        t = self.t
        self._check_seed(state)
        t.planner.load_state_dict(state["data"], positions_only=True)
        if t.stage.optimizer.continue_schedule:
            prev = int(state.get("global_step_offset", 0)) + int(state.get("step", 0))
            t.progress = Progress(global_step_offset=prev)
            t.schedule = LRSchedule(t.stage.optimizer, t.total_steps, start_lr=state["schedule"]["last_lr"])

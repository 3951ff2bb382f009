"""The trainer's checkpoint seam (``restore`` / ``after_step`` / ``finalize`` / ``on_stop`` /
``close``, see ``vlm_trainer.train.Checkpointer``) over a :class:`CheckpointManager`."""

from __future__ import annotations

import logging
from typing import Optional

import yaml

from .errors import CheckpointError
from .manager import CheckpointManager
from .restore import Restored
from .settings import CheckpointSettings, SaveOutcome
from .state import TrainState

log = logging.getLogger(__name__)


def config_yaml(cfg) -> str:
    """A TrainerConfig as the YAML a checkpoint carries (``layout.CONFIG_NAME``): what
    analysis, pruning, grounding and export need to rebuild the model from the URI alone."""
    return yaml.safe_dump(cfg.model_dump(by_alias=True, exclude_none=True, mode="json"), sort_keys=False)


class TrainerCheckpointer:
    def __init__(self, trainer, *, settings: Optional[CheckpointSettings] = None, store=None):
        cfg = trainer.cfg
        spec = cfg.spec
        idx = spec.stage_index(cfg.stage)
        self.settings = settings or CheckpointSettings.from_spec(
            spec.checkpoint, ctl_timeout_s=float(spec.elastic.process_group_timeout))
        self.manager = CheckpointManager(
            self.settings, stage=cfg.stage, prev_stage=spec.stages[idx - 1].name if idx > 0 else None,
            init_from=cfg.init_from, registry=trainer.metrics.registry, progress=trainer.progress_file,
            store=store, run_name=f"{cfg.run.namespace}-{cfg.run.name}")
        self.config_yaml = config_yaml(cfg)
        self.restored: Optional[Restored] = None
        self.committed: Optional[SaveOutcome] = None  # what finalize committed (or found committed)

    def target(self, trainer) -> TrainState:
        return TrainState(
            module=trainer.par.module, optimizer=trainer.optimizer, extra_state=trainer.extra_state,
            load_extra_state=trainer.load_extra_state,
            continue_schedule=bool(trainer.stage.optimizer.continue_schedule),
            manifest_extra=lambda: {"strategy": trainer.par.strategy, "total_steps": trainer.total_steps,
                                    "tokens": trainer.progress.tokens, "run": trainer.cfg.run.name},
            config_yaml=self.config_yaml)

    def restore(self, trainer) -> None:
        self.restored = self.manager.restore(self.target(trainer))

    def after_step(self, trainer, step: int) -> None:
        if step >= trainer.stop_at:  # finalize writes this one
            return
        self.manager.maybe_save(self.target(trainer), step)

    def finalize(self, trainer) -> bool:
        step = trainer.progress.step
        try:
            self.committed = self.manager.finalize(self.target(trainer), step, final=step >= trainer.total_steps)
            return True
        except CheckpointError as e:
            log.error("%s", e)
            return False

    def committed_checkpoint(self) -> Optional[dict]:
        """{"step", "uri", "final"} of the checkpoint :meth:`finalize` committed: a new save, the
        same step marked final, or the final checkpoint this process resumed (a node that
        joins after the stage ended trains nothing and finds it committed). None before."""
        out = self.committed
        if out is None or not out.ok or not out.uri:
            return None
        return {"step": out.step, "uri": out.uri, "final": out.final}

    def on_stop(self, trainer) -> bool:
        """A signal stopped the run at a step boundary (suspend, preemption, scale-in):
        checkpoint this step synchronously so the restart loses nothing."""
        try:
            self.manager.finalize(self.target(trainer), trainer.progress.step, final=False)
            return True
        except CheckpointError as e:
            log.error("%s", e)
            return False

    def close(self) -> None:
        self.manager.close(wait=False)


def build_checkpointer(trainer) -> TrainerCheckpointer:
    return TrainerCheckpointer(trainer)

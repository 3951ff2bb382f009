"""What a checkpoint holds and how it is copied off the training loop.

What is saved is a dict of DCP ``Stateful`` components (``state_dict()`` /
``load_state_dict()``) the trainer hands the manager: ``model`` (:class:`ModelState`),
``optim`` (:class:`OptimizerState`, optional) and small replicated ones (the trainer's
progress, data positions, schedule, seed: ``trainer_state.TrainerState``). A component
that defines ``load_init_state_dict(state)`` also takes another stage's state when a stage
starts from it (``init``); the others only resume their own stage.

Keys of the one ``torch.distributed.checkpoint`` save (DCP writes ``.metadata`` +
``__<rank>_0.distcp`` per rank):

==================  =====================================================================
``model.<fqn>``     model parameters/buffers from ``get_state_dict`` (canonical FQNs: the
                    same under DDP, FSDP2 or no wrapper, so any of them loads any other,
                    at any world size; FSDP2 saves its shards, DDP one replicated copy)
``optim.state.<fqn>.<k>`` / ``optim.param_groups.<fqn>.<k>``
                    AdamW moments/step and group hyper-parameters, flattened per
                    parameter FQN (``flatten_optimizer_state_dict``), so a stage whose
                    trainable set differs loads the entries of the parameters it has
``<name>``          any other component (``trainer``: step, schedule, data positions,
                    token counts, seed ...), pickled into one bytes blob
``rng_rank<r>``     RNG states of rank r (python ``random``, numpy, torch CPU, CUDA)
==================  =====================================================================
"""

from __future__ import annotations

import io
import random
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from .. import safe_load

MODEL_KEY, OPTIM_KEY = "model", "optim"


class ModelState:
    """The model as trained (DDP / FSDP2 / plain) as a DCP ``Stateful``: canonical FQNs, so
    any wrapper at any world size loads what any other saved."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict, *, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, state, options=StateDictOptions(strict=strict))


class OptimizerState:
    """The optimizer's state flattened per parameter FQN, as a DCP ``Stateful``.
    ``continue_schedule``: a stage that starts from another one also takes its moments."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, continue_schedule: bool = False):
        self.module, self.optimizer, self.continue_schedule = module, optimizer, continue_schedule

    @staticmethod
    def _options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.optimizer, state, options=self._options())


def pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(blob: Any) -> Any:
    """A blob of :func:`pack`: ``torch.load(weights_only=True)`` (safe_load: no code runs)."""
    if isinstance(blob, (bytes, bytearray, io.BytesIO)):
        return safe_load.load_blob(blob)
    return blob


def rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def rng_state() -> dict:
    import numpy as np

    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import numpy as np

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "numpy" in st:
        np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def state_dict(states: dict[str, Stateful], rank: int) -> dict:
    """The state dict of one save (see module doc): the model's and the optimizer's tensors
    as they are, every other component pickled into one blob under its name."""
    sd: dict[str, Any] = {name: st.state_dict() if name in (MODEL_KEY, OPTIM_KEY) else pack(st.state_dict())
                          for name, st in states.items()}
    sd[rng_key(rank)] = pack(rng_state())
    return sd


class Stager:
    """Copies a state dict's tensors into CPU buffers kept across saves (pinned on CUDA;
    DTensors stay DTensors around their copied local shards): a plain vectorised copy into
    memory that is already mapped, the whole of what an async save blocks for."""

    def __init__(self):
        self._buffers = None

    def stage(self, sd: dict) -> dict:
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        cuda = torch.cuda.is_available() and any(
            torch.is_tensor(v) and v.device.type == "cuda" for part in sd.values() if isinstance(part, dict)
            for v in part.values())
        staged = None
        # CPU copies run on one thread: intra-op parallel copies of many tensors stall badly
        # when cores are oversubscribed (0.3 s instead of 2 ms for 25 MB on a busy 2-core box)
        threads = torch.get_num_threads()
        if not cuda and threads > 1:
            torch.set_num_threads(1)
        try:
            if self._buffers is not None:
                try:
                    staged = _copy_state_dict(sd, self._buffers, non_blocking=cuda, type_check=False)
                except Exception:  # noqa: BLE001 - the structure changed: new buffers
                    staged = None
            if staged is None:
                self._buffers = _create_cpu_state_dict(sd, pin_memory=cuda)
                staged = _copy_state_dict(sd, self._buffers, non_blocking=cuda, type_check=False)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        if cuda:
            torch.cuda.synchronize()
        return staged


class AlreadyStaged:
    """DCP ``AsyncStager`` for a state dict that :class:`Stager` copied."""

    should_synchronize_after_execute = False
    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass

"""What a checkpoint holds and how it is copied off the training loop.

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
``trainer``         the trainer's small replicated state (step, schedule, data positions,
                    token counts, seed ...), pickled into one bytes blob
``rng_rank<r>``     RNG states of rank r (python ``random``, numpy, torch CPU, CUDA)
==================  =====================================================================
"""

from __future__ import annotations

import dataclasses
import io
import random
from typing import Any, Callable, Optional

import torch

from .. import safe_load

TRAINER_KEY = "trainer"


@dataclasses.dataclass
class TrainState:
    """The parts of a trainer a checkpoint saves and restores.

    ``module``: the model as trained (DDP / FSDP2 / plain); ``optimizer`` (or None);
    ``extra_state()`` -> small picklable dict identical on all ranks (step, schedule, data
    positions ...); ``load_extra_state(state, mode=...)`` with mode ``resume`` | ``init``;
    ``continue_schedule``: a stage init also loads optimizer moments; ``manifest_extra()``
    -> small JSON-able dict recorded in the COMMITTED manifest; ``config_yaml``: the
    TrainerConfig the checkpoint is written with (stored next to the manifest).
    """

    module: torch.nn.Module
    optimizer: Optional[torch.optim.Optimizer] = None
    extra_state: Optional[Callable[[], dict]] = None
    load_extra_state: Optional[Callable[..., None]] = None
    continue_schedule: bool = False
    manifest_extra: Optional[Callable[[], dict]] = None
    config_yaml: Optional[str] = None


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


def state_dict(target: TrainState, rank: int) -> dict:
    """The state dict of one save (see module doc)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    if target.optimizer is not None:
        msd, osd = get_state_dict(target.module, target.optimizer,
                                  options=StateDictOptions(flatten_optimizer_state_dict=True))
    else:
        msd, osd = get_model_state_dict(target.module), None
    sd: dict[str, Any] = {"model": msd}
    if osd is not None:
        sd["optim"] = osd
    if target.extra_state is not None:
        sd[TRAINER_KEY] = pack(target.extra_state())
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

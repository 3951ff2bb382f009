"""A tiny model, its deterministic training step and exact state comparison, shared by the
checkpoint tests (in-process) and their worker processes (tests/support/ckpt_worker.py)."""

from __future__ import annotations

import os

import torch
from torch import nn

VOCAB, DIM = 64, 32


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self, layers: int = 2, hidden: int = 64, vocab: int = VOCAB, dim: int = DIM):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, hidden) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(strategy: str = "single", *, seed: int = 0, layers: int = 2, hidden: int = 64, frozen: tuple = (),
          lr: float = 1e-2):
    """(module to train, optimizer). ``frozen``: names of parameters (prefixes) not trained."""
    torch.manual_seed(seed)
    model = Tiny(layers=layers, hidden=hidden)
    for name, p in model.named_parameters():
        if any(name.startswith(f) for f in frozen):
            p.requires_grad_(False)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(model)
    elif strategy == "fsdp":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        module = model
    else:
        module = model
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    return module, opt


def batch(step: int, n: int = 8, length: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def train_step(module, opt, step: int) -> float:
    """Same data on every rank: DDP/FSDP averaging of identical gradients is exact, so a
    run's numbers do not depend on the world size."""
    ids = batch(step)
    logits = module(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def full_state(module, opt) -> dict:
    """Full (unsharded) model + flattened optimizer state on rank 0 ({} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    import torch.distributed as dist

    dist_on = dist.is_available() and dist.is_initialized()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=dist_on, flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(module, opt, options=opts)
    if dist_on and dist.get_rank() != 0:
        return {}
    out = {f"model.{k}": v.detach().clone() if torch.is_tensor(v) else v for k, v in msd.items()}
    out.update({f"optim.{k}": v.detach().clone() if torch.is_tensor(v) else v for k, v in osd.items()})
    return out


def diff(a: dict, b: dict, *, keys: str = "") -> list[str]:
    """Differences between two full states (exact), restricted to keys starting with ``keys``."""
    out = []
    ka = {k for k in a if k.startswith(keys)}
    kb = {k for k in b if k.startswith(keys)}
    if ka != kb:
        out.append(f"keys differ: only left {sorted(ka - kb)[:4]}, only right {sorted(kb - ka)[:4]}")
    for k in sorted(ka & kb):
        x, y = a[k], b[k]
        if torch.is_tensor(x) or torch.is_tensor(y):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            if x.shape != y.shape or not torch.equal(x.float(), y.float()):
                out.append(f"{k}: max abs diff {(x.float() - y.float()).abs().max().item() if x.shape == y.shape else 'shape'}")
        elif x != y:
            out.append(f"{k}: {x!r} != {y!r}")
    return out


class SmallState:
    """A stand-in for the trainer's small state (a DCP ``Stateful``), kept in ``box``."""

    def __init__(self):
        self.box: dict = {"step": 0, "data": {"text": 0, "captions": 0}, "loads": []}

    def state_dict(self) -> dict:
        return {"step": self.box["step"], "data": dict(self.box["data"])}

    def load_state_dict(self, state: dict) -> None:
        self.box["loads"].append("resume")
        self.box["step"] = state["step"]
        self.box["data"] = dict(state["data"])

    def load_init_state_dict(self, state: dict) -> None:
        self.box["loads"].append("init")


def states(module, opt, *, continue_schedule: bool = False) -> tuple[dict, dict]:
    """(box of the small state, the checkpointed components: model, optimizer, small state)."""
    from vlm_trainer.checkpoint.state import ModelState, OptimizerState

    small = SmallState()
    return small.box, {"model": ModelState(module), "optim": OptimizerState(module, opt, continue_schedule=continue_schedule),
                       "trainer": small}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))

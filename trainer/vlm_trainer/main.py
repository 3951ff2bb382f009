"""One stage's training process: ``python -m vlm_trainer --config FILE`` (what torchrun runs).

Reads the stage's TrainerConfig (`render.build_trainer_config`), resolves it against an
earlier pruning (`visual_region.lineage`: the pruned architecture; the pruning itself is
a step of its own, `vlm_api.stage_policy.steps`), joins the process group and trains
(`train.Trainer`). Exit status: `train.EXIT_OK` (0), `EXIT_FAILED` (1), `EXIT_STOPPED` (3).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket

from .distributed import init_distributed, shutdown
from .stage_io import load_config, setup_logging
from .train import EXIT_FAILED, Trainer
from .visual_region.lineage import pruned_stage_config

log = logging.getLogger("vlm_trainer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_trainer", description="Train one stage of a VLMPretrainRun.")
    parser.add_argument("--config", required=True, help="TrainerConfig YAML rendered by the operator")
    parser.add_argument("--max-steps", type=int, default=None, help="override TrainerConfig.max_steps")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    cfg = load_config(args.config)
    if args.max_steps is not None:
        cfg = cfg.model_copy(update={"max_steps": args.max_steps})
    try:
        cfg = pruned_stage_config(cfg)
    except Exception:
        log.exception("could not read the pruned model this stage trains")
        return EXIT_FAILED
    ctx = init_distributed(cfg.spec.elastic.process_group_timeout)
    # one line from every rank, whatever its log level: who is where, after which restart
    rank_log = logging.getLogger("vlm_trainer.rank")
    rank_log.setLevel(logging.INFO)
    rank_log.info("rank %d of %d (local rank %d) on %s, pid %d, %s, elastic restart %s", ctx.rank, ctx.world_size,
                  ctx.local_rank, socket.gethostname(), os.getpid(), ctx.device,
                  os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    trainer = None
    try:
        trainer = Trainer(cfg, ctx=ctx)
        trainer.install_signal_handlers()
        return trainer.train().exit_code
    except Exception:
        log.exception("training failed")
        return EXIT_FAILED
    finally:
        if trainer is not None:
            trainer.close()
        shutdown(ctx)

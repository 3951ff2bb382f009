"""torchrun worker (world size 2, gloo, CPU, fp32): per-sample losses and gradients of
packed vs unpacked batches under DDP and then FSDP2 (`tests/support/packing_check.py`).

    torchrun --nproc_per_node 2 -m tests.support.packing_worker DATA_JSON OUT_DIR

Rank r trains the r-th sample of each of text, captions and interleaved. Each rank writes
``OUT_DIR/rank<r>.json``: per strategy, the per-sample losses of every variant, the
largest relative differences, and "ok" (or the assertion's message).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(data_json: str, out_dir: str) -> int:
    import torch

    torch.set_num_threads(1)
    from tests.fixtures_trainer import tiny_bundle
    from tests.support import packing_check as PC
    from vlm_trainer.distributed import init_distributed, parallelize, shutdown
    from vlm_trainer.data.sequences import SequenceBuilder

    data = json.loads(Path(data_json).read_text())
    ctx = init_distributed(60)
    report = {"rank": ctx.rank, "world_size": ctx.world_size}
    try:
        for strategy in ("ddp", "fsdp"):
            tok, vlm = tiny_bundle()  # seed 0: the same weights on every rank
            builder = SequenceBuilder(tok, tokens_per_image=vlm.tokens_per_image, seq_length=96)
            sets = PC.encoded_samples(data, builder, vlm.image_spec, per_source=ctx.world_size)
            items = [sets[name][ctx.rank] for name in PC.SOURCES]
            par = parallelize(vlm, strategy=strategy, precision="fp32", activation_checkpointing=False, ctx=ctx)
            assert par.strategy == strategy, par.strategy
            results = PC.run_variants(par.module, par.inner, items, tok.pad_id)
            entry = {"samples": [(e.source, e.index, e.n_tokens, e.n_image_tokens) for e in items],
                     "losses": {v: r["losses"] for v, r in results.items()}}
            try:
                entry["worst"] = PC.compare(results)
                entry["ok"] = True
            except AssertionError as exc:
                entry["ok"] = False
                entry["error"] = str(exc)[:4000]
            report[strategy] = entry
            ctx.barrier()
    finally:
        Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(report, indent=1))
        shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

"""``vlmpretrain export CKPT --format hf OUT``: a committed checkpoint as transformers-loadable
parts, for evaluation harnesses.

OUT/llm/        the LLM (``save_pretrained``: config.json + model.safetensors) and the
                tokenizer (with the image token) -> ``AutoModelForCausalLM.from_pretrained``
OUT/vision/     the vision tower (``save_pretrained``) and a ``preprocessor_config.json``
                with the image size and normalisation the trainer used
OUT/projector/  ``model.safetensors`` (the projector's ``net.*`` tensors) + ``config.json``
                (type, sizes, image token id, tokens per image)
OUT/export.json where it came from (checkpoint URI, stage, step) and what each part is

The model is rebuilt from the config the checkpoint carries (``layout.CONFIG_NAME``), or
from ``--config`` for a checkpoint written before checkpoints carried one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import CheckpointError, CheckpointStoreError
from .model_io import LoadedModel, load_checkpoint_model

log = logging.getLogger(__name__)

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_hf(loaded: LoadedModel, out: str | Path) -> dict:
    """Write the parts of a loaded checkpoint under ``out`` (see module doc); the export.json content."""
    from safetensors.torch import save_file

    out = Path(out)
    vlm = loaded.vlm
    out.mkdir(parents=True, exist_ok=True)
    vlm.llm.save_pretrained(out / "llm", safe_serialization=True)
    loaded.tok.tokenizer.save_pretrained(out / "llm")
    parts = {"llm": {"class": type(vlm.llm).__name__, "path": "llm"}}
    if vlm.vision is not None:
        vlm.vision.save_pretrained(out / "vision", safe_serialization=True)
        spec = vlm.image_spec
        _write_json(out / "vision" / "preprocessor_config.json", {
            "do_resize": True, "size": {"height": spec.size, "width": spec.size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(spec.mean),
            "image_std": list(spec.std)})
        parts["vision"] = {"class": type(vlm.vision).__name__, "path": "vision",
                           "drop_cls": bool(vlm.drop_cls)}
    if vlm.projector is not None:
        (out / "projector").mkdir(exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in vlm.projector.state_dict().items()}
        save_file(tensors, str(out / "projector" / "model.safetensors"), metadata={"format": "pt"})
        _write_json(out / "projector" / "config.json", {
            "type": loaded.model_spec.projector.type, "vision_hidden_size": int(vlm.vision.config.hidden_size),
            "llm_hidden_size": int(vlm.llm.config.hidden_size), "image_token": loaded.tok.image_token,
            "image_token_id": int(vlm.image_token_id), "tokens_per_image": int(vlm.tokens_per_image)})
        parts["projector"] = {"class": "Projector (vlm_trainer/model.py)", "path": "projector"}
    summary = {"format": "hf", "checkpoint": loaded.uri, "stage": loaded.ref.stage, "step": loaded.ref.step,
               "run": loaded.cfg.run.name, "parts": parts}
    _write_json(out / "export.json", summary)
    return summary


def main(args: argparse.Namespace) -> int:
    """``vlmpretrain export``: one line on bad input, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_checkpoint_model(args.checkpoint, config=args.config, endpoint_url=args.endpoint)
        try:
            summary = export_hf(loaded, args.out)
        finally:
            loaded.close()
    except (OSError, ValueError, KeyError, CheckpointError, CheckpointStoreError) as exc:
        print(f"vlmpretrain export: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}",
              file=sys.stderr)
        return 1
    print(f"exported {summary['checkpoint']} ({', '.join(summary['parts'])}) to {args.out}")
    return 0

"""Export a checkpoint to HuggingFace's format: `python launch/export.py --checkpoint RUN_OR_STEP_DIR --out DIR`.

The result (`config.json` with the dataset's class names, `model.safetensors` in fp32, and
`preprocessor_config.json` with the run's evaluation transform) loads with
`transformers.pipeline("image-classification", model=DIR)`, with
`transformers.ViTForImageClassification.from_pretrained(DIR)` and with `pipeline.model.from_pretrained`.
A model trained on one channel is exported taking RGB (see pipeline/checkpoint/export_meta.py) unless
`--one-channel`. A checkpoint of `train.objective=mae` or `simmim` exports as the model it trained,
for `transformers.ViTMAEForPreTraining` or `transformers.ViTForMaskedImageModeling`; with
`--encoder-only`, any checkpoint's encoder alone, for fine-tuning: a `transformers.ViTModel` (no
pooler: load it with `add_pooling_layer=False`), or with `--num-labels N` a
`transformers.ViTForImageClassification` whose classifier is new. `--ema` exports the exponential moving
average of the weights of a run with `train.ema_decay` instead of the weights. Exit code 2: a mistake in what to
export or where.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.errors import USER_ERRORS, one_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run's output_dir, or its checkpoints/step-N")
    parser.add_argument("--out", required=True, help="directory to write config.json and model.safetensors")
    parser.add_argument("--one-channel", action="store_true",
                        help="keep a 1-channel model's single input channel (HF's image pipeline then cannot feed it)")
    parser.add_argument("--encoder-only", action="store_true",
                        help="write the encoder alone (a ViTModel), e.g. of an mae/simmim run, for fine-tuning")
    parser.add_argument("--num-labels", type=int, default=None,
                        help="with --encoder-only: a ViTForImageClassification with a new head of this many classes")
    parser.add_argument("--ema", action="store_true",
                        help="export the EMA of the weights (a run with train.ema_decay > 0) instead of the weights")
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.startup import collector_paused

    with collector_paused():  # torch, DeepSpeed, transformers' ViT (pipeline/startup.py)
        from pipeline.checkpoint.export import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, rgb_input=not args.one_channel,
                                encoder_only=args.encoder_only, num_labels=args.num_labels, ema=args.ema)
    except (*USER_ERRORS, ValueError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

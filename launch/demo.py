"""The main job (`make demo`): digits shards, then a real 2-process ZeRO-2 bf16 pretraining run on CPU
(fp32 on CPUs without bf16 kernels, where torch would emulate bf16).

Writes shards to data/digits (once), trains configs/digits_tiny.yaml under torchrun with two
ranks, draws the curves, and prints where metrics, checkpoints and the plot are.
Extra arguments are passed to the trainer as overrides, e.g. `make demo ARGS="train.max_steps=100"`.

`make demo ARGS="--objective mae"` is the self-supervised demo instead: MAE pretraining on the same
shards with their labels ignored (configs/digits_mae.yaml; overrides go to this run), then the
k-NN and linear-probe top-1 of the frozen pretrained encoder next to a randomly initialised one
(launch/linear_probe.py), then configs/digits_tiny.yaml fine-tuned from the MAE encoder
(``train.init_from``) and its validation top-1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the launch/ scripts as the package ``launch``, run from a checkout
from launch.plot import read_metrics  # noqa: E402

CONFIG = ROOT / "configs" / "digits_tiny.yaml"
MAE_CONFIG = ROOT / "configs" / "digits_mae.yaml"
SHARDS = ROOT / "data" / "digits"


def run(command: list[str], env: dict | None = None) -> None:
    print("+", " ".join(command), flush=True)
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code != 0:
        sys.exit(code)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="make demo ARGS=...", description=__doc__.splitlines()[0])
    parser.add_argument("--objective", choices=("classification", "mae"), default="classification",
                        help="classification (default): configs/digits_tiny.yaml; mae: MAE pretraining, "
                             "encoder probes, then fine-tuning")
    parser.add_argument("overrides", nargs="*", help="config overrides for the (pre)training run, e.g. "
                                                     "train.max_steps=100")
    return parser.parse_intermixed_args(argv)


def output_dir_of(overrides: list[str], default: Path) -> Path:
    """A user's train.output_dir=... wins, and the summary follows it."""
    for override in overrides:
        if override.startswith("train.output_dir="):
            default = Path(override.split("=", 1)[1]).resolve()
    return default


def with_defaults(defaults: list[str], overrides: list[str]) -> list[str]:
    """The demo's own overrides, less those whose key the user gives, then the user's: a user's
    ``checkpoint.overwrite=false`` replaces the demo's ``true`` instead of following it (two
    values of one key in a row are refused as an unquoted brace pattern)."""
    given = {text.partition("=")[0].strip() for text in overrides}
    return [text for text in defaults if text.partition("=")[0] not in given] + list(overrides)


def cpu_has_bf16_kernels() -> bool:
    """Whether torch's oneDNN computes bf16 on this CPU (AVX-512 and up): elsewhere (AVX2 only) torch
    emulates bf16, several times slower than fp32."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def demo_precision(overrides: list[str]) -> list[str]:
    """The configs' bf16 where the CPU has bf16 kernels, fp32 (said once) where it would emulate them: on a
    2-core AVX2 VM the demo trained in 295 s (top-1 96.65%) in emulated bf16 and in 97 s (97.21%) in fp32.
    Nothing where the user gives train.precision."""
    if any(text.partition("=")[0].strip() == "train.precision" for text in overrides) or cpu_has_bf16_kernels():
        return []
    print("this CPU has no bf16 kernels (torch would emulate bf16, several times slower): the demo trains in "
          "fp32; train.precision=bf16 to insist", flush=True)
    return ["train.precision=fp32"]


def train(config: Path, output_dir: Path, overrides: list[str], precision: list[str] = ()) -> float:
    """One 2-rank torchrun of the trainer on CPU, from scratch; returns its seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    defaults = ["checkpoint.resume=none", "checkpoint.overwrite=true", *precision]
    overrides = [f"train.output_dir={output_dir}",  # the user's, resolved (output_dir_of), or the demo's
                 *(text for text in overrides if not text.startswith("train.output_dir="))]
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "launch/pretrain.py", "--config", str(config), *with_defaults(defaults, overrides)], env=env)
    return time.perf_counter() - started


def classification(overrides: list[str], started: float) -> int:
    output_dir = output_dir_of(overrides, ROOT / "runs" / "digits_tiny")
    train_seconds = train(CONFIG, output_dir, overrides, demo_precision(overrides))
    run([sys.executable, "launch/plot.py", str(output_dir)])
    last_eval = [r for r in read_metrics(output_dir) if "val_top1" in r][-1]
    print(f"\nvalidation top-1 {last_eval['val_top1']:.2%}, top-5 {last_eval['val_top5']:.2%} at step "
          f"{last_eval['step']}; training took {train_seconds:.0f} s ({time.perf_counter() - started:.0f} s in all)")
    print(f"metrics:     {output_dir / 'metrics.jsonl'} (TensorBoard: {output_dir / 'tensorboard'})")
    print(f"checkpoints: {output_dir / 'checkpoints'}")
    print(f"plot:        {output_dir / 'curves.png'}")
    print(f"export:      python launch/export.py --checkpoint {output_dir} --out {output_dir / 'hf'}")
    return 0


def encoder_probes(pretrained_dir: Path) -> tuple[dict, dict, object]:
    """k-NN and linear-probe top-1 of the MAE run's encoder and of a random one of the same shape
    (the MAE model's own initialisation, seeded with train.seed), on the run's own shards."""
    import dataclasses

    import torch

    from launch.linear_probe import probe_encoder
    from pipeline.config import load_config
    from pipeline.init_from import load_encoder
    from pipeline.tasks import build_task

    # The resolved config the run wrote; ~1,800 tiny images decode in-process faster than a worker starts.
    cfg = load_config(pretrained_dir / "config.yaml", ["data.num_workers=0"])
    task = build_task(cfg)
    models = []
    for _ in range(2):
        torch.manual_seed(cfg.train.seed)
        models.append(task.build_model(dataclasses.replace(cfg.model, activation_checkpointing="none")))
    random_model, pretrained_model = models
    load_encoder(pretrained_model, pretrained_dir)  # the encoder only, as train.init_from loads it
    return probe_encoder(pretrained_model, task, cfg), probe_encoder(random_model, task, cfg), cfg


def mae(overrides: list[str], started: float) -> int:
    pretrain_dir = output_dir_of(overrides, ROOT / "runs" / "digits_mae")
    finetune_dir = pretrain_dir.with_name(pretrain_dir.name + "_finetune")
    precision = demo_precision(overrides)
    pretrain_seconds = train(MAE_CONFIG, pretrain_dir, overrides, precision)
    run([sys.executable, "launch/plot.py", str(pretrain_dir)])
    probe_started = time.perf_counter()
    pretrained, random_init, cfg = encoder_probes(pretrain_dir)
    probe_seconds = time.perf_counter() - probe_started
    finetune_seconds = train(CONFIG, finetune_dir, [f"train.init_from={pretrain_dir}"], precision)
    run([sys.executable, "launch/plot.py", str(finetune_dir)])

    last_pretrain = [r for r in read_metrics(pretrain_dir) if "val_loss" in r][-1]
    last_finetune = [r for r in read_metrics(finetune_dir) if "val_top1" in r][-1]
    knn_during = last_pretrain.get("val_knn_top1")
    weights = ("bf16 weights under bf16 autocast" if cfg.train.precision == "bf16"
               else f"{cfg.train.precision} weights")
    print(f"\nMAE pretraining ({cfg.train.max_steps} steps, mask ratio {cfg.model.mask_ratio}, labels unused): "
          f"validation reconstruction loss {last_pretrain['val_loss']:.4f}"
          + (f", k-NN top-1 at the last evaluation {knn_during:.2%} (the training engine's {weights}; the "
             "k-NN figure below is the same probe, bank and transform, in fp32 from the saved checkpoint)"
             if knn_during is not None else ""))
    print(f"frozen encoder probes ({cfg.probe.features} features; k-NN k={cfg.probe.k} and a linear probe on the "
          "training split, top-1 on the validation split):")
    print(f"  {'encoder':<16}{'k-NN':>8}{'linear':>9}")
    for name, figures in (("random init", random_init), ("MAE pretrained", pretrained)):
        print(f"  {name:<16}{figures['knn_top1']:>8.2%}{figures['linear_top1']:>9.2%}")
    print(f"fine-tuned from the MAE encoder ({CONFIG.relative_to(ROOT)}, train.init_from): validation top-1 "
          f"{last_finetune['val_top1']:.2%}, top-5 {last_finetune['val_top5']:.2%} at step {last_finetune['step']}")
    print(f"pretraining took {pretrain_seconds:.0f} s, probes {probe_seconds:.0f} s, fine-tuning "
          f"{finetune_seconds:.0f} s ({time.perf_counter() - started:.0f} s in all)")
    print(f"runs:        {pretrain_dir} (MAE), {finetune_dir} (fine-tuned); metrics.jsonl and curves.png in each")
    print(f"export:      python launch/export.py --checkpoint {pretrain_dir} --out {pretrain_dir / 'hf'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    if not (SHARDS / "manifest.json").is_file():
        run([sys.executable, "launch/make_shards.py", "--source", "digits", "--out", str(SHARDS),
             "--shard-size", "405", "--val-fraction", "0.1"])
    if args.objective == "mae":
        return mae(args.overrides, started)
    return classification(args.overrides, started)


if __name__ == "__main__":
    sys.exit(main())

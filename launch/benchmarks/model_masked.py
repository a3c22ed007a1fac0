"""The contenders of the ``model`` suite's masked-image cells (``--objectives mae simmim``).

Our pretraining model (the task's, as the trainer builds it), transformers' with our weights, and
our classifier of the same encoder on the same batch. The masked models get the same masks every
round (MAE's ``noise``, SimMIM's ``bool_masked_pos``), drawn once from a fixed seed: the masks'
cost is the same whichever they are, and ours and HF's then compute the same loss, which is
checked (fp32, before timing).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from launch.benchmarks import peers, training_steps
from pipeline.config import ModelConfig
from pipeline.model import vit_flops
from pipeline.tasks import ClassificationTask, build_task


def build_masked_contenders(objective: str, size: str, opts: dict) -> tuple[
        ModelConfig, dict[str, tuple[nn.Module, Callable[[], torch.Tensor], float]], dict[str, float]]:
    """(model config, {name: (model, loss thunk, analytic FLOPs of its fwd+bwd)}, |loss - ours| per HF peer)."""
    batch_size = opts["batch_size"]
    run_cfg = training_steps.train_config(size, batch_size=batch_size, precision="fp32",
                                          image_size=opts["image_size"], objective=objective)
    cfg, task = run_cfg.model, build_task(run_cfg)
    torch.manual_seed(opts["seed"])
    ours = task.build_model(cfg).train()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, cfg.num_channels, *cfg.image_hw, generator=generator)
    # the forward's masking argument, drawn as the task draws it
    masking = ({"noise": task.noise(pixels, generator)} if objective == "mae"
               else {"bool_masked_pos": task.mask(pixels, generator)})
    labels = torch.randint(0, cfg.num_labels, (batch_size,), generator=generator)
    flops = task.flops(cfg, batch_size)
    contenders = {"ours": (ours, lambda: ours(pixels, **masking).loss, flops)}
    for impl in opts["hf_attention"]:
        hf = peers.build_hf_pretraining(objective, cfg, ours, impl).train()
        contenders[f"hf_{impl}"] = (hf, lambda hf=hf: hf(pixel_values=pixels, **masking).loss, flops)
    classification = ClassificationTask(label_smoothing=run_cfg.train.label_smoothing)
    classifier = classification.build_model(cfg).train()
    contenders["ours_classification"] = (
        classifier, lambda: classification.loss(classifier, {"image": pixels, "label": labels}),
        vit_flops(cfg, batch_size))
    with torch.no_grad():  # dropout is 0: train mode computes what eval mode does
        reference = float(contenders["ours"][1]())
        diffs = {name: float(f"{abs(float(loss_of()) - reference):.3g}")
                 for name, (_, loss_of, _) in contenders.items() if name.startswith("hf_")}
    return cfg, contenders, diffs

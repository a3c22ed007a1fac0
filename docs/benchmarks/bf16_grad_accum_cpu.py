"""bf16 at ZeRO-STAGE: the summed gradient after ACCUM micro-batches, summed in bf16 (DeepSpeed's
default grad_accum_dtype) against fp32 (data_types.grad_accum_dtype=fp32); same weights, same data.

    DS_ACCELERATOR=cpu PYTHONPATH=. python docs/benchmarks/bf16_grad_accum_cpu.py STAGE ACCUM

2026-11-29 23:43 UTC, AMD EPYC, ViT-Ti/16 (5.72 M parameters), micro-batch 4: ZeRO-2 accum 8 0.4318%,
accum 32 1.1552%; ZeRO-3 accum 8 0.4318% (relative L2 difference over every gradient the optimizer
receives at its first step).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from launch.benchmarks import training_steps


def summed_gradient(stage: int, accum: int, accum_dtype: str | None) -> torch.Tensor:
    """Every gradient DeepSpeed hands its inner optimizer at the first step (ZeRO calls the inner
    step once per parameter group or sub-group, with only that group's parameters)."""
    extra = [f"train.grad_accum_steps={accum}", "optim.grad_clip=0"]
    if accum_dtype:
        extra.append(f"deepspeed.data_types={{grad_accum_dtype: {accum_dtype}}}")
    cfg = training_steps.train_config("Ti/16", batch_size=4, precision="bf16", zero_stage=stage, extra=extra)
    model = training_steps.build_seeded_model(cfg)
    _, engine = training_steps.engine_step(cfg, model, *training_steps.synthetic_batch(cfg), world_size=1)
    inner = engine.optimizer.optimizer
    captured, inner_step = [], inner.step

    def capture(*args, **kwargs):
        captured.append(torch.cat([p.grad.detach().float().flatten() for group in inner.param_groups
                                   for p in group["params"] if p.grad is not None]))
        return inner_step(*args, **kwargs)

    inner.step = capture
    data = torch.Generator().manual_seed(3)
    for _ in range(accum):  # the same micro-batches for both sums
        images = torch.randn(4, 3, 224, 224, generator=data).to(torch.bfloat16)
        labels = torch.randint(0, 1000, (4,), generator=data)
        engine.backward(F.cross_entropy(engine(images).logits.float(), labels))
        engine.step()
    return torch.cat(captured)  # one optimizer step: the accumulation window is ``accum`` micro-batches


if __name__ == "__main__":
    training_steps.quiet_deepspeed()
    training_steps.single_process_group()
    stage, accum = int(sys.argv[1]), int(sys.argv[2])
    bf16_sum, fp32_sum = summed_gradient(stage, accum, None), summed_gradient(stage, accum, "fp32")
    print(f"ZeRO-{stage}, {accum} micro-batches, {fp32_sum.numel()} gradients: relative L2 difference "
          f"{float((bf16_sum - fp32_sum).norm() / fp32_sum.norm()):.4%}")

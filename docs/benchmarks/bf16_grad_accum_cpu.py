"""bf16 at ZeRO-STAGE: the summed gradient after ACCUM micro-batches, summed in bf16 (DeepSpeed's
default grad_accum_dtype) against fp32 (data_types.grad_accum_dtype=fp32); same weights, same data.

    DS_ACCELERATOR=cpu PYTHONPATH=. python docs/benchmarks/bf16_grad_accum_cpu.py STAGE ACCUM

2026-11-29 23:40 UTC, AMD EPYC, ViT-Ti/16, micro-batch 4: ZeRO-2 accum 8 0.455%, accum 32 1.274%;
ZeRO-3 accum 8 0.455% (relative L2 difference of the gradients the optimizer receives).
"""
import sys, torch, torch.nn.functional as F
from pipeline.benchmarks import steps
steps.quiet_deepspeed(); steps.single_process_group()
stage = int(sys.argv[1]); accum = int(sys.argv[2])
grads = {}
for dtype in ("default", "fp32"):
    extra = [f"train.grad_accum_steps={accum}", "optim.grad_clip=0"]
    if dtype == "fp32":
        extra.append("deepspeed.data_types={grad_accum_dtype: fp32}")
    cfg = steps.train_config("Ti/16", batch_size=4, precision="bf16", zero_stage=stage, extra=extra)
    model = steps.build_seeded_model(cfg)
    step, parts = steps.engine_step(cfg, model, *steps.synthetic_batch(cfg), world_size=1)
    eng = parts.engine
    print(dtype, type(eng.optimizer).__name__)
    g = torch.Generator().manual_seed(3)
    captured = []
    opt = eng.optimizer
    inner = opt.optimizer
    orig = inner.step
    def capture(*a, **k):
        captured.append(torch.cat([p.grad.detach().float().flatten() for grp in inner.param_groups for p in grp["params"] if p.grad is not None]))
        return orig(*a, **k)
    inner.step = capture
    for m in range(accum):
        x = torch.randn(4, 3, 224, 224, generator=g).to(torch.bfloat16)
        y = torch.randint(0, 1000, (4,), generator=g)
        loss = F.cross_entropy(eng(x).logits.float(), y)
        eng.backward(loss); eng.step()
    grads[dtype] = captured[0]
a, b = grads["default"], grads["fp32"]
print("stage", stage, "accum", accum, "numel", a.numel(), "rel L2 diff", float((a - b).norm() / b.norm()))

"""A plain AdamW step before and after a ZeRO-3 engine exists in the same process, and with torch's
F.linear put back: DeepSpeed's ZeRO-3 replaces torch.nn.functional.linear process-wide.

Run: DS_ACCELERATOR=cpu PYTHONPATH=. .venv/bin/python docs/benchmarks/zero3_linear_cpu.py  (ViT-S/16, batch 8,
fp32, one process, 2 threads; median of 5 after one warm-up). The evidence for giving each contender
of the step suite its own F.linear (docs/DECISIONS.md, Benchmarks); not a suite of launch/benchmark.py.
"""
import statistics
import time

import torch

from launch.benchmarks import training_steps
from pipeline.heap import keep_heap


def median_s(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


keep_heap()
torch.set_num_threads(2)
training_steps.single_process_group()
base = training_steps.train_config("S/16", batch_size=8, precision="fp32")
images, labels = training_steps.synthetic_batch(base)
plain = training_steps.plain_step(base, training_steps.build_seeded_model(base), images, labels)
torch_linear = torch.nn.functional.linear
print("plain, no ZeRO-3 engine yet:", median_s(plain))
from pipeline.distributed.engine import build_engine  # noqa: E402

cfg = training_steps.train_config("S/16", batch_size=8, precision="fp32", zero_stage=3)
build_engine(training_steps.build_seeded_model(cfg), cfg, world_size=1)
print("F.linear replaced:", torch.nn.functional.linear is not torch_linear, torch.nn.functional.linear.__name__)
print("plain, beside a ZeRO-3 engine:", median_s(plain))
torch.nn.functional.linear = torch_linear
print("plain, torch's F.linear put back:", median_s(plain))

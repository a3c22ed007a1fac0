"""SDPA (CPU flash kernel) vs SDPA math vs explicit matmul-softmax attention, fwd+bwd, ViT shapes.

Run: .venv/bin/python docs/benchmarks/attention_cpu.py  (batch 8, 197 tokens, head_dim 64, 12 layers'
worth per round, the three taking turns, median of 10 rounds after 2; all cores). The evidence for the
explicit attention path in bf16 on CPU (docs/DECISIONS.md, Attention); not a suite of launch/benchmark.py.
"""
import statistics, sys, time, torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
torch.manual_seed(0)
def explicit(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)
def sdpa(q, k, v, scale): return F.scaled_dot_product_attention(q, k, v, scale=scale)
def sdpa_math(q, k, v, scale):
    with sdpa_kernel(SDPBackend.MATH): return F.scaled_dot_product_attention(q, k, v, scale=scale)
for heads, name in ((6, "S/16"), (12, "B/16")):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(8, heads, 197, 64, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(8, heads, 197, 64, dtype=dtype)
        fns = {"sdpa_flash": sdpa, "sdpa_math": sdpa_math, "explicit": explicit}
        times = {n: [] for n in fns}
        for rep in range(12):
            for n, f in fns.items():
                t = time.perf_counter()
                for _ in range(12):  # one model's worth of layers
                    f(q, k, v, 0.125).backward(g)
                times[n].append(time.perf_counter() - t)
        print(name, str(dtype)[6:], {n: round(statistics.median(t[2:]) * 1000, 1) for n, t in times.items()}, "ms per 12 layers fwd+bwd")

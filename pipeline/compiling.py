"""``train.compile=true``: torch.compile per ViTLayer, and what it did (for the log)."""
from __future__ import annotations

import torch


def compile_layers(model: torch.nn.Module) -> int:
    """Compile every encoder layer in place; returns how many.

    Per layer rather than the whole model: activation checkpointing wraps layers and ZeRO-3 hooks
    modules, and both stay outside the compiled regions; the layers share one compiled graph.
    """
    layers = model.vit.encoder.layer
    for layer in layers:
        layer.compile()
    return len(layers)


def compile_summary() -> str:
    """Graphs compiled and graph breaks so far in this process (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"].get("unique_graphs", 0)
    breaks = sum(counters["graph_break"].values())
    reasons = "; ".join(sorted(counters["graph_break"])[:3])
    return f"{graphs} graph(s) compiled, {breaks} graph break(s)" + (f" ({reasons})" if reasons else "")

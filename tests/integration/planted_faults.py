"""Faults planted into the pipeline's own functions, to show that the guard of guarded_pretrain.py
catches what it claims to. Each is the kind of change that passes every CPU test and breaks a
GPU run: a host read in a steady-state step, or a host tensor handed to NCCL.

A plant rewrites one line of a function's source and compiles it under the function's own file
name and line numbers, in its module's globals: to the guard, the planted line is the
pipeline's code. It happens in the guarded child process only (``GUARD_PLANT=<name>``); nothing
planted is ever in pipeline/.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
from pathlib import Path

# name -> (module, function's qualified name, the line as it is, the line planted)
PLANTS = {
    # reads the running sum on the host at every micro-batch
    "float_in_add_loss": ("pipeline.train_metrics", "StepWindow.add_loss",
                          "self.loss_count += finite",
                          "self.loss_count += finite; float(self.loss_sum)"),
    # the fault that crashed the first GPU run: the window's sums made on the host
    "window_without_device": ("pipeline.train_metrics", "StepWindow.__init__", ", device=device)", ")"),
    # the evaluation's sums made on the host
    "eval_sums_without_device": ("pipeline.evaluation", "_evaluate",
                                 "dtype=torch.float64, device=device)", "dtype=torch.float64)"),
    # a skip decided on the host (ZeRO-0, where the step computes the gradient norm)
    "host_read_in_step": ("pipeline.train_step", "TrainStep.step",
                          "self.engine.step()",
                          "self.engine.step() if norm is None or bool(torch.isfinite(norm)) else None"),
}


def _target(name: str):
    module_name, qualname, line, planted = PLANTS[name]
    module = importlib.import_module(module_name)
    owner, _, attribute = qualname.rpartition(".")
    holder = getattr(module, owner) if owner else module
    original = inspect.unwrap(getattr(holder, attribute))
    lines, first = inspect.getsourcelines(original)
    source = textwrap.dedent("".join(lines))
    if line not in source:
        raise SystemExit(f"planted fault {name}: {qualname} no longer has {line!r}; update planted_faults.py")
    return module, holder, attribute, original, source, first


def where(name: str) -> str:
    """The planted line as the guard names its origin: ``pipeline:<file>:<line>``."""
    _, _, _, original, source, first = _target(name)
    line = PLANTS[name][2]
    lineno = first + source[:source.index(line)].count("\n")
    return f"pipeline:{Path(inspect.getsourcefile(original)).name}:{lineno}"


def plant(name: str) -> None:
    module, holder, attribute, original, source, first = _target(name)
    _, qualname, line, planted = PLANTS[name]
    namespace: dict = {}
    code = compile("\n" * (first - 1) + source.replace(line, planted), inspect.getsourcefile(original), "exec")
    exec(code, module.__dict__, namespace)  # noqa: S102 - the point: the pipeline's function, one line changed
    replacement = namespace[attribute]
    current = getattr(holder, attribute)
    setattr(holder, attribute, replacement)
    for other in list(sys.modules.values()):  # `from pipeline.evaluation import evaluate` elsewhere
        if getattr(other, "__name__", "").startswith("pipeline") and getattr(other, attribute, None) is current:
            setattr(other, attribute, replacement)

"""launch/pretrain.py under two guards that make CUDA-only faults visible on a CPU run.

    python guarded_pretrain.py --config CONFIG key=value ...   (under torchrun, like launch/pretrain.py)

1. Collectives: on a GPU the default process group is NCCL, which refuses a CPU tensor ("No
   backend type associated with device type cpu"); on a CPU run everything is a CPU tensor and
   gloo takes it. So here every tensor a factory function (torch.tensor, torch.zeros, ...) makes
   without an explicit ``device=`` is tagged, and a collective on a group whose device is the
   trainer's refuses a tagged tensor: on a GPU that tensor would have been on the CPU. Groups
   created with ``backend="gloo"`` are host groups and take CPU tensors, as they would on a GPU.
2. Host-device synchronisations: ``Tensor.item/tolist/__bool__/__float__/__int__`` (what waits
   for the device on CUDA) are counted by the step they happen in and by whose code called them
   (pipeline, deepspeed, torch). Steps on which the trainer logs, evaluates or saves are allowed
   to synchronise; the report says which steps did, from where.

Writes ``<train.output_dir>/guard_rank<R>.json``: the refused collectives and the synchronisations.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# (torch.*_like functions are left out: they take their input's device)
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "reduce_scatter", "all_to_all_single")
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")

refused: list[str] = []
syncs: Counter = Counter()
state = {"trainer": None, "allowed": 0, "in_sync": 0}
host_groups: set[int] = set()  # groups created with backend="gloo" on purpose: CPU tensors are right there


class TagImplicitDevice(TorchFunctionMode):
    """Marks tensors made by a factory function without ``device=``: the CPU by default, not by choice."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in FACTORIES and isinstance(result, torch.Tensor):
            device = kwargs.get("device")
            result._implicit_device = device is None
            # made on the host on purpose or by default: on a GPU run it would be a host tensor too
            result._host_tensor = device is None or torch.device(device).type == "cpu"
        return result


def _host_group(group) -> bool:
    return group is not None and id(group) in host_groups


def _remember_host_groups(original):
    def new_group(*args, **kwargs):
        group = original(*args, **kwargs)
        if kwargs.get("backend") == "gloo":
            host_groups.add(id(group))
        return group
    return new_group


def _guard_collective(name: str, original):
    def guarded(*args, **kwargs):
        group = kwargs.get("group")
        if not _host_group(group):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            if any(getattr(t, "_implicit_device", False) for t in tensors):
                where = "".join(traceback.format_stack(limit=4)[:-1])
                refused.append(f"{name}: a tensor made without device= (on a GPU: a CPU tensor into NCCL)\n{where}")
                raise RuntimeError(f"guard: {name} got a CPU-by-default tensor on the trainer's device group")
        return original(*args, **kwargs)
    return guarded


def _origin() -> str:
    """Whose code asked for the value: the innermost frame outside torch."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if "/torch/" in path or path == __file__:
            continue
        if "/deepspeed/" in path:
            return f"deepspeed:{path.split('/deepspeed/')[-1]}:{frame.lineno}"
        if str(ROOT / "pipeline") in path:
            return f"pipeline:{Path(path).name}:{frame.lineno}"
        return "other"
    return "torch"


def _count_sync(name: str, original):
    def counted(self, *args, **kwargs):
        trainer = state["trainer"]
        # once per call: the TorchFunctionMode above dispatches a method a second time, to itself
        outer = not state["in_sync"]
        if outer and not getattr(self, "_host_tensor", False):  # a host tensor's value waits for nothing
            if trainer is not None and getattr(trainer, "_guard_looping", False):
                phase = "allowed" if state["allowed"] else "step"
                syncs[(phase, int(trainer.step), _origin())] += 1
        state["in_sync"] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            state["in_sync"] -= 1
    return counted


def _allowed(method):
    """Trainer methods that run on logging, evaluation and checkpoint steps only: syncs allowed."""
    def wrapped(self, *args, **kwargs):
        state["allowed"] += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            state["allowed"] -= 1
    return wrapped


def install() -> None:
    from pipeline import trainer as trainer_module

    dist.new_group = _remember_host_groups(dist.new_group)
    for name in COLLECTIVES:
        setattr(dist, name, _guard_collective(name, getattr(dist, name)))
    for name in SYNCS:
        setattr(torch.Tensor, name, _count_sync(name, getattr(torch.Tensor, name)))
    cls = trainer_module.Trainer
    for name in ("_log_train", "evaluate", "save"):
        setattr(cls, name, _allowed(getattr(cls, name)))
    build, loop = cls.build, cls._loop

    def build_and_remember(self, *args, **kwargs):
        state["trainer"] = self
        return build(self, *args, **kwargs)

    def looping(self, *args, **kwargs):
        self._guard_looping = True
        try:
            return loop(self, *args, **kwargs)
        finally:
            self._guard_looping = False

    cls.build, cls._loop = build_and_remember, looping


def report(output_dir: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    rows = [{"phase": phase, "step": step, "origin": origin, "count": count}
            for (phase, step, origin), count in sorted(syncs.items())]
    path = Path(output_dir) / f"guard_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"refused": refused, "syncs": rows}, indent=1))


def main() -> int:
    from launch.pretrain import main as pretrain_main

    install()
    output_dir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("train.output_dir=")), "runs/guarded")
    with TagImplicitDevice():
        code = pretrain_main(sys.argv[1:])
    report(output_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())

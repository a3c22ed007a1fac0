"""launch/pretrain.py under a guard that makes CUDA-only faults visible on a CPU run.

    python guarded_pretrain.py --config CONFIG key=value ...   (under torchrun, like launch/pretrain.py)

On a CPU run every tensor is a CPU tensor, so the device a tensor would have on a GPU run is
recorded as a tag that follows the code's intent, not the CPU device type:

- "device": made with ``device=`` the trainer's device (our code passes it around as a
  ``torch.device``), moved there with ``.to(device)``, a parameter or buffer of the engine's
  module or a tensor of its optimizer, a batch ``DeviceFeed`` copies (on the CPU it uses the host
  batch as it is); and every result of an op
  with a device-tagged input (a ``TorchFunctionMode`` sees every op, ``.grad`` and ``.data`` too).
- "host": made by a factory without ``device=`` (the CPU by default), made or moved to ``"cpu"``
  by our code (``device="cpu"``, ``.to("cpu")``), ``.cpu()``; results of host tensors only.
- untagged: DeepSpeed's and torch's own explicit devices (they name the accelerator, on a CPU
  run ``"cpu"``: the guard cannot tell which they mean).

Two faults are then caught:

1. Collectives: on a GPU the default process group is NCCL, which refuses a CPU tensor ("No
   backend type associated with device type cpu"). A collective on a group of the trainer's
   device refuses a host-tagged tensor (and the run fails). Groups created with
   ``backend="gloo"`` are host groups and take host tensors, as they would on a GPU.
2. Host reads: ``item``, ``tolist``, ``bool/float/int/index``, ``cpu``, ``numpy``,
   ``__array__``, ``.to`` a host device, printing (``repr``, ``format``), and writing a device
   value into a host tensor (``host += device``, ``host[i] = device``, ``host.copy_(device)``):
   on CUDA each waits for the device. Every read of a tensor that is not host-tagged is counted
   by the step it happens in, whose code asked (pipeline, deepspeed, torch), and what it was.
   Steps on which the trainer logs, evaluates or saves are allowed to read; the others are not.

Writes ``<train.output_dir>/guard_rank<R>.json``: the refused collectives and the reads.
``GUARD_PLANT=<name>[,<name>...]`` first plants faults of tests/integration/planted_faults.py (the guard's own tests).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections import Counter
from itertools import chain
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
PIPELINE = str(ROOT / "pipeline")

HOST, DEVICE = "host", "device"
# Factories that make a tensor out of nothing but Python values: without device= it is the CPU's.
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.from_numpy}
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu", "numpy",
         "__array__", "__repr__", "__format__"}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "reduce_scatter", "all_to_all_single")

refused: list[str] = []
reads: Counter = Counter()
state = {"trainer": None, "allowed": 0}
host_groups: set[int] = set()  # groups created with backend="gloo" on purpose: host tensors are right there


def tag(tensor) -> str | None:
    return getattr(tensor, "_guard_tag", None)


def set_tag(tensor, value: str | None) -> None:
    if value is not None and isinstance(tensor, torch.Tensor):
        tensor._guard_tag = value


def _tensors(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in chain(args, kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def _ours() -> bool:
    """Whether the innermost frame outside torch and this file is the pipeline's."""
    frame = sys._getframe(2)  # noqa: SLF001 - cheap enough to run on every explicit device
    while frame is not None:
        path = frame.f_code.co_filename
        if "/torch/" not in path and path != __file__:
            return path.startswith(PIPELINE)
        frame = frame.f_back
    return False


def _intent(device) -> str | None:
    """What ``device=`` means: the trainer's device, the host, or (DeepSpeed's, torch's) unknown."""
    if isinstance(device, int) or torch.device(device).type != "cpu":
        return DEVICE  # an accelerator: a GPU run
    if not _ours():
        return None
    # our code names the host "cpu" and passes the trainer's device around as a torch.device
    return DEVICE if isinstance(device, torch.device) else HOST


def _to_target(args, kwargs) -> tuple[bool, str | None]:
    """(whether ``Tensor.to`` names a device, the intent of that device)."""
    device = kwargs.get("device")
    for value in args[1:]:
        if isinstance(value, (str, torch.device)):
            device = value
        elif isinstance(value, torch.Tensor):
            return True, tag(value)
    return (True, _intent(device)) if device is not None else (False, None)


def _origin() -> str:
    """Whose code asked for the value: the innermost frame outside torch and this file."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename
        if "/torch/" in path or path == __file__:
            continue
        if "/deepspeed/" in path:
            return f"deepspeed:{path.split('/deepspeed/')[-1]}:{frame.lineno}"
        if path.startswith(PIPELINE):
            return f"pipeline:{Path(path).name}:{frame.lineno}"
        return "other"
    return "torch"


def _count(what: str) -> None:
    trainer = state["trainer"]
    if trainer is not None and getattr(trainer, "_guard_looping", False):
        phase = "allowed" if state["allowed"] else "step"
        reads[(phase, int(trainer.step), _origin(), what)] += 1


def _moved(result, source, intent):
    """A move to where the tensor already is returns the tensor itself on a CPU run; on a GPU
    it is a copy. A copy here too, so that the original keeps its tag."""
    if result is source and intent != tag(source):
        result = source.clone()
    set_tag(result, intent)
    return result


class Guard(TorchFunctionMode):
    """Tags every op's results and counts host reads (see the module's docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors(args, kwargs)
        source = inputs[0] if inputs else None
        if name in READS and source is not None:
            if tag(source) != HOST:
                _count(name)
            result = func(*args, **kwargs)
            return _moved(result, source, HOST) if name == "cpu" else result
        if name == "to" and source is not None:
            names_device, intent = _to_target(args, kwargs)
            if names_device:
                if intent == HOST and tag(source) != HOST:
                    _count("to(cpu)")
                result = func(*args, **kwargs)
                if intent is None:  # DeepSpeed's accelerator: the result stays what it was
                    return result
                return _moved(result, source, intent)
        out = kwargs.get("out")
        if isinstance(out, torch.Tensor) or (name.endswith("_") and not name.startswith("__")) \
                or name == "__setitem__":
            first = args[0] if args else None
            destinations = [out] if isinstance(out, torch.Tensor) else \
                [t for t in first if isinstance(t, torch.Tensor)] if isinstance(first, (list, tuple)) else [first]
            into_host = [t for t in destinations if tag(t) == HOST]
            if any(tag(t) == DEVICE for t in inputs if all(t is not d for d in destinations)):
                if into_host:
                    _count(f"{name} of a device value into a host tensor")
                for destination in destinations:
                    if tag(destination) is None:
                        set_tag(destination, DEVICE)
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        if kwargs.get("device") is not None:
            made = _intent(kwargs["device"])
        elif not inputs:
            made = HOST if func in FACTORIES else None
        else:
            tags = {tag(t) for t in inputs}
            made = DEVICE if DEVICE in tags else HOST if tags == {HOST} else None
        for tensor in (result if isinstance(result, (list, tuple)) else (result,)):
            if isinstance(tensor, torch.Tensor) and not (tag(tensor) is not None and any(tensor is t for t in inputs)):
                set_tag(tensor, made)
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
        if not _host_group(kwargs.get("group")):
            if any(tag(t) == HOST for t in _tensors(args, kwargs)):
                where = "".join(traceback.format_stack(limit=4)[:-1])
                refused.append(f"{name}: a host tensor (on a GPU: a CPU tensor into NCCL)\n{where}")
                raise RuntimeError(f"guard: {name} got a host tensor on the trainer's device group")
        return original(*args, **kwargs)
    return guarded


def _allowed(method):
    """Trainer methods that run on logging, evaluation and checkpoint steps only: reads allowed."""
    def wrapped(self, *args, **kwargs):
        state["allowed"] += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            state["allowed"] -= 1
    return wrapped


def _tag_engine(engine) -> None:
    """The model and its optimizer live on the device."""
    module, optimizer = engine.module, getattr(engine, "optimizer", None)
    groups = getattr(optimizer, "param_groups", None) or []
    for tensor in chain(module.parameters(), module.buffers(), (p for g in groups for p in g["params"])):
        set_tag(tensor, DEVICE)
        set_tag(getattr(tensor, "ds_tensor", None), DEVICE)  # a ZeRO-3 partition


def install() -> None:
    from pipeline import trainer as trainer_module
    from pipeline.data.device_feed import DEVICE_KEYS, DeviceFeed

    dist.new_group = _remember_host_groups(dist.new_group)
    for name in COLLECTIVES:
        setattr(dist, name, _guard_collective(name, getattr(dist, name)))
    cls = trainer_module.Trainer
    for name in ("_log_train", "evaluate", "save"):
        setattr(cls, name, _allowed(getattr(cls, name)))
    build, loop, prepare = cls.build, cls._loop, DeviceFeed._prepare

    def build_and_remember(self, *args, **kwargs):
        state["trainer"] = self
        build(self, *args, **kwargs)
        _tag_engine(self.engine)

    def looping(self, *args, **kwargs):
        self._guard_looping = True
        try:
            return loop(self, *args, **kwargs)
        finally:
            self._guard_looping = False

    def device_batch(self, host):
        if not self.cuda:  # on the CPU the host batch is already where DeviceFeed would copy it
            for key in ("image", *DEVICE_KEYS):
                set_tag(host.get(key), DEVICE)
        return prepare(self, host)

    cls.build, cls._loop, DeviceFeed._prepare = build_and_remember, looping, device_batch


def report(output_dir: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    rows = [{"phase": phase, "step": step, "origin": origin, "read": what, "count": count}
            for (phase, step, origin, what), count in sorted(reads.items())]
    path = Path(output_dir) / f"guard_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"refused": refused, "syncs": rows}, indent=1))


def findings(output_dir: Path, *, world_size: int = 2, whole_step: bool = False) -> list[str]:
    """What a guarded run did wrong, one line each: a refused collective, or a host read of
    our code in a steady-state step (with ``whole_step``: of anyone's, after step 0)."""
    found = []
    for rank in range(world_size):
        report = json.loads((Path(output_dir) / f"guard_rank{rank}.json").read_text())
        found += [f"rank {rank}: refused {line.splitlines()[0]}" for line in report["refused"]]
        found += [f"rank {rank}: {row['read']} at {row['origin']} in step {row['step'] + 1} (x{row['count']})"
                  for row in report["syncs"] if row["phase"] == "step"
                  and (row["origin"].startswith("pipeline") or (whole_step and row["step"] > 0))]
    return found


def main() -> int:
    from launch.pretrain import main as pretrain_main

    install()
    if os.environ.get("GUARD_PLANT"):
        sys.path.insert(0, str(HERE))
        from planted_faults import plant

        for name in os.environ["GUARD_PLANT"].split(","):
            plant(name)
    output_dir = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("train.output_dir=")), "runs/guarded")
    with Guard():
        code = pretrain_main(sys.argv[1:])
    report(output_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())

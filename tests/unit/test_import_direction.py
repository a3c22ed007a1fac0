"""Imports flow one way, up the floors of docs/ARCHITECTURE.md; pipeline/model/ stays pure.

Every module of ``pipeline/`` and ``launch/`` has a floor, found from its path. A module may
import from its own floor and the floors below, never from a higher one:

0. bottom: ``errors`` (exit codes follow from the class) and the process and file services
   every floor uses, all standard library only: ``heap`` (ctypes), ``lifetime`` (prctl), ``startup`` (gc),
   ``storage`` (imports errors), ``preemption`` (signals to a flag; imports storage);
1. ``config``: the typed sections (standard library, yaml, errors);
2. the building blocks, each independent of the others: ``model``, ``data``, ``optim``, and
   ``rng`` and ``compiling`` (torch only, used by the trainer and the benchmarks);
3. ``distributed``, checkpoints (``checkpoint``, ``checkpoint_read``, ``export``,
   ``export_meta``), ``metrics``, and the checks run before training that read checkpoints or
   DeepSpeed's config (``preflight``, ``validate``);
4. ``tasks`` and the trainer (``trainer``, ``train_step``, ``train_metrics``, ``evaluation``),
   with ``probe`` and ``init_from``, which take a task;
5. ``launch/``, the command lines and benchmarks: anything below.

Below floor 3 nothing imports ``torch.distributed`` or ``deepspeed``: distribution is applied from
outside. ``pipeline/model/`` imports only torch, safetensors, the standard library and the config.
Imports are read with ``ast`` (nothing is executed), including relative imports, ``from torch
import distributed`` and imports inside functions.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "pipeline" / "model"

# floor -> the modules and packages on it (a package covers everything under it)
FLOORS: dict[int, tuple[str, ...]] = {
    0: ("pipeline.errors", "pipeline.heap", "pipeline.lifetime", "pipeline.storage",
        "pipeline.preemption", "pipeline.startup"),
    1: ("pipeline.config",),
    2: ("pipeline.model", "pipeline.data", "pipeline.optim", "pipeline.rng", "pipeline.compiling"),
    3: ("pipeline.distributed", "pipeline.checkpoint", "pipeline.metrics", "pipeline.validate"),
    4: ("pipeline.tasks", "pipeline.trainer", "pipeline.train_step", "pipeline.train_metrics",
        "pipeline.evaluation", "pipeline.probe", "pipeline.init_from", "pipeline.preflight"),
    5: ("launch",),
}
SIBLINGS_FLOOR = 2  # its units import none of each other
DISTRIBUTION = ("torch.distributed", "deepspeed")
DISTRIBUTION_FROM_FLOOR = 3

FORBIDDEN = ("torch.distributed", "deepspeed", "transformers", "pipeline.trainer", "pipeline.distributed",
             "pipeline.checkpoint", "pipeline.data", "launch")
ALLOWED_TOP_LEVEL = {"torch", "safetensors", "pipeline"} | set(sys.stdlib_module_names)
ALLOWED_PIPELINE = ("pipeline.config", "pipeline.model")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def unit_of(module: str) -> tuple[int, str] | None:
    """(floor, the floor's entry that holds ``module``): the longest entry that covers it. The
    package itself (its empty ``__init__``) is on the bottom floor; a new module has no floor."""
    if module == "pipeline":
        return 0, "pipeline"
    best = None
    for floor, entries in FLOORS.items():
        for entry in entries:
            if _within(module, entry) and (best is None or len(entry) > len(best[1])):
                best = (floor, entry)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package a file's relative imports start from (a package's __init__ is in itself)."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source file imports; ``from a import b`` yields both ``a`` and ``a.b``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def layer_violations(module: str, imported: set[str]) -> list[str]:
    """What ``module`` imports against the floors: upwards, across floor 2, distribution too low."""
    floor, unit = unit_of(module)
    bad = []
    for name in sorted(imported):
        if floor < DISTRIBUTION_FROM_FLOOR and any(_within(name, d) for d in DISTRIBUTION):
            bad.append(f"{name} (distribution is floor {DISTRIBUTION_FROM_FLOOR} and up; {module} is on {floor})")
            continue
        if not (_within(name, "pipeline") or _within(name, "launch")):
            continue
        target = unit_of(name)
        if target is None:
            continue  # reported by test_every_module_has_a_floor
        if target[0] > floor:
            bad.append(f"{name} (floor {target[0]}, above {module}'s floor {floor})")
        elif floor == SIBLINGS_FLOOR and target[0] == floor and target[1] != unit:
            bad.append(f"{name} ({target[1]} and {unit} are siblings on floor {floor})")
    return bad


def model_violations(modules: set[str]) -> list[str]:
    bad = []
    for module in sorted(modules):
        top = module.split(".")[0]
        if any(_within(module, f) for f in FORBIDDEN):
            bad.append(f"{module} (forbidden)")
        elif top not in ALLOWED_TOP_LEVEL:
            bad.append(f"{module} (not torch, safetensors or stdlib)")
        elif top == "pipeline" and module != "pipeline" and not module.startswith(ALLOWED_PIPELINE):
            bad.append(f"{module} (model may import only pipeline.config and pipeline.model)")
    return bad


def project_files() -> list[Path]:
    return sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "launch").rglob("*.py")])


def model_files() -> list[Path]:
    return sorted(MODEL_DIR.rglob("*.py"))


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_module_has_a_floor():
    missing = [_id(p) for p in project_files() if unit_of(module_name(p)) is None]
    assert missing == [], f"give these a floor in FLOORS (and docs/ARCHITECTURE.md): {missing}"


def test_bottom_floor_is_standard_library_only():
    for path in project_files():
        if unit_of(module_name(path))[0] != 0:
            continue
        imported = imported_modules(path.read_text(), package_of(path))
        outside = sorted(m for m in imported if m.split(".")[0] not in {"pipeline", *sys.stdlib_module_names})
        assert outside == [], f"{_id(path)}: the bottom floor imports the standard library only: {outside}"


@pytest.mark.parametrize("path", project_files(), ids=_id)
def test_no_import_from_a_higher_floor(path):
    imported = imported_modules(path.read_text(), package_of(path))
    assert layer_violations(module_name(path), imported) == []


def test_model_package_has_files():
    names = {path.name for path in model_files()}
    assert {"__init__.py", "vit.py", "hf.py", "flops.py"} <= names


@pytest.mark.parametrize("path", model_files(), ids=lambda p: p.name)
def test_model_imports_only_torch_and_config(path):
    assert model_violations(imported_modules(path.read_text(), package_of(path))) == []


@pytest.mark.parametrize("module, source", [
    ("pipeline.config.model", "from pipeline.model import build_model"),
    ("pipeline.data.loader", "def f():\n    from pipeline.distributed.env import resolve_env"),
    ("pipeline.data.loader", "from ..checkpoint import save"),
    ("pipeline.data.stages", "import torch.distributed as dist"),
    ("pipeline.optim", "from torch import distributed"),
    ("pipeline.model.vit", "from pipeline.data.transforms import decode"),  # siblings on floor 2
    ("pipeline.checkpoint", "from pipeline.tasks import Task"),
    ("pipeline.tasks.base", "from launch.benchmarks import training_steps"),
    ("pipeline.errors", "from pipeline.config import ConfigError"),
])
def test_layer_checker_catches_upward_imports(module, source):
    package = module.rsplit(".", 1)[0]
    assert layer_violations(module, imported_modules(source, package)) != []


@pytest.mark.parametrize("module, source", [
    ("pipeline.data.worker", "from pipeline.heap import keep_heap"),
    ("pipeline.checkpoint.resume", "from pipeline.checkpoint.read import faster_reads\nimport torch.distributed"),
    ("pipeline.trainer", "from pipeline import checkpoint\nfrom pipeline.tasks import build_task"),
    ("pipeline.tasks.masked", "from pipeline.data.partition import mix_seed"),
    ("launch.pretrain", "from pipeline.trainer import train"),
    ("pipeline.errors", "import errno"),
])
def test_layer_checker_accepts_downward_imports(module, source):
    package = module.rsplit(".", 1)[0]
    assert layer_violations(module, imported_modules(source, package)) == []


@pytest.mark.parametrize("source", [
    "import torch.distributed as dist",
    "from torch import distributed",
    "def f():\n    import deepspeed",
    "from transformers import ViTModel",
    "from ..trainer import train",
    "from pipeline.data.loader import build_loader",
    "import launch.pretrain",
    "import numpy",
])
def test_model_checker_catches_bad_imports(source):
    assert model_violations(imported_modules(source, "pipeline.model")) != []


def test_model_checker_accepts_good_imports():
    source = "import math\nimport torch.nn.functional as F\nfrom safetensors.torch import save_file\n" \
             "from pipeline.config import ModelConfig\nfrom .vit import ViTModel\n"
    assert model_violations(imported_modules(source, "pipeline.model")) == []

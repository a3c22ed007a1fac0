"""pipeline/model/ stays pure: torch, safetensors, the standard library and pipeline.config only.

Imports are read with ``ast`` (nothing is executed), including relative imports, ``from torch
import distributed`` and imports inside functions.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[1] / "pipeline" / "model"
FORBIDDEN = ("torch.distributed", "deepspeed", "transformers", "pipeline.trainer", "pipeline.distributed",
             "pipeline.checkpoint", "pipeline.data", "launch")
ALLOWED_TOP_LEVEL = {"torch", "safetensors", "pipeline"} | set(sys.stdlib_module_names)
ALLOWED_PIPELINE = ("pipeline.config", "pipeline.model")


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


def violations(modules: set[str]) -> list[str]:
    bad = []
    for module in sorted(modules):
        top = module.split(".")[0]
        if any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
            bad.append(f"{module} (forbidden)")
        elif top not in ALLOWED_TOP_LEVEL:
            bad.append(f"{module} (not torch, safetensors or stdlib)")
        elif top == "pipeline" and module != "pipeline" and not module.startswith(ALLOWED_PIPELINE):
            bad.append(f"{module} (model may import only pipeline.config and pipeline.model)")
    return bad


def model_files() -> list[Path]:
    return sorted(MODEL_DIR.rglob("*.py"))


def test_model_package_has_files():
    names = {path.name for path in model_files()}
    assert {"__init__.py", "vit.py", "hf.py", "flops.py"} <= names


@pytest.mark.parametrize("path", model_files(), ids=lambda p: p.name)
def test_model_imports_only_torch_and_config(path):
    package = ".".join(path.relative_to(MODEL_DIR.parents[1]).with_suffix("").parts[:-1])
    assert violations(imported_modules(path.read_text(), package)) == []


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
def test_checker_catches_bad_imports(source):
    assert violations(imported_modules(source, "pipeline.model")) != []


def test_checker_accepts_good_imports():
    source = "import math\nimport torch.nn.functional as F\nfrom safetensors.torch import save_file\n" \
             "from pipeline.config import ModelConfig\nfrom .vit import ViTModel\n"
    assert violations(imported_modules(source, "pipeline.model")) == []

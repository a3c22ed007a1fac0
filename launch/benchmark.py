"""Benchmarks: `python launch/benchmark.py <suite> [--json OUT] [suite options]`.

Suites (``launch/benchmarks/<suite>.py``, each ``run(args) -> dict``): model, step, roofline,
memory, checkpoint, data, gpu. `python launch/benchmark.py <suite> --help` lists a suite's
options. The figures are printed as tables and, with --json, written with the machine, the
date, the command line and the load average before and after.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SUITES = {
    "model": "fwd+bwd of our ViT vs transformers and timm, same weights (ratios)",
    "step": "a training step through DeepSpeed ZeRO 0-3 vs plain PyTorch AdamW (overhead %)",
    "roofline": "achieved FLOP/s of the step vs this machine's matmul FLOP/s",
    "memory": "activation checkpointing memory/time; ZeRO 0-3 per-rank state on 2 processes",
    "checkpoint": "save/load of a ZeRO-2 checkpoint on 2 processes vs raw disk speed; checkpoint.async vs sync saves",
    "data": "training-loader images/s per worker vs a decode+crop ceiling",
    "gpu": "images/s and MFU on a CUDA GPU (says so and exits 0 without one)",
}


def load_suite(name: str):
    """Import ``launch.benchmarks.<name>`` only now: one suite's missing module or dependency
    must not stop the others."""
    module_name = f"launch.benchmarks.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise SystemExit(f"benchmark suite '{name}' is not available: {module_name} does not exist "
                             "in this checkout") from None
        raise SystemExit(f"benchmark suite '{name}' needs the package '{err.name}', which is not installed "
                         f"({err}); install the dev extras: pip install -e '.[dev]'") from None


def add_options_from_defaults(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """Options for a suite that gives only a DEFAULTS dict: --key (lists take several values)."""
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, dest=key, type=lambda s: s.lower() in ("1", "true", "yes"),
                                help=f"default {value}")
        elif isinstance(value, list):
            kind = type(value[0]) if value else str
            parser.add_argument(flag, dest=key, nargs="+", type=kind, help=f"default {' '.join(map(str, value))}")
        else:
            parser.add_argument(flag, dest=key, type=type(value) if value is not None else str,
                                help=f"default {value}")


def suite_parser(name: str, module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"benchmark.py {name}", description=(module.__doc__ or "").split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    elif hasattr(module, "DEFAULTS"):
        add_options_from_defaults(parser, module.DEFAULTS)
    return parser


# --- printing -----------------------------------------------------------------------------------

def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def format_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        out = []
        for key, sub in value.items():
            out += _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
        return out
    return [(prefix, value)]


def format_result(result: dict) -> str:
    """Lists of rows as tables; ``summary`` (else everything else) as key: value lines."""
    parts = []
    for key, value in result.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            parts.append(format_table(value))
    rest = result.get("summary") if "summary" in result else {
        k: v for k, v in result.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
    if rest:
        parts.append("\n".join(f"{k}: {_cell(v)}" for k, v in _flatten(rest)))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("-"):
        print(__doc__.strip() + "\n\nsuites:\n" + "\n".join(f"  {k:<11}{v}" for k, v in SUITES.items()))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    if name not in SUITES:
        print(f"unknown suite '{name}'; choose one of {', '.join(SUITES)}", file=sys.stderr)
        return 2
    module = load_suite(name)
    args = suite_parser(name, module).parse_args(argv[1:])
    from launch.benchmarks.common import OtherLoad, load_average, machine_info

    meta = {**machine_info(), "command": "python launch/benchmark.py " + " ".join(argv),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    start, others = time.perf_counter(), OtherLoad()
    result = module.run(args)
    meta["load_average_after"] = load_average()
    # Our subprocesses (torchrun and its workers) count as ours once waited for.
    meta["other_processes_cpu_share"] = others.share()
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    print(format_result(result))
    print(f"\n{meta['date_utc']}  {meta['cpu']} ({meta['cpu_count']} cores)  load {meta['load_average_1_5_15']} "
          f"-> {meta['load_average_after']}  other processes' CPU share {meta['other_processes_cpu_share']}  "
          f"{meta['wall_s']} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"suite": name, "meta": meta, "result": result}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check`: is this GPU machine training at the model's speed, in every precision and ZeRO stage?

    python launch/gpu_check.py [--out runs/gpu_check] [--phases throughput sync matrix resume export]

Writes JPEG shards like ImageNet's (12,350 images, 440x360, quality 90, 25 shards), then runs
the real trainer under torchrun (launch/benchmarks/gpu_check.py says what each phase runs and
checks), prints a table and writes ``<out>/gpu_check.json``. Exit 1 when a run fails or a
result is wrong (a crash, a non-finite loss, a resume that differs); the speed goals are
reported beside the figures. Without CUDA (or with --tiny) it runs the same phases on tiny
sizes, on the CPU, in a minute or two: `make test` does, so that this script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PHASES = ("throughput", "sync", "matrix", "resume", "export")


def goals_met(plan, results: dict) -> dict[str, bool | None]:
    """The issue's speed goals, where this plan measures them (GPU sizes only)."""
    if not plan.goals:
        return {}
    rows = {row["name"]: row for row in results.get("throughput", [])}
    b16, l16, mae = rows.get("B/16 eager"), rows.get("L/16 compiled"), rows.get("B/16 MAE eager")

    def at_least(row, key, goal):
        return None if row is None or row.get(key) is None else row[key] >= goal

    wait = None if b16 is None or b16.get("data_wait_fraction") is None else \
        b16["data_wait_fraction"] <= plan.goals["data_wait_b16"]
    # Both trainers at batch 256: an MAE step's time over a classification step's is the inverse
    # ratio of their images/s.
    mae_cost = None if not (b16 and mae and b16.get("trainer_images_per_s") and mae.get("trainer_images_per_s")) \
        else b16["trainer_images_per_s"] / mae["trainer_images_per_s"] <= plan.goals["mae_cost_b16"]
    return {"B/16 trainer/model >= 0.92": at_least(b16, "ratio", plan.goals["ratio"]),
            "L/16 trainer/model >= 0.92": at_least(l16, "ratio", plan.goals["ratio"]),
            "B/16 data wait <= 0.03": wait, "L/16 trainer MFU >= 0.42": at_least(l16, "trainer_mfu",
                                                                               plan.goals["mfu_l16"]),
            "B/16 MAE trainer/model >= 0.92": at_least(mae, "ratio", plan.goals["ratio"]),
            "B/16 MAE step / classification step <= 0.60": mae_cost}


def print_table(results: dict, goals: dict) -> None:
    for phase, rows in results.items():
        for row in rows:
            figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                if k not in ("name", "ok", "log", "error") and v is not None)
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {phase:10s} {row['name']:22s} {figures}")
            if row.get("error"):
                print(f"     {row['error']}")
    for goal, met in goals.items():
        print(f"goal {'met    ' if met else 'not met' if met is False else 'n/a    '} {goal}")


def main(argv: list[str] | None = None) -> int:
    import torch

    from launch.benchmarks import gpu_check
    from launch.benchmarks.gpu_check_data import write_jpeg_shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu_check", help="where shards, runs and gpu_check.json go")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the default without CUDA)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run (default 1)")
    args = parser.parse_args(argv)
    plan = gpu_check.tiny_plan() if args.tiny or not torch.cuda.is_available() else gpu_check.gpu_plan()
    out = Path(args.out).resolve()
    start = time.perf_counter()
    shards = write_jpeg_shards(out / "data", images=plan.images, height=plan.height, width=plan.width,
                               shards=plan.shards, workers=plan.workers)
    runs = gpu_check.Runs(plan, shards, out, args.nproc)
    results = {}
    for phase in PHASES:
        if phase in args.phases:
            results[phase] = getattr(gpu_check, phase)(plan, runs)
            print(f"[gpu_check] {phase} done after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    goals = goals_met(plan, results)
    device = torch.cuda.get_device_name(0) if plan.gpu else "cpu (tiny sizes)"
    report = {"device": device, "torch": torch.__version__, "plan": plan.__dict__, "results": results,
              "goals": goals, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check on {device}: {out / 'gpu_check.json'}")
    print_table(results, goals)
    return 0 if all(row["ok"] for rows in results.values() for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

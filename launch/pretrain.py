"""Pretrain a ViT: `torchrun --standalone --nproc_per_node=N launch/pretrain.py --config configs/X.yaml [key=value ...]`.

Also runs under `torchrun --nnodes ... --rdzv_backend=c10d`, the `deepspeed` launcher, `srun`
without torchrun, and as a plain single process. Exit codes: 0 done, 75 stopped by a signal
after saving (requeue me), 2 a user error (config, data, checkpoint, environment), 1 a failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before anything slow (imports, the process group, loading a checkpoint): from here on a
    # stop signal only sets a flag, and the run saves and exits 75 instead of dying.
    from pipeline.preemption import EXIT_PREEMPTED, StopFlag

    stop_flag = StopFlag().install()
    from pipeline.errors import USER_ERRORS, exit_code_for, one_line  # imports torch: seconds
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    from pipeline.config import dump_config, load_config
    from pipeline.distributed.env import resolve_env
    from pipeline.metrics import setup_logging

    try:
        cfg = load_config(args.config, args.overrides)
        env = resolve_env()
    except USER_ERRORS as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    setup_logging(env.rank)
    if args.check:
        dump_config(cfg, "/dev/stdout")
        return 0

    from pipeline.distributed.engine import check_precision, destroy_process_group, device_for, init_process_group
    from pipeline.trainer import train

    code = 1
    try:
        check_precision(cfg.train.precision, device_for(env))
        init_process_group(env, timeout_s=float(os.environ.get("PIPELINE_DIST_TIMEOUT_S", 1800)))
        code = train(cfg, env, stop_flag)
    except BaseException as error:  # noqa: BLE001 - every exit path must still tear down the group
        code = exit_code_for(error)
        if code == 2 or type(error).__name__ == "TrainingError":
            log.error("%s", one_line(error))
        elif not isinstance(error, KeyboardInterrupt):
            log.exception("training failed")
    finally:
        destroy_process_group(clean=code in (0, EXIT_PREEMPTED))
        if env.is_main:
            write_exit_status(cfg.train.output_dir, code)
    return code


def write_exit_status(output_dir: str, code: int) -> None:
    """torchrun reports any failing worker as 1, so the code that means "requeue me" (75) is
    also left in <output_dir>/exit_status for the Slurm script to read."""
    path = Path(output_dir)
    if path.is_dir():
        (path / "exit_status").write_text(f"{code}\n")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())

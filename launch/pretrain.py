"""Pretrain a ViT: `torchrun --standalone --nproc_per_node=N launch/pretrain.py --config configs/X.yaml [key=value ...]`.

Also runs under `torchrun --nnodes ... --rdzv_backend=c10d`, the `deepspeed` launcher, `srun`
without torchrun, and as a plain single process. Exit codes: 0 done, 75 stopped by SIGTERM or
SIGUSR1 after saving (requeue me), 130 stopped by Ctrl-C after saving, 2 a user error (config,
data, checkpoint, environment, a full or read-only disk), 1 a failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
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
    # stop signal only sets a flag, and the run saves and exits 75 (130 for Ctrl-C) instead of dying.
    from pipeline.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopFlag

    stop_flag = StopFlag().install()
    from pipeline.errors import UserError, one_line
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
    from pipeline.config import dump_config, load_config
    from pipeline.distributed.env import resolve_env
    from pipeline.metrics import setup_logging
    from pipeline.validate import validate_run

    try:
        cfg = load_config(args.config, args.overrides)
        env = resolve_env()
        validate_run(cfg, env.world_size)  # --check and training alike: mistakes that would fail later
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    setup_logging(env.rank)
    if args.check:
        try:
            cfg = resolved_schedule(cfg, env.world_size)  # the steps and lr the run would use
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return error.exit_code
        dump_config(cfg, "/dev/stdout")
        return 0
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        # torchrun starts each worker in a session of its own: where its agent is killed (srun's
        # SIGKILL, proctrack/pgid), nothing else would end the worker, and it would train on alone.
        from pipeline.lifetime import die_with_parent

        die_with_parent(os.getppid())
    threading.excepthook = _quiet_storage_errors

    from pipeline.distributed.engine import destroy_process_group, device_for, init_process_group
    from pipeline.distributed.faults import report_failure
    from pipeline.distributed.precision import check_precision
    from pipeline.preflight import preflight
    from pipeline.tasks import build_task
    from pipeline.trainer import train

    status_path = Path(cfg.train.output_dir) / "exit_status"
    code = 1
    try:
        check_precision(cfg.train.precision, device_for(env))
        task = build_task(cfg)  # every rank, before any rank waits for another: the same refusal everywhere
        checked = preflight(cfg, env, shape_fields=task.shape_fields, build_model=task.build_model)
        if env.is_main:
            write_exit_status(status_path, "running")  # holds a block, for the final code on a full disk
            stop_flag.exit_status_path = status_path
        with stop_flag.ending_the_wait("waiting for the other ranks"):
            init_process_group(env, timeout_s=float(os.environ.get("PIPELINE_DIST_TIMEOUT_S", 1800)))
        code = train(cfg, env, stop_flag, checked)  # 75 or 130 after a stop: agreed by all ranks
    except BaseException as error:  # noqa: BLE001 - every exit path must still tear down the group
        code = report_failure(error, rank=env.rank, world_size=env.world_size, output_dir=cfg.train.output_dir)
    finally:
        if env.is_main:
            write_exit_status(status_path, code)
        destroy_process_group(clean=code in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED))
    return code


def resolved_schedule(cfg, world_size: int):
    """``--check``'s view of train.epochs / optim.blr: steps and lr, counting the shards only when
    the length depends on them (the trainer does the same from its preflight's counts)."""
    from pipeline.data.sources import resolve_shards
    from pipeline.optim import resolve_schedule, schedule_needs_samples

    samples = None
    if schedule_needs_samples(cfg):
        samples = sum(s.num_samples for s in resolve_shards(cfg.data.train_shards, cfg.data.manifest))
    return resolve_schedule(cfg, world_size=world_size, num_samples=samples)


def write_exit_status(path: Path, code: int | str) -> None:
    """torchrun reports any failing worker as 1, so the code that means "requeue me" (75) is
    also left in <output_dir>/exit_status for the Slurm script to read. Rewritten in place, so
    that a disk that has just filled up still takes it."""
    if not path.parent.is_dir():
        return
    try:
        from pipeline.storage import rewrite_small_file

        rewrite_small_file(path, f"{code}\n")
    except OSError as error:
        log.warning("could not write the exit status %s to %s: %s", code, path, error)


def _quiet_storage_errors(args: threading.ExceptHookArgs) -> None:
    """A writer thread (TensorBoard's) that hits a full disk: one line here, and the run ends
    through the main thread, which the writer raises the same error to at its next write."""
    from pipeline.errors import is_storage_error, os_reason

    if is_storage_error(args.exc_value):
        log.warning("background writer %s: %s", args.thread.name if args.thread else "?", os_reason(args.exc_value))
        return
    threading.__excepthook__(args)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _exit(code: int) -> None:
    """End the process once the exit handlers have run (multiprocessing's among them), without
    the interpreter's own teardown: its last garbage collection over everything torch and
    DeepSpeed built took 4-5 s on 2 cores, after the run's files were closed, while the other
    ranks and the launcher waited; and the C++ destructors after it are where DeepSpeed on CPU
    sometimes aborted after a clean run ("terminate called without an active exception")."""
    import atexit

    atexit._run_exitfuncs()  # noqa: SLF001 - what a normal exit runs first; logging's flush is one
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())

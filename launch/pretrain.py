"""Pretrain a ViT: `torchrun --standalone --nproc_per_node=N launch/pretrain.py --config configs/X.yaml [key=value ...]`.

Also runs under `torchrun --nnodes ... --rdzv_backend=c10d`, the `deepspeed` launcher, `srun`
without torchrun, and as a plain single process. Exit codes: 0 done, 75 stopped by SIGTERM or
SIGUSR1, or by a data store that gave up, after saving (requeue me), 130 stopped by Ctrl-C after
saving, 2 a user error (config, data, checkpoint, environment, a full or read-only disk), 1 a failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

log = logging.getLogger("pretrain")

HELP_EPILOG = """\
objectives: train.objective=classification (the default; needs labeled shards), mae or simmim
  (masked-image pretraining, labels not needed); train.init_from=RUN_OR_HF_DIR starts from an encoder.
config keys: the sections model, data, optim, train, checkpoint, probe, deepspeed; each key is a
  field of the dataclasses in pipeline/config/ (model.py, sections.py), listed in README.md
  ("Configs"); an unknown key is refused with the known ones.
exit codes: 0 done; 75 stopped by SIGTERM/SIGUSR1, or by a data store that gave up
  (data.io_retries/io_timeout_s), after saving a checkpoint (requeue me; under torchrun, send the
  signal to the workers, or stop torchrun itself: its ranks save and exit 75);
  130 stopped by Ctrl-C after saving; 2 a user error (one line: config, data, checkpoint,
  environment, a full or read-only disk); 1 a failure. torchrun itself exits 1 for any of them:
  rank 0 leaves the code in <train.output_dir>/exit_status ("running" while it runs).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=HELP_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file under configs/")
    parser.add_argument("--check", action="store_true", help="validate the config, print it, and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before anything slow (imports, the process group, loading a checkpoint): from here on a
    # stop signal only sets a flag, and the run saves and exits 75 (130 for Ctrl-C) instead of dying;
    # until training starts there is nothing to save: a stop signal ends the process once the
    # inputs are checked (a rank that finds a mistake ends with 2 either way).
    from pipeline.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, StopFlag

    stop_flag = StopFlag().install()
    under_torchrun = bool(os.environ.get("TORCHELASTIC_RUN_ID"))
    # Under torchrun a stop before training is mostly torchrun ending the others after one rank
    # refused the config: that rank's line says why, and the others stay quiet.
    from pipeline.distributed.faults import peer_refusal_code

    stop_flag.checking_first(loud=_first_rank() and not under_torchrun, peer_code=peer_refusal_code)
    if under_torchrun:
        # torchrun starts each worker in a session of its own: where its agent dies (kill -USR1,
        # `timeout -s USR1`, srun's SIGKILL), nothing else would end the worker. Its death is a
        # SIGTERM here: before training the worker exits at once, during training it saves and exits 75.
        from pipeline.lifetime import die_with_parent

        stop_flag.launcher_pid = os.getppid()
        die_with_parent(stop_flag.launcher_pid, sig=signal.SIGTERM)
    from pipeline.config import dump_config, load_config, output_dir_of
    from pipeline.errors import UserError

    status_path = None if args.check else Path(output_dir_of(args.config, args.overrides)) / "exit_status"
    if status_path is not None and _first_rank():
        # "running" from the start: a rerun of a finished run that fails now must not leave its 0
        write_exit_status(status_path, "running", create=True)
        stop_flag.exit_status_path = status_path
    from pipeline.startup import collector_paused

    with collector_paused():  # torch and torchvision come in here: most of a start (pipeline/startup.py)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda_available() else "cuda")
        from pipeline.distributed.env import resolve_env, set_torch_threads
        from pipeline.metrics import setup_logging
        from pipeline.validate import validate_run

    try:
        cfg = load_config(args.config, args.overrides)
        env = resolve_env()
        validate_run(cfg, env.world_size)  # --check and training alike: mistakes that would fail later
    except UserError as error:
        return refuse(error, status_path)
    setup_logging(env.rank)
    if args.check:
        try:
            cfg = resolved_schedule(cfg, env.world_size)  # the steps and lr the run would use
        except UserError as error:
            return refuse(error, None)
        dump_config(cfg, "/dev/stdout")
        return 0
    set_torch_threads(num_workers=cfg.data.num_workers, local_world_size=env.local_world_size)
    with collector_paused():  # the loaders and torchvision: before the fork, for the data server to have them
        import pipeline.data.loader  # noqa: F401
        from pipeline.data.worker import start_worker_server

    start_worker_server(cfg.data.num_workers, fork=True)  # now, while no other thread runs: a fork
    threading.excepthook = _quiet_storage_errors

    with collector_paused():  # DeepSpeed and the trainer
        from pipeline.distributed.engine import destroy_process_group, device_for, init_process_group
        from pipeline.distributed.faults import report_failure
        from pipeline.distributed.precision import check_precision
        from pipeline.preflight import preflight
        from pipeline.tasks import build_task
        from pipeline.trainer import train

    status_path = Path(cfg.train.output_dir) / "exit_status"
    code, refused = 1, False
    try:
        try:
            check_precision(cfg.train.precision, device_for(env))
            task = build_task(cfg)  # every rank, before any rank waits for another: the same refusal everywhere
            checked = preflight(cfg, env, shape_fields=task.shape_fields, build_model=task.build_model)
        except UserError as error:  # before the process group: the same on every rank, no rank to tell
            refused = True
            return refuse(error, status_path)
        if env.is_main:
            write_exit_status(status_path, "running")  # holds a block, for the final code on a full disk
            stop_flag.exit_status_path = status_path
        stop_flag.exit_before_training()  # the checks passed: a stop signal (even one already come) ends it now
        with stop_flag.ending_the_wait("waiting for the other ranks"):
            init_process_group(env, timeout_s=float(os.environ.get("PIPELINE_DIST_TIMEOUT_S", 1800)))
        stop_flag.training_starts()
        code = train(cfg, env, stop_flag, checked)  # 75 or 130 after a stop: agreed by all ranks
    except BaseException as error:  # noqa: BLE001 - every exit path must still tear down the group
        code = report_failure(error, rank=env.rank, world_size=env.world_size, output_dir=cfg.train.output_dir)
    finally:
        if not refused:
            if env.is_main:
                write_exit_status(status_path, code)
            destroy_process_group(clean=code in (0, EXIT_PREEMPTED, EXIT_INTERRUPTED))
    return code


def resolved_schedule(cfg, world_size: int):
    """``--check``'s view of train.epochs / optim.blr: steps and lr, counting the shards only when
    the length depends on them (the trainer does the same from its preflight's counts)."""
    from pipeline.data.sources import resolve_shards
    from pipeline.optim import resolve_schedule, schedule_needs_samples

    from pipeline.data.errors import DataError
    from pipeline.errors import one_line

    samples = None
    if schedule_needs_samples(cfg):
        try:
            samples = sum(s.num_samples for s in resolve_shards(cfg.data.train_shards, cfg.data.manifest))
        except DataError as error:  # checking a config where its data is not (a login node): say so, go on
            print(f"note: train.epochs / optim.warmup_epochs stay unresolved here: {one_line(error)}",
                  file=sys.stderr)
            return cfg
    return resolve_schedule(cfg, world_size=world_size, num_samples=samples)


def _first_rank() -> bool:
    """Rank 0, or a single process; read before the environment is resolved (and checked)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def refuse(error: BaseException, status_path: Path | None) -> int:
    """A mistake found before the process group (config, environment, inputs): the same on every
    rank of a node. Said once: by the first rank of the node to find it, and by every rank in
    torchrun's error file, which its failure summary shows in place of "<N/A>"; the code goes to ``exit_status`` (by any rank
    that finds the mistake: rank 0 may be stopped by torchrun before it finds it itself)."""
    from pipeline.distributed.faults import first_to_say_it, write_torchrun_error_file
    from pipeline.errors import exit_code_for, one_line

    line, code = one_line(error), exit_code_for(error)
    write_torchrun_error_file(line)
    if first_to_say_it(code):
        print(f"error: {line}", file=sys.stderr, flush=True)
    if status_path is not None:
        write_exit_status(status_path, code, create=True)
    return code


def write_exit_status(path: Path, code: int | str, create: bool = False) -> None:
    """torchrun reports any failing worker as 1, so the code that means "requeue me" (75) is
    also left in <output_dir>/exit_status for the Slurm script to read. Rewritten in place, so
    that a disk that has just filled up still takes it. ``create``: make the run directory first
    (at the start; a directory that cannot be made is the preflight's to report, in its own line)."""
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.is_dir():
            return
        from pipeline.storage import rewrite_small_file

        rewrite_small_file(path, f"{code}\n")
    except OSError as error:
        if not create:
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

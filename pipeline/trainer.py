"""The step loop: data -> DeepSpeed engine -> metrics, with evaluation, checkpoints and stop signals.

What is trained is the task's business (``pipeline/tasks``); one optimizer step is
``TrainStep``'s. This file decides when things happen. A steady-state step reads nothing from
the device: the next batch is already on its way (``DeviceFeed``), losses accumulate on the
device (``StepWindow``), a non-finite step is skipped on the device, and the stop flag and
bad-sample counts are agreed on the host one step late (``StepAgreement``). Device values are
read on logging, evaluation and checkpoint steps only. The host batches are fetched one step
further ahead (``StepLookAhead``), so that a data store that gives up is agreed as a stop while
every rank still holds its next batch: the run saves and exits 75 as after a preemption.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline import checkpoint
from pipeline.compiling import compile_layers, compile_summary
from pipeline.config import Config, dump_config
from pipeline.data import LedgerWriter, build_eval_loader, build_train_loader
from pipeline.data.device_feed import DeviceFeed, Normalize
from pipeline.data.errors import StoreUnavailable
from pipeline.data.lookahead import StepLookAhead
from pipeline.data.worker import start_worker_server
from pipeline.checkpoint.export import consolidated_state_dict
from pipeline.distributed.agreement import StepAgreement
from pipeline.distributed.ema import build_ema, discard_saved
from pipeline.distributed.engine import build_engine, device_for
from pipeline.distributed.env import DistributedEnv
from pipeline.distributed.precision import engine_dtype, matmul_dtype
from pipeline.errors import TrainingError
from pipeline.evaluation import evaluate
from pipeline.heap import keep_heap
from pipeline.init_from import starting_weights
from pipeline.metrics import Progress, build_metrics_writer, device_peak_flops
from pipeline.optim import apply_current_schedule, optim_groups, resolve_schedule
from pipeline.preemption import StopFlag
from pipeline.preflight import Preflight, preflight
from pipeline.probe import build_probe
from pipeline.rng import rng_state, seed_everything, set_rng_state
from pipeline.tasks import build_task
from pipeline.train_metrics import StepWindow, train_row
from pipeline.train_step import TrainStep, steady_state

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config, env: DistributedEnv, stop_flag: StopFlag | None = None,
                 checked: Preflight | None = None):
        self.cfg, self.env, self.checked = cfg, env, checked  # checked: the launcher's preflight, if it ran one
        self.device = device_for(env)
        if self.device.type == "cpu":
            keep_heap()  # no caching allocator on the CPU: reuse freed memory across steps (heap.py)
        self.output_dir = Path(cfg.train.output_dir)
        self.step = 0
        self.nonfinite_steps = 0
        self.data_skipped = 0
        self.stop_flag = stop_flag or StopFlag()

    def build(self) -> None:
        cfg, env = self.cfg, self.env
        self.stop_flag.install()  # early: a signal while building (e.g. a long load) must not kill the job
        start_worker_server(cfg.data.num_workers)  # its imports overlap with building the engine
        self.task = build_task(cfg)
        checked = self.checked or preflight(cfg, env, shape_fields=self.task.shape_fields,
                                            build_model=self.task.build_model)
        self.plan = checked.resume
        # Epochs to steps and blr to lr, from the shards' counts: config.yaml records what the run uses.
        self.cfg = cfg = resolve_schedule(cfg, world_size=env.world_size,
                                          num_samples=sum(shard.num_samples for shard in checked.train_shards))
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
            if cfg.checkpoint.resume == "none" and cfg.checkpoint.overwrite:
                checkpoint.start_over(self.output_dir)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = self.task.build_model(cfg.model)
        starting_weights(model, task=self.task, init_from=cfg.train.init_from, plan=self.plan)  # before the engine
        if cfg.train.compile:
            log.info("torch.compile: compiling %d encoder layers (the first step takes longer)", compile_layers(model))
        loader_args = dict(image_size=cfg.model.image_hw, num_channels=cfg.model.num_channels, rank=env.rank,
                           world_size=env.world_size, sample_keys=self.task.sample_keys)
        self.train_loader = build_train_loader(cfg.data, seed=cfg.train.seed, shards=checked.train_shards,
                                               **loader_args)
        self.eval_loader = build_eval_loader(cfg.data, shards=checked.val_shards, **loader_args)
        self.loader_state = self.train_loader.state_dict()  # what the last trained batch left
        self.normalize = Normalize(cfg.data.mean, cfg.data.std, cfg.model.num_channels)
        self.probe = build_probe(cfg, self.task, env, device=self.device, normalize=self.normalize)
        if self.plan is not None and self.plan.universal:
            cfg.deepspeed["checkpoint"] = {**cfg.deepspeed.get("checkpoint", {}), "load_universal": True}
        self.engine = build_engine(model, cfg, world_size=env.world_size)
        self.ema = build_ema(self.engine, cfg.train)  # None unless train.ema_decay
        self.train_step = TrainStep(self.engine, self.task, cfg, self.device, ema=self.ema)
        self.agreement = StepAgreement()
        # checkpoint.async: a writer thread and its host buffers, or None (synchronous saves)
        self.background = (checkpoint.plan_background(self.engine, self.env, group=self.agreement.group)
                           if cfg.checkpoint.async_ else None)
        images_per_rank = cfg.data.batch_size * cfg.train.grad_accum_steps
        self.images_per_step = images_per_rank * env.world_size
        self.flops_per_step = self.task.flops(cfg.model, images_per_rank) * env.world_size
        self.peak_flops = device_peak_flops(self.device, matmul_dtype(cfg.train)) * env.world_size
        # Lines after the resumed step were written by an interrupted run and never became a checkpoint.
        self.ledger = (LedgerWriter(self.output_dir, env.rank, resume_step=self.plan.step if self.plan else 0)
                       if cfg.data.ledger else None)
        if self.plan is not None:
            self._restore()
        else:
            seed_everything(cfg.train.seed * 100003 + env.rank)  # per-rank streams for dropout and the like

    def _restore(self) -> None:
        plan = self.plan
        if plan.universal:
            log.info("resuming %s on a different world size (%s -> %d): converting through DeepSpeed's "
                     "universal checkpoint", plan.tag_dir.name, plan.marker.get("world_size"), self.env.world_size)
        state = checkpoint.load(self.engine, plan, output_dir=self.output_dir)
        self._restore_ema(state)
        apply_current_schedule(self.engine.lr_scheduler, self.cfg.optim)
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.data_skipped = int(state.get("data_skipped", 0))
        ranks = state["ranks"]
        # Every rank's loader state: on another layout the loader re-cuts the rest of the epoch.
        self.train_loader.set_state([r["loader"] for r in ranks])
        if len(ranks) == self.env.world_size:
            set_rng_state(ranks[self.env.rank]["rng"])
        else:
            seed_everything(self.cfg.train.seed * 100003 + self.env.rank + self.step)
        self.loader_state = self.train_loader.state_dict()
        log.info("resumed from %s at step %d", plan.tag_dir, self.step)

    def _restore_ema(self, state: dict) -> None:
        """The average as saved (same world size), rebuilt from the consolidated shards (another
        world size), or started over from the loaded weights (a checkpoint without one)."""
        if self.ema is None:
            discard_saved(self.engine, state)
            return
        if not self.plan.universal:
            found = self.ema.restore(state)
        else:  # DeepSpeed's universal conversion knows only its own optimizer states
            try:
                self.ema.load_full(consolidated_state_dict(self.plan.tag_dir, self.cfg.train.zero_stage, ema=True))
                found = True
                log.info("EMA of the weights rebuilt from %s (%s ranks) onto %d ranks", self.plan.tag_dir.name,
                         self.plan.marker.get("world_size"), self.env.world_size)
            except checkpoint.CheckpointError:
                found = False
        if not found:
            log.warning("checkpoint %s holds no EMA of the weights (train.ema_decay was 0): the EMA starts "
                        "from the loaded weights", self.plan.tag_dir.name)
            self.ema.reset()

    def run(self) -> int:
        """Train to ``train.max_steps``; 0 when done, the stop flag's code (75, 130) after a stop signal."""
        cfg = self.cfg
        # Rows after the step we start from belong to an interrupted or overwritten run: dropped.
        writer = build_metrics_writer(self.output_dir, rank=self.env.rank, resume_step=self.step)
        progress = Progress(cfg.train.max_steps, initial=self.step, enabled=self.env.is_main,
                            bar=cfg.train.progress_bar)
        try:
            return self._loop(writer, progress)
        finally:
            self.train_loader.close()  # stop the workers before the process group goes away
            if self.background is not None:
                self.background.close()  # a failed run: let a background write in flight end
            checkpoint.wait_for_prune()  # the run ends with keep_last checkpoints, not more
            progress.close()
            writer.close()
            if self.ledger is not None:
                self.ledger.close()
            # Done (or stopped and saved): from here on the process only exits, and a late signal
            # (torchrun stopping the others once one rank exited 75) must not change its exit code.
            self.stop_flag.ignore_from_now_on()

    def _loop(self, writer, progress: Progress) -> int:
        cfg, max_steps, first = self.cfg, self.cfg.train.max_steps, self.step
        ahead = self._look_ahead()
        feed = DeviceFeed(ahead, device=self.device, dtype=engine_dtype(cfg.train), normalize=self.normalize)
        window = StepWindow(self.device, cfg.train.log_every)
        # The first step's batches have no earlier post to stop on: a store that gives up there raises
        # (exit 75, nothing trained since the checkpoint we started from). Those of the second step
        # go into a post read after the first step.
        ahead.require(1)
        self._fetch_ahead(ahead, 2, window)
        self.agreement.post(**self._flags(ahead, skipped=0))
        compile_reported = not cfg.train.compile
        self.engine.train()
        while self.step < max_steps:
            keys, skipped = [], 0
            with steady_state(self.device, warm=self.step >= 2):
                for _ in range(cfg.train.grad_accum_steps):
                    wait_start = time.perf_counter()
                    batch = next(feed)
                    window.data_wait += time.perf_counter() - wait_start
                    keys.extend(batch["key"])
                    skipped += batch["skipped"]
                    window.add_loss(self.train_step.micro(batch))
                    window.grad_norm = self.train_step.step()
            self.loader_state = batch["state"]  # this batch is trained: a checkpoint may count it
            self.step += 1
            if self.ledger is not None:
                self.ledger.write(self.step, keys)
            self._fetch_ahead(ahead, self.step - first + 2, window)  # step k+2's, before step k's flags
            window.end_step()
            if not compile_reported:
                log.info("torch.compile after the first step: %s", compile_summary())
                compile_reported = True
            agreed = self.agreement.post(**self._flags(ahead, skipped=skipped))
            evaluates = bool(cfg.train.eval_every) and self.step % cfg.train.eval_every == 0
            saves = bool(cfg.checkpoint.every_steps) and self.step % cfg.checkpoint.every_steps == 0
            logs = self.step % cfg.train.log_every == 0 or self.step == max_steps
            if logs or evaluates or saves or agreed.stop:  # steps that read the device anyway: exact counts
                agreed = agreed.merge(self.agreement.collect())
            self.data_skipped += agreed.skipped
            if logs:
                self._log_train(writer, progress, window, batch["epoch"])
                window = StepWindow(self.device, cfg.train.log_every)
            progress.update(self.step)
            if self.step == max_steps:
                break  # a stop signal at the last step: just finish (exit 0)
            if agreed.stop:
                self.save(writer, final=True)  # first: the time between the warning and the kill is short
                self._log_stop(agreed, ahead.failure)
                return agreed.stop_code  # agreed: a Ctrl-C on one rank makes every rank exit 130
            if evaluates:
                self.evaluate(writer)
            if saves:
                self.save(writer)
        self.evaluate(writer)
        self.save(writer, final=True)
        return 0

    def _look_ahead(self) -> StepLookAhead:
        """Exactly the batches left to train (nothing is read, or can fail, past the last step),
        fetched a step ahead; the loader's shared buffers make room for the batches it holds."""
        per_step = self.cfg.train.grad_accum_steps
        batches = self.train_loader.host_batches(borrow=True, hold=StepLookAhead.most_held(per_step))
        return StepLookAhead(batches, per_step=per_step, steps=self.cfg.train.max_steps - self.step)

    def _fetch_ahead(self, ahead: StepLookAhead, steps: int, window: StepWindow) -> None:
        """The batches of this run's first ``steps`` steps (data wait, if the loader was behind). A
        store that gives up on the way is said here, as it is seen; its line comes with the stop."""
        started, seen = time.perf_counter(), ahead.failure
        ahead.fetch(steps)
        window.data_wait += time.perf_counter() - started
        if ahead.failure is not None and seen is None:
            log.warning("after step %d: the data store gave up on a batch fetched ahead; every rank stops at "
                        "step %d at the latest, with a checkpoint", self.step, self.step + 1)

    def _flags(self, ahead: StepLookAhead, *, skipped: int) -> dict:
        """This rank's flags for ``StepAgreement.post``: a stop signal's code, or 75 once its store gave up."""
        signal = self.stop_flag.exit_code if self.stop_flag.requested else 0
        failed = ahead.failure is not None
        return {"stop_code": max(signal, ahead.failure.exit_code if failed else 0), "skipped": skipped,
                "store_failed": failed}

    def _log_stop(self, agreed, failure: StoreUnavailable | None) -> None:
        """Why the run stopped, after the checkpoint: the store's one line on a rank whose store
        gave up (the shard, the byte, the last error), the signal on a rank that got one."""
        saved = f"checkpoint saved at step {self.step}, exiting {agreed.stop_code}"
        if failure is not None:
            log.error("%s; %s", failure, saved)
        elif agreed.store_failures:
            log.warning("stopped because the data store gave up on %d rank(s) (their line says where); %s",
                        agreed.store_failures, saved)
        if self.stop_flag.requested or not agreed.store_failures:
            log.warning("stopped by %s at step %d; checkpoint saved, exiting %d", self.stop_flag.signal_name
                        or "a signal on another rank", self.step, agreed.stop_code)

    def _log_train(self, writer, progress: Progress, window: StepWindow, epoch: int) -> None:
        loss, nonfinite = window.reduce()  # the synchronisation of a logging step
        self.nonfinite_steps += nonfinite
        limit = self.cfg.train.max_nonfinite_steps
        if nonfinite:
            message = (f"non-finite loss in {nonfinite} of the {window.steps} steps up to step {self.step} "
                       f"(skipped, not applied); {self.nonfinite_steps} such steps so far, "
                       f"train.max_nonfinite_steps={limit}")
            if self.nonfinite_steps > limit:
                raise TrainingError(message + "; lower optim.lr, raise optim.warmup_steps, check the data, or use "
                                    "train.precision=bf16/fp32 instead of fp16")
            log.warning("%s", message)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None and window.grad_norm is not None:
            grad_norm = window.grad_norm.item()
        row = train_row(window, loss=loss, images_per_step=self.images_per_step,
                        flops_per_step=self.flops_per_step, peak_flops=self.peak_flops,
                        lr=float(self.engine.get_lr()[0]),
                        grad_norm=float(grad_norm) if grad_norm is not None else None,
                        epoch=epoch, data_skipped=self.data_skipped, nonfinite_steps=self.nonfinite_steps)
        writer.log(row, self.step)
        progress.log(self.step, row)

    def evaluate(self, writer) -> dict[str, float] | None:
        """The task's metrics (and the probe's) over the whole validation set, exact across ranks."""
        if self.eval_loader is None:
            return None
        metrics = evaluate(self.engine, self.task, self.eval_loader, cfg=self.cfg, device=self.device,
                           normalize=self.normalize, probe=self.probe, ema=self.ema)
        writer.log(metrics, self.step)
        log.info("step %d: %s", self.step, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def save(self, writer=None, *, final: bool = False) -> Path:
        """Save this step; ``final`` (a stop, the end): synchronously, after any background write.
        The seconds training waited go to the metrics (``checkpoint_stall_s``) and the log."""
        started = time.perf_counter()
        background = self.background
        if background is not None and final:
            background.wait()  # at most one save in flight; then this one on the disk before exiting
            background = None
        per_rank = {"loader": self.loader_state, "rng": rng_state()}
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, per_rank, group=self.agreement.group)  # host objects: over gloo
        client_state = {"step": self.step, "ranks": gathered, "nonfinite_steps": self.nonfinite_steps,
                        "data_skipped": self.data_skipped, "config_hash": self.cfg.hash()}
        marker = {"world_size": self.env.world_size, "zero_stage": self.cfg.train.zero_stage,
                  "precision": self.cfg.train.precision, "config_hash": self.cfg.hash(),
                  "task": self.task.name, "model": dataclasses.asdict(self.cfg.model),
                  "global_batch": self.images_per_step,  # data.keep_global_batch reads it on a resume
                  "optim_groups": optim_groups(self.cfg.optim)}  # a resume with other groups is refused
        with self.ema.saved_with(client_state) if self.ema is not None else contextlib.nullcontext():
            tag_dir = checkpoint.save(self.engine, output_dir=self.output_dir, step=self.step,
                                      client_state=client_state, marker_info=marker,
                                      keep_last=self.cfg.checkpoint.keep_last, rank=self.env.rank,
                                      resumed_from=self.plan.tag_dir if self.plan is not None else None,
                                      background=background)
        stall = time.perf_counter() - started
        if writer is not None:
            writer.log({"checkpoint_stall_s": round(stall, 4)}, self.step)
        if self.env.is_main:
            log.info("step %d/%d  checkpoint %s %s: training waited %.2f s", self.step, self.cfg.train.max_steps,
                     tag_dir.name, "staged, writing in the background" if background is not None else "saved", stall)
        return tag_dir


def train(cfg: Config, env: DistributedEnv, stop_flag: StopFlag | None = None, checked: Preflight | None = None) -> int:
    trainer = Trainer(cfg, env, stop_flag, checked)
    trainer.build()
    return trainer.run()

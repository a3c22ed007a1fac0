"""The step loop: data -> DeepSpeed engine -> metrics, with evaluation, checkpoints and stop signals.

Every rank runs the same number of micro-steps and the same collectives in the same order; the
only per-step agreement is one small all-reduce that carries "my loss is not finite", "I got a
stop signal" and "I skipped this many bad samples", so that all ranks skip, stop or count together.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import checkpoint
from pipeline.compiling import compile_layers, compile_summary
from pipeline.config import Config, dump_config
from pipeline.data import LedgerWriter, build_eval_loader, build_train_loader
from pipeline.data.worker import start_worker_server
from pipeline.distributed.engine import autocast_context, build_engine, device_for
from pipeline.distributed.env import DistributedEnv
from pipeline.heap import keep_heap
from pipeline.metrics import ProgressBar, build_metrics_writer, device_peak_flops
from pipeline.model import build_model, vit_flops
from pipeline.optim import apply_current_schedule, build_optimizer, build_scheduler
from pipeline.preemption import EXIT_PREEMPTED, StopFlag

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses, too much bad data); the message says why."""


def rng_state() -> dict[str, Any]:
    """This rank's random generators, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Agreement:
    """What all ranks agreed on after one micro-step."""

    nonfinite: bool
    stop: bool
    skipped: int


class Trainer:
    def __init__(self, cfg: Config, env: DistributedEnv, stop_flag: StopFlag | None = None):
        self.cfg, self.env = cfg, env
        self.device = device_for(env)
        if self.device.type == "cpu":
            keep_heap()  # no caching allocator on the CPU: reuse freed memory across steps (heap.py)
        self.output_dir = Path(cfg.train.output_dir)
        self.step = 0
        self.nonfinite_steps = 0
        self.data_skipped = 0
        self.stop_flag = stop_flag or StopFlag()

    # ----------------------------------------------------------------------------- building
    def build(self) -> None:
        cfg, env = self.cfg, self.env
        self.stop_flag.install()  # early: a signal while building (e.g. a long load) must not kill the job
        start_worker_server(cfg.data.num_workers)  # its imports overlap with building the engine
        resume_dir = checkpoint.resolve_resume(cfg.checkpoint.resume, self.output_dir,
                                               overwrite=cfg.checkpoint.overwrite)
        self.plan = checkpoint.plan_resume(resume_dir, model_config=_model_dict(cfg), world_size=env.world_size,
                                           zero_stage=cfg.train.zero_stage)
        if env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
            if cfg.checkpoint.resume == "none" and cfg.checkpoint.overwrite:
                checkpoint.start_over(self.output_dir)
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        if cfg.train.compile:
            log.info("torch.compile: compiling %d encoder layers (the first step takes longer)",
                     compile_layers(model))
        image_hw, channels = cfg.model.image_hw, cfg.model.num_channels
        self.train_loader = build_train_loader(cfg.data, image_size=image_hw, num_channels=channels,
                                               seed=cfg.train.seed, rank=env.rank, world_size=env.world_size,
                                               pin_memory=self.device.type == "cuda")
        self.eval_loader = None
        if cfg.data.val_shards:
            self.eval_loader = build_eval_loader(cfg.data, image_size=image_hw, num_channels=channels,
                                                 rank=env.rank, world_size=env.world_size)
        if self.plan is not None and self.plan.universal:
            cfg.deepspeed = {**cfg.deepspeed, "checkpoint": {**cfg.deepspeed.get("checkpoint", {}),
                                                             "load_universal": True}}
        parts = build_engine(model, cfg, world_size=env.world_size,
                             optimizer_factory=lambda m: build_optimizer(m, cfg.optim),
                             scheduler_factory=lambda opt: build_scheduler(opt, cfg.optim, cfg.train.max_steps))
        self.engine = parts.engine
        matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
        # Inputs follow the engine's weights; under autocast (bf16 at ZeRO-0) the weights stay fp32.
        engine_low_precision = parts.ds_config["bf16"]["enabled"] or parts.ds_config["fp16"]["enabled"]
        self.compute_dtype = matmul_dtype if engine_low_precision else torch.float32
        self.flops_per_step = vit_flops(cfg.model, cfg.data.batch_size * cfg.train.grad_accum_steps) * env.world_size
        self.peak_flops = device_peak_flops(self.device, matmul_dtype) * env.world_size
        # Lines after the resumed step were written by an interrupted run and never became a checkpoint.
        self.ledger = (LedgerWriter(self.output_dir, env.rank, resume_step=self.plan.step if self.plan else 0)
                       if cfg.data.ledger else None)
        if self.plan is not None:
            self._restore()
        if self.plan is None:
            seed_everything(cfg.train.seed * 100003 + env.rank)  # per-rank streams for dropout and the like

    def _restore(self) -> None:
        plan = self.plan
        if plan.universal:
            log.info("resuming %s on a different world size (%s -> %d): converting through DeepSpeed's "
                     "universal checkpoint", plan.tag_dir.name, plan.marker.get("world_size"), self.env.world_size)
        state = checkpoint.load(self.engine, plan, output_dir=self.output_dir)
        apply_current_schedule(self.engine.lr_scheduler, self.cfg.optim)
        self.step = int(state["step"])
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.data_skipped = int(state.get("data_skipped", 0))
        ranks = state["ranks"]
        mine = ranks[self.env.rank] if len(ranks) == self.env.world_size else None
        if mine is not None:
            self.train_loader.set_state(mine["loader"])
            set_rng_state(mine["rng"])
        else:  # another world size: the loader restarts at the next epoch and says what it skipped
            self.train_loader.set_state(ranks[0]["loader"])
            seed_everything(self.cfg.train.seed * 100003 + self.env.rank + self.step)
        log.info("resumed from %s at step %d", plan.tag_dir, self.step)

    # ----------------------------------------------------------------------------- the loop
    def run(self) -> int:
        """Train to ``train.max_steps``; 0 when done, EXIT_PREEMPTED after a stop signal."""
        cfg = self.cfg
        # Rows after the step we start from belong to an interrupted or overwritten run: dropped.
        writer = build_metrics_writer(self.output_dir, rank=self.env.rank, resume_step=self.step)
        bar = ProgressBar(cfg.train.max_steps, initial=self.step, enabled=self.env.is_main and cfg.train.progress_bar)
        try:
            return self._loop(writer, bar)
        finally:
            self.train_loader.close()  # stop the workers before the process group goes away
            checkpoint.wait_for_prune()  # the run ends with keep_last checkpoints, not more
            bar.close()
            writer.close()
            if self.ledger is not None:
                self.ledger.close()
            # Done (or stopped and saved): from here on the process only exits, and a late signal
            # (torchrun stopping the others once one rank exited 75) must not change its exit code.
            self.stop_flag.ignore_from_now_on()

    def _loop(self, writer, bar) -> int:
        cfg = self.cfg
        batches = iter(self.train_loader)
        window = _Window()
        compile_reported = not cfg.train.compile
        self.engine.train()
        while self.step < cfg.train.max_steps:
            step_start = time.perf_counter()
            keys: list[str] = []
            stop = False
            micro = 0
            while micro < cfg.train.grad_accum_steps:
                wait_start = time.perf_counter()
                batch = next(batches)
                window.data_wait += time.perf_counter() - wait_start
                keys.extend(batch["key"])
                loss = self._forward(batch)
                agreed = self._agree(loss, batch["skipped"])
                self.data_skipped += agreed.skipped
                stop = stop or agreed.stop
                if agreed.nonfinite:
                    self._on_nonfinite(loss)
                    continue  # no backward, no engine.step: the accumulation window takes the next batch
                self.engine.backward(loss)
                last_micro = micro == cfg.train.grad_accum_steps - 1
                if cfg.train.zero_stage == 0 and last_micro and self._logs(self.step + 1):
                    window.grad_norm = self._stage0_grad_norm()  # a pass over every gradient: only when logged
                self.engine.step()
                window.add_loss(loss.detach())
                micro += 1
            self.step += 1
            if not compile_reported:
                log.info("torch.compile after the first step: %s", compile_summary())
                compile_reported = True
            window.steps += 1
            window.elapsed += time.perf_counter() - step_start
            if self.ledger is not None:
                self.ledger.write(self.step, keys)
            last_loss = window.last_loss
            if self._logs(self.step):
                self._log_train(writer, window, batch["epoch"])
                window = _Window()
            bar.update(self.step, loss=last_loss, lr=self._lr())
            if stop and self.step < cfg.train.max_steps:  # at the last step: just finish (exit 0)
                self.save()  # first: the time between the warning and the kill is short
                log.warning("stopped by %s at step %d; checkpoint saved, exiting %d so the job is requeued",
                            self.stop_flag.signal_name or "a signal on another rank", self.step, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.max_steps:
                self.evaluate(writer)
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0 and self.step < cfg.train.max_steps:
                self.save()
        self.evaluate(writer)
        self.save()
        return 0

    def _logs(self, step: int) -> bool:
        """Whether a metrics row is written after ``step``."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _forward(self, batch: dict) -> torch.Tensor:
        images = batch["image"].to(self.device, dtype=self.compute_dtype, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        with autocast_context(self.cfg, self.device):
            logits = self.engine(images).logits
        # The loss in fp32 whatever the compute precision: bf16 log-softmax loses the small terms.
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.train.label_smoothing)

    def _agree(self, loss: torch.Tensor, skipped: int) -> Agreement:
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self.stop_flag.requested), device=loss.device),
                             torch.tensor(float(skipped), device=loss.device)])
        dist.all_reduce(flags)  # sum: any rank's flag counts for all
        nonfinite, stop, skipped_all = flags.tolist()
        return Agreement(nonfinite=nonfinite > 0, stop=stop > 0, skipped=int(skipped_all))

    def _on_nonfinite(self, loss: torch.Tensor) -> None:
        self.nonfinite_steps += 1
        limit = self.cfg.train.max_nonfinite_steps
        message = (f"non-finite loss ({loss.item()} on rank {self.env.rank}) at step {self.step + 1}; "
                   f"{self.nonfinite_steps} such micro-batches so far, train.max_nonfinite_steps={limit}")
        if self.nonfinite_steps > limit:
            raise TrainingError(message + "; lower optim.lr, raise optim.warmup_steps, check the data, or use "
                                "train.precision=bf16/fp32 instead of fp16")
        log.warning("%s: skipping this micro-batch", message)

    def _stage0_grad_norm(self) -> float:
        """DeepSpeed reports no global gradient norm at ZeRO-0 with a client optimizer; there every
        rank holds the full, already averaged gradients after the last backward of the step."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _log_train(self, writer, window: "_Window", epoch: int) -> None:
        cfg, env = self.cfg, self.env
        loss_sum = torch.tensor([window.loss_sum, float(window.loss_count)], dtype=torch.float64)
        dist.all_reduce(loss_sum)
        images = window.steps * cfg.data.batch_size * cfg.train.grad_accum_steps * env.world_size
        step_time = window.elapsed / max(1, window.steps)
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = window.grad_norm
        metrics = {
            "epoch": epoch,
            "loss": (loss_sum[0] / loss_sum[1]).item() if loss_sum[1] > 0 else float("nan"),
            "lr": self._lr(),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "samples_per_s": images / window.elapsed if window.elapsed > 0 else 0.0,
            "data_wait_fraction": window.data_wait / window.elapsed if window.elapsed > 0 else 0.0,
            "step_time_s": step_time,
            "mfu": self.flops_per_step / step_time / self.peak_flops if step_time > 0 else 0.0,
            "data_skipped": self.data_skipped,
            "nonfinite_steps": self.nonfinite_steps,
        }
        writer.log(metrics, self.step)

    @torch.no_grad()
    def evaluate(self, writer) -> dict[str, float] | None:
        """Top-1/top-5 and loss over the whole validation set, exact across ranks."""
        if self.eval_loader is None:
            return None
        self.engine.eval()
        totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
        for batch in self.eval_loader:
            images = batch["image"].to(self.device, dtype=self.compute_dtype, non_blocking=True)
            labels = batch["label"].to(self.device)
            valid = batch["valid"].to(self.device)
            with autocast_context(self.cfg, self.device):
                logits = self.engine(images).logits.float()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (batch, 5)
            hits = top == labels[:, None]
            losses = F.cross_entropy(logits, labels, reduction="none")
            totals += torch.stack([(hits[:, 0] & valid).sum(), (hits.any(-1) & valid).sum(),
                                   (losses * valid).sum(), valid.sum()]).double().cpu()
        dist.all_reduce(totals)
        self.engine.train()
        count = max(1.0, totals[3].item())
        metrics = {"val_top1": totals[0].item() / count, "val_top5": totals[1].item() / count,
                   "val_loss": totals[2].item() / count, "val_samples": int(totals[3].item())}
        writer.log(metrics, self.step)
        log.info("step %d: val_top1 %.4f val_top5 %.4f val_loss %.4f (%d samples)", self.step,
                 metrics["val_top1"], metrics["val_top5"], metrics["val_loss"], metrics["val_samples"])
        self.last_eval = metrics
        return metrics

    def save(self) -> Path:
        per_rank = {"loader": self.train_loader.state_dict(), "rng": rng_state()}
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, per_rank)
        client_state = {"step": self.step, "ranks": gathered, "nonfinite_steps": self.nonfinite_steps,
                        "data_skipped": self.data_skipped, "config_hash": self.cfg.hash()}
        marker = {"world_size": self.env.world_size, "zero_stage": self.cfg.train.zero_stage,
                  "precision": self.cfg.train.precision, "config_hash": self.cfg.hash(),
                  "model": _model_dict(self.cfg)}
        return checkpoint.save(self.engine, output_dir=self.output_dir, step=self.step, client_state=client_state,
                               marker_info=marker, keep_last=self.cfg.checkpoint.keep_last, rank=self.env.rank,
                               resumed_from=self.plan.tag_dir if self.plan is not None else None)


class _Window:
    """Accumulates figures between two metrics rows; losses stay on device until logged."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.loss_count = 0
        self.last_loss = float("nan")
        self.grad_norm: float | None = None  # pre-clipping, last step of the window (ZeRO-0 only)
        self.steps = 0
        self.elapsed = 0.0
        self.data_wait = 0.0

    def add_loss(self, loss: torch.Tensor) -> None:
        value = loss.item()
        self.loss_sum += value
        self.loss_count += 1
        self.last_loss = value


def _model_dict(cfg: Config) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg.model)


def train(cfg: Config, env: DistributedEnv, stop_flag: StopFlag | None = None) -> int:
    trainer = Trainer(cfg, env, stop_flag)
    trainer.build()
    return trainer.run()


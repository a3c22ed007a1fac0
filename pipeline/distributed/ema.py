"""An exponential moving average (EMA) of the weights, in fp32, kept beside DeepSpeed's engine.

What is averaged is what the optimizer updates, the fp32 master weights, and each rank averages
only the part it owns: at ZeRO-0 the module's (fp32) parameters, at ZeRO 1-2 the optimizer's flat
fp32 partitions (``single_partition_of_fp32_groups``), at ZeRO-3 its flat fp32 partitions
(``fp32_partitioned_groups_flat``). An EMA is elementwise, so the slices of a partitioned average
are exactly the slices of the whole model's average, and it costs 1/world of an fp32 copy per rank.

The semantics are timm's ``ModelEmaV3`` as timm's train.py drives it (``update(model,
step=num_updates)``): after optimizer step ``step`` (1-based, DeepSpeed's ``global_steps``) the
average moves towards the weights by ``1 - decay(step)``; decay(1) is 0 (the first update copies
the weights), and with ``warmup`` the decay rises as ``1 - (1 + step - 1) ** -2/3`` up to
``train.ema_decay``. A step the optimizer skipped (non-finite gradients) leaves the average alone:
at ZeRO-0 the skip flag is the train step's ``found_inf`` on the device, which zeroes the update's
weight there; at ZeRO 1-3 it is DeepSpeed's own ``overflow``, a host bool it has already read.

Checkpoints carry the average as the optimizer state ``"ema"`` of each flat partition (ZeRO 1-3:
every rank's own, in its optimizer shard) or in the client state (ZeRO-0: every rank's is the
same), only while the engine saves. On another world size it is rebuilt from the whole tensors
(``load_full``), which ``pipeline.checkpoint.export`` consolidates from the old shards.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

EMA_KEY = "ema"  # in the optimizer state of each flat fp32 partition (ZeRO 1-3), or the client state (ZeRO-0)
WARMUP_GAMMA, WARMUP_POWER = 1.0, 2 / 3  # timm's ModelEmaV3 defaults, which its train.py keeps
_SWAP_CHUNK = 1 << 20  # elements: swapping in pieces keeps the transient copy small


def build_ema(engine: Any, train: TrainConfig) -> WeightEma | None:
    """The average of ``engine``'s weights when ``train.ema_decay`` is set, else None."""
    if not train.ema_decay:
        return None
    ema = WeightEma(engine, decay=train.ema_decay, warmup=train.ema_warmup)
    log.info("EMA of the weights: decay %g%s, %.1f MiB fp32 on this rank", train.ema_decay,
             " with warmup" if train.ema_warmup else "", ema.nbytes() / 2**20)
    return ema


def decay_at(step: int, decay: float, *, warmup: bool) -> float:
    """timm's ``ModelEmaV3.get_decay(step)`` (update_after_step 0, min_decay 0, gamma 1, power 2/3)."""
    updates = step - 1
    if updates <= 0:
        return 0.0  # the first update copies the weights
    if not warmup:
        return decay
    return max(min(1 - (1 + updates / WARMUP_GAMMA) ** -WARMUP_POWER, decay), 0.0)


def _swap_(a: Tensor, b: Tensor) -> None:
    """Exchange the values of two equally shaped fp32 tensors, a piece at a time."""
    a, b = a.view(-1), b.view(-1)
    for start in range(0, a.numel(), _SWAP_CHUNK):
        x, y = a[start:start + _SWAP_CHUNK], b[start:start + _SWAP_CHUNK]
        kept = x.clone()
        x.copy_(y)
        y.copy_(kept)


class WeightEma:
    def __init__(self, engine: Any, *, decay: float, warmup: bool = False):
        self.engine, self.decay, self.warmup = engine, decay, warmup
        self.stage = int(engine.zero_optimization_stage())
        self._check_optimizer()
        with torch.no_grad():
            self.average = [m.detach().clone() for m in self.masters()]

    def _check_optimizer(self) -> None:
        optimizer = self.engine.optimizer
        needs = {0: None, 1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups",
                 3: "fp32_partitioned_groups_flat"}[self.stage]
        if needs is not None and not hasattr(optimizer, needs):
            raise ConfigError(f"train.ema_decay: ZeRO-{self.stage} runs {type(optimizer).__name__} here, whose fp32 "
                              "partitions the EMA does not know (e.g. bf16 ZeRO-1 with fp32 gradient accumulation); "
                              "use another train.zero_stage or set train.ema_decay=0")
        if self.stage == 3 and getattr(optimizer, "swap_optimizer", False):
            raise ConfigError("train.ema_decay does not follow ZeRO-3's NVMe optimizer swapping; turn one of them off")
        if any(m.dtype != torch.float32 for m in self.masters()):
            raise ConfigError("train.ema_decay needs fp32 master weights; use train.precision=bf16 or fp32")

    def masters(self) -> list[Tensor]:
        """The fp32 tensors the optimizer updates, this rank's part only."""
        optimizer = self.engine.optimizer
        if self.stage == 0:
            return [p.data for p in self.engine.module.parameters()]
        if self.stage in (1, 2):
            return list(optimizer.single_partition_of_fp32_groups)
        return list(optimizer.fp32_partitioned_groups_flat)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.average)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based); reads nothing from the device."""
        weight = 1.0 - decay_at(step, self.decay, warmup=self.warmup)
        masters = self.masters()
        if self.stage == 0:
            found_inf = getattr(self.engine.optimizer, "found_inf", None)
            if isinstance(found_inf, Tensor):  # the train step's skip flag: weight 0 on a skipped step
                # A tensor given as the one Scalar weight would be read on the host (.item()): one
                # 0-dim weight per tensor instead, which lerp broadcasts on the device.
                on_device = (1.0 - found_inf) * weight
                torch._foreach_lerp_(self.average, masters, [on_device] * len(masters))
                return
        elif self.engine.optimizer.overflow:
            return
        torch._foreach_lerp_(self.average, masters, weight)

    # Evaluation -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def in_model(self) -> Iterator[None]:
        """Within this block the engine's model computes with the average (every rank enters it).

        The weights the forward reads are written from the average and, after, from the master
        they always equal (the optimizer writes them from it after every step), so training goes
        on bitwise as without the block. Where the weights are the master itself (ZeRO-0, fp32
        ZeRO-3), the two are exchanged and exchanged back. At ZeRO-3 nothing is gathered here:
        the forward gathers each layer from the partitions as it always does (what
        ``GatheredParameters`` does for one module), and the parameters ZeRO-3 keeps whole on
        every rank (the small, "persistent" ones) are partitioned and gathered again, as around
        DeepSpeed's step and its checkpoints.
        """
        self._into_model(self.average)
        try:
            yield
        finally:
            self._into_model(None)

    @torch.no_grad()
    def _into_model(self, average: list[Tensor] | None) -> None:
        optimizer, masters = self.engine.optimizer, self.masters()
        if self.stage == 0:
            for weights, kept in zip(masters, self.average):
                _swap_(weights, kept)
        elif self.stage in (1, 2):
            if average is None:
                optimizer.update_lp_params()  # DeepSpeed's own: the masters into the 16-bit copy, gathered
                return
            from deepspeed.runtime.utils import all_gather_dp_groups

            for i, values in enumerate(average):
                rank = dist.get_rank(group=optimizer.real_dp_process_group[i])
                optimizer.parallel_partitioned_bit16_groups[i][rank].data.copy_(values)
            all_gather_dp_groups(groups_flat=optimizer.bit16_groups_flat,
                                 partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
                                 dp_process_group=optimizer.real_dp_process_group,
                                 start_alignment_factor=optimizer.nccl_start_alignment_factor,
                                 allgather_bucket_size=optimizer.allgather_bucket_size)
        else:
            # What DeepSpeed does around its step and its checkpoints: every parameter back to its
            # partition (the persistent ones too), then the persistent ones gathered again.
            optimizer.checkpoint_event_prologue()
            for weights, master, kept in zip(optimizer.fp16_partitioned_groups_flat, masters, self.average):
                if weights.data_ptr() == master.data_ptr():  # fp32: the master is the weights' partition
                    _swap_(weights, kept)
                else:
                    weights.copy_(kept if average is not None else master)
            optimizer.checkpoint_event_epilogue()

    # Checkpoints ------------------------------------------------------------------------------

    def _optimizer_states(self) -> list[dict]:
        base = self.engine.optimizer.optimizer  # DeepSpeed's ZeRO optimizer wraps torch's
        return [base.state[master] for master in self.masters()]

    def _names(self) -> list[str]:
        return [name for name, _ in self.engine.module.named_parameters()]

    @contextlib.contextmanager
    def saved_with(self, client_state: dict) -> Iterator[None]:
        """Around ``engine.save_checkpoint(client_state=...)``: the average goes into the checkpoint."""
        if self.stage == 0:
            client_state[EMA_KEY] = dict(zip(self._names(), self.average))
            try:
                yield
            finally:
                client_state.pop(EMA_KEY, None)
            return
        states = self._optimizer_states()
        for state, values in zip(states, self.average):
            state[EMA_KEY] = values
        try:
            yield
        finally:
            for state in states:
                state.pop(EMA_KEY, None)

    @torch.no_grad()
    def restore(self, client_state: dict) -> bool:
        """After ``engine.load_checkpoint`` on the world size it was saved with: take the saved
        average out of the loaded state (bitwise). False when the checkpoint has none."""
        if self.stage == 0:
            saved = client_state.pop(EMA_KEY, None)
            if saved is None:
                return False
            for name, values in zip(self._names(), self.average):
                values.copy_(saved[name])
            return True
        found = [state.pop(EMA_KEY, None) for state in self._optimizer_states()]
        if any(f is None for f in found):
            return False
        for values, saved in zip(self.average, found):
            values.copy_(saved)
        return True

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average over from the current weights (a checkpoint without one)."""
        for values, master in zip(self.average, self.masters()):
            values.copy_(master)

    def _fragments(self, index: int, param: torch.nn.Parameter) -> list[tuple[int, int, int, int]]:
        """Where this rank's part of ``param`` sits: (average tensor, offset in it, offset in the
        flattened parameter, element count)."""
        if self.stage == 0:
            return [(index, 0, 0, param.numel())]
        if self.stage in (1, 2):
            mapping = getattr(param, "_hp_mapping", None)  # DeepSpeed's link of a parameter to its fp32 fragment
            if mapping is None:
                return []  # none of this parameter lives in this rank's partition
            return [(mapping.param_group_index, mapping.hp_fragment_address.start,
                     mapping.lp_fragment_address.start, mapping.hp_fragment_address.numel)]
        optimizer = self.engine.optimizer
        group, offset, _ = optimizer.grad_position[optimizer.get_param_id(param)]
        part = param.ds_tensor.ds_numel  # every rank holds ceil(numel / world) of it, the last one padded
        start = dist.get_rank(group=optimizer.dp_process_group) * part
        count = max(0, min(part, param.ds_numel - start))
        return [(group, offset, start, count)] if count else []

    @torch.no_grad()
    def load_full(self, full: dict[str, Tensor]) -> None:
        """The average from whole tensors by parameter name (a checkpoint of another world size,
        consolidated): each rank copies the slices it owns."""
        missing = [name for name in self._names() if name not in full]
        if missing:
            raise ValueError(f"the saved EMA lacks {missing[:3]}")
        for index, (name, param) in enumerate(self.engine.module.named_parameters()):
            source = full[name].reshape(-1)
            for tensor, offset, start, count in self._fragments(index, param):
                self.average[tensor].view(-1).narrow(0, offset, count).copy_(source.narrow(0, start, count))

    @torch.no_grad()
    def gathered(self) -> dict[str, Tensor]:
        """The whole average by parameter name on every rank (an all-reduce of each rank's slices)."""
        out = {}
        device = self.average[0].device
        for index, (name, param) in enumerate(self.engine.module.named_parameters()):
            shape = param.ds_shape if self.stage == 3 else param.shape
            whole = torch.zeros(shape, dtype=torch.float32, device=device)
            for tensor, offset, start, count in self._fragments(index, param):
                whole.view(-1).narrow(0, start, count).copy_(self.average[tensor].view(-1).narrow(0, offset, count))
            if self.stage > 0:
                dist.all_reduce(whole, group=self.engine.optimizer.dp_process_group)
            out[name] = whole
        return out


def discard_saved(engine: Any, client_state: dict) -> None:
    """A checkpoint's average when this run keeps none: dropped, so that it is not saved again stale."""
    client_state.pop(EMA_KEY, None)
    base = getattr(engine.optimizer, "optimizer", None)
    for state in getattr(base, "state", {}).values():
        if isinstance(state, dict):
            state.pop(EMA_KEY, None)

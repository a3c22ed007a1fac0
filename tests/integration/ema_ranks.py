"""The EMA of each rank's partition against timm's ModelEmaV3 of the whole model, at ZeRO 0-3.

    torchrun --nproc_per_node=2 tests/integration/ema_ranks.py OUT_DIR

Per stage, one engine trains the tiny ViT 20 steps in fp32 through the trainer's own TrainStep,
step 7 on a non-finite batch (skipped by the optimizer). After every step the whole fp32 weights
are gathered (DeepSpeed's ``safe_get_full_fp32_param``) into a plain model, and timm's
ModelEmaV3 is updated from it, except after the skipped step. Then each rank writes to
``OUT_DIR/rank<R>.json``, per stage: whether the gathered partition EMA equals timm's bitwise;
the logits of the engine inside ``WeightEma.in_model`` against timm's EMA model; whether the
weights and logits after that block are bitwise those before; the checkpoint round trip (saved,
consolidated by the exporter, restored: bitwise); and the previous stage's consolidated EMA laid
out onto this stage's partitions (``load_full``, another layout: bitwise).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY  # noqa: E402
from pipeline.checkpoint.export import consolidated_state_dict  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.distributed.ema import build_ema  # noqa: E402
from pipeline.distributed.engine import build_engine, destroy_process_group, init_process_group  # noqa: E402
from pipeline.distributed.env import resolve_env  # noqa: E402
from pipeline.model import build_model  # noqa: E402
from pipeline.tasks import ClassificationTask  # noqa: E402
from pipeline.train_step import TrainStep  # noqa: E402

STEPS, SKIPPED, DECAY = 20, 7, 0.8


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    if stage == 0:
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_stage(stage: int, rank: int, out: Path, previous: dict | None) -> tuple[dict, dict]:
    from timm.utils import ModelEmaV3

    warmup = stage in (1, 3)
    cfg = load_config(None, [*TINY, "data.train_shards=unused.tar", "train.precision=fp32", f"train.zero_stage={stage}",
                             f"train.ema_decay={DECAY}", f"train.ema_warmup={str(warmup).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    reference = copy.deepcopy(model).eval()
    engine = build_engine(model, cfg, world_size=2)
    ema = build_ema(engine, cfg.train)
    result: dict = {"ema_bytes": ema.nbytes(), "param_bytes": 4 * sum(p.numel() for p in reference.parameters())}
    if previous is not None:  # another layout's consolidated EMA, laid out onto these partitions
        ema.load_full(previous)
        result["load_full_equal"] = same(ema.gathered(), previous)
        ema.reset()
    timm_ema = ModelEmaV3(reference, decay=DECAY, use_warmup=warmup)
    train_step = TrainStep(engine, ClassificationTask(), cfg, torch.device("cpu"), ema=ema)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(1, STEPS + 1):
        images = torch.randn(16, 1, 16, 16, generator=g)
        if step == SKIPPED:
            images[0] = float("nan")
            before = full_weights(engine, stage)
        train_step.run([{"image": images, "label": torch.randint(0, 10, (16,), generator=g)}])
        weights = full_weights(engine, stage)
        if step == SKIPPED:
            result["skipped_step_left_weights"] = same(before, weights)
            continue
        reference.load_state_dict(weights)
        timm_ema.update(reference, step=step)
    averaged = ema.gathered()
    expected = {k: v for k, v in timm_ema.module.state_dict().items() if k in averaged}
    result["equal_to_timm"] = same(averaged, expected)
    result["max_abs_diff_to_timm"] = max((averaged[k] - expected[k]).abs().max().item() for k in expected)

    engine.eval()
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits_before, weights_before = engine(images).logits, full_weights(engine, stage)
        with ema.in_model():
            logits_ema = engine(images).logits
        logits_after, weights_after = engine(images).logits, full_weights(engine, stage)
        logits_timm = timm_ema.module(images).logits
    result["in_model_max_abs_diff"] = (logits_ema - logits_timm).abs().max().item()
    result["restored_bitwise"] = torch.equal(logits_before, logits_after) and same(weights_before, weights_after)

    client_state: dict = {"step": STEPS}
    with ema.saved_with(client_state):
        engine.save_checkpoint(str(out / f"zero{stage}"), tag="step", client_state=client_state, save_latest=False)
    torch.distributed.barrier()
    consolidated = consolidated_state_dict(out / f"zero{stage}" / "step", stage, ema=True)
    result["consolidated_equal"] = same(consolidated, averaged)
    ema.reset()  # forget it: the load must bring it back
    _, loaded = engine.load_checkpoint(str(out / f"zero{stage}"), tag="step")
    result["restored_from_checkpoint"] = ema.restore(loaded) and same(ema.gathered(), averaged)
    return result, consolidated


def main() -> int:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(sys.argv[1])
    env = resolve_env()
    init_process_group(env, timeout_s=120)
    try:
        results, previous = {}, None
        for stage in [int(s) for s in sys.argv[2:]] or (0, 1, 2, 3):
            results[f"zero{stage}"], previous = run_stage(stage, env.rank, out, previous)
        (out / f"rank{env.rank}.json").write_text(json.dumps(results, indent=1))
    finally:
        destroy_process_group(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

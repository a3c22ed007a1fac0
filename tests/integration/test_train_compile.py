"""train.compile=true: per-layer torch.compile (inductor, a real C++ build on CPU) trains like eager."""
from __future__ import annotations

from conftest import metrics, run_env, shard_overrides, torchrun

BF16_TOLERANCE = 0.02  # per-step loss difference allowed between compiled and eager bf16 kernels


def test_compiled_layers_train_like_eager(tmp_path, digits_shards):
    """The demo's set-up (bf16, ZeRO-2, checkpointing every layer), 6 steps each way."""
    train_only = [o for o in shard_overrides(digits_shards) if not o.startswith("data.val_shards=")]
    common = [*train_only, "data.val_shards=null", "train.max_steps=6", "train.log_every=1",
              "train.eval_every=0", "checkpoint.every_steps=0"]
    # A fresh inductor cache: the compiled run really compiles instead of loading earlier code.
    env = {**run_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")}
    losses, logs = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        done = torchrun(1, [*common, f"train.compile={str(compiled).lower()}", f"train.output_dir={out}"],
                        env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        losses[compiled], logs[compiled] = [row["loss"] for row in metrics(out)[0]], done.stdout + done.stderr
    assert "torch.compile after the first step: 1 graph(s) compiled, 0 graph break(s)" in logs[True]
    assert "torch.compile" not in logs[False]
    assert len(losses[True]) == len(losses[False]) == 6
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < BF16_TOLERANCE

"""Checkpoint bookkeeping without training: markers, the latest pointer, pruning, interrupted
saves and removals, resume planning, stop signals, and weights-only reading for export."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import saving as checkpoint_saving
from pipeline.tasks import ClassificationTask
from pipeline.checkpoint import COMPLETE, CheckpointError
from pipeline.config import ModelConfig
from pipeline.preemption import StopFlag

SHAPE = ClassificationTask.shape_fields  # what the classification task's checkpoints must match

MODEL = {"size": "tiny", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 256, "image_size": 16, "patch_size": 4, "num_channels": 1, "num_labels": 10,
         "hidden_dropout_prob": 0.0, "activation_checkpointing": "none", "hidden_act": "gelu"}


def make(root: Path, step: int, *, complete: bool = True, world_size: int = 2, stage: int = 2) -> Path:
    tag = root / f"step-{step}"
    tag.mkdir(parents=True, exist_ok=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        ckpt.write_marker(tag, {"step": step, "world_size": world_size, "zero_stage": stage, "model": MODEL})
    return tag


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_only_complete_checkpoints_count_in_step_order(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (9, 10, 2):
        make(root, step)
    make(root, 11, complete=False)  # killed mid-save: never a candidate
    (root / "step-12_universal").mkdir()
    (root / "notes").mkdir()
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-2", "step-9", "step-10"]
    assert ckpt.resolve_resume("auto", tmp_path, overwrite=False) == root / "step-10"
    assert ckpt.resolve_resume("auto", tmp_path / "fresh", overwrite=False) is None


def test_resume_none_refuses_an_existing_run_unless_overwrite(tmp_path):
    make(tmp_path / "checkpoints", 4)
    with pytest.raises(CheckpointError, match="checkpoint.overwrite=true") as error:
        ckpt.resolve_resume("none", tmp_path, overwrite=False)
    assert "\n" not in str(error.value)
    assert ckpt.resolve_resume("none", tmp_path, overwrite=True) is None
    assert ckpt.resolve_resume("none", tmp_path / "empty", overwrite=False) is None


def test_resume_path_takes_a_step_dir_or_the_newest_of_a_run(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 4), make(root, 8), make(root, 12, complete=False)
    assert ckpt.resolve_resume(str(root / "step-4"), "elsewhere", overwrite=False) == root / "step-4"
    assert ckpt.resolve_resume(str(tmp_path), "elsewhere", overwrite=False) == root / "step-8"
    assert ckpt.resolve_resume(str(root), "elsewhere", overwrite=False) == root / "step-8"
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.resolve_resume(str(root / "step-12"), "elsewhere", overwrite=False)
    with pytest.raises(CheckpointError, match="no such path"):
        ckpt.resolve_resume(str(tmp_path / "nope"), "elsewhere", overwrite=False)
    other = make(tmp_path / "other" / "checkpoints", 1, complete=False).parents[1]
    with pytest.raises(CheckpointError, match="no complete step-N"):
        ckpt.resolve_resume(str(other), "elsewhere", overwrite=False)


def test_unreadable_marker_is_a_checkpoint_error(tmp_path):
    tag = make(tmp_path, 3)
    (tag / COMPLETE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable COMPLETE"):
        ckpt.read_marker(tag)


def test_prune_keeps_the_last_n_and_drops_older_incomplete_ones(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        make(root, step)
    (root / "step-1_universal").mkdir()
    ckpt.write_marker(root / "step-1_universal", {"step": 1})
    make(root, 0, complete=False)  # an interrupted save older than the newest complete one
    make(root, 6, complete=False)  # newer than every complete one: maybe still being written
    (root / ".latest.tmp123").write_text("step-")  # a pointer write cut short
    (root / "latest").write_text("step-5\n")
    with caplog.at_level(logging.INFO, logger="pipeline.checkpoint"):
        ckpt.prune(root, keep_last=2)
    assert names(root) == ["latest", "step-4", "step-5", "step-6"]
    assert "removing incomplete checkpoint step-0" in caplog.text
    ckpt.prune(root, keep_last=2)  # idempotent
    assert names(root) == ["latest", "step-4", "step-5", "step-6"]


def test_latest_pointer_is_replaced_atomically(tmp_path, monkeypatch):
    root = tmp_path
    ckpt.point_latest(root, "step-4")
    assert (root / "latest").read_text() == "step-4\n"

    def crash(*args):  # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.point_latest(root, "step-8")
    assert (root / "latest").read_text() == "step-4\n"  # never a half-written pointer
    monkeypatch.undo()
    make(root, 8)
    ckpt.prune(root, keep_last=1)
    assert not list(root.glob(".latest.tmp*"))  # the leftover goes with the next prune
    ckpt.point_latest(root, "step-8")
    assert (root / "latest").read_text() == "step-8\n"


def test_an_interrupted_removal_leaves_an_incomplete_dir_not_a_broken_complete_one(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    old, new = make(root, 1), make(root, 2)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # killed before any file went
    ckpt.prune(root, keep_last=1)
    assert old.is_dir() and not (old / COMPLETE).exists()
    assert ckpt.complete_checkpoints(root) == [new]


def test_plan_refuses_another_model_shape_naming_every_field(tmp_path):
    tag = make(tmp_path, 5)
    other = {**MODEL, "hidden_size": 128, "num_labels": 100}
    with pytest.raises(CheckpointError) as error:
        ckpt.plan_resume(tag, model_config=other, zero_stage=2, world_size=2, shape_fields=SHAPE)
    message = str(error.value)
    assert "model.hidden_size (checkpoint 64, config 128)" in message
    assert "model.num_labels (checkpoint 10, config 100)" in message
    assert "\n" not in message and "num_hidden_layers" not in message


def test_plan_allows_non_shape_changes_and_says_so(tmp_path, caplog):
    tag = make(tmp_path, 5)
    changed = {**MODEL, "hidden_dropout_prob": 0.1, "activation_checkpointing": "all", "hidden_act": "relu"}
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        plan = ckpt.plan_resume(tag, model_config=changed, zero_stage=2, world_size=2, shape_fields=SHAPE)
    assert plan.step == 5 and not plan.universal
    assert "hidden_act 'gelu' -> 'relu'" in caplog.text and "dropout" not in caplog.text


def test_plan_uses_universal_only_when_zero_shards_change(tmp_path):
    assert ckpt.plan_resume(make(tmp_path / "a", 5, world_size=2), model_config=MODEL, zero_stage=2,
                            world_size=1, shape_fields=SHAPE).universal
    assert not ckpt.plan_resume(make(tmp_path / "b", 5, world_size=2, stage=0), model_config=MODEL, zero_stage=0,
                                world_size=1, shape_fields=SHAPE).universal  # ZeRO-0: each rank holds all
    with pytest.raises(CheckpointError, match="train.zero_stage=2"):
        ckpt.plan_resume(make(tmp_path / "c", 5, stage=2), model_config=MODEL, zero_stage=3, world_size=2,
                         shape_fields=SHAPE)
    assert ckpt.plan_resume(None, model_config=MODEL, zero_stage=2, world_size=2, shape_fields=SHAPE) is None


class FakeEngine:
    """Writes shards like DeepSpeed's save_checkpoint; can die half-way."""

    def __init__(self, die: bool = False):
        self.die, self.saves = die, 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        self.saves += 1
        target = Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        (target / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100)
        if self.die:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs
        (target / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(client_state))


@pytest.fixture
def no_dist(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)


def save(engine, out: Path, step: int, **kwargs):
    return ckpt.save(engine, output_dir=out, step=step, client_state={"step": step}, keep_last=2, rank=0,
                     marker_info={"world_size": 1, "zero_stage": 2, "model": MODEL}, **kwargs)


def test_save_marks_complete_last_and_moves_latest(tmp_path, no_dist):
    tag = save(FakeEngine(), tmp_path, 4)
    assert json.loads((tag / COMPLETE).read_text())["step"] == 4
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-4\n"
    with pytest.raises(KeyboardInterrupt):
        save(FakeEngine(die=True), tmp_path, 8)  # killed mid-save
    root = tmp_path / "checkpoints"
    assert not (root / "step-8" / COMPLETE).exists() and (root / "latest").read_text() == "step-4\n"
    assert ckpt.resolve_resume("auto", tmp_path, overwrite=False) == root / "step-4"


def test_saving_a_step_again_replaces_partial_and_stale_dirs(tmp_path, no_dist):
    root = tmp_path / "checkpoints"
    partial = make(root, 8, complete=False)
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"stale shard of a 2-rank run")
    (root / "step-8_universal").mkdir()
    save(FakeEngine(), tmp_path, 8)
    assert not (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert not (root / "step-8_universal").exists() and ckpt.is_complete(partial)
    # Another timeline (resumed from an older step) saves step 8 anew; the one resumed from is kept.
    first = (partial / COMPLETE).read_text()
    engine = FakeEngine()
    save(engine, tmp_path, 8, resumed_from=root / "step-4")
    assert engine.saves == 1 and (partial / COMPLETE).read_text() != first
    save(engine, tmp_path, 8, resumed_from=partial)
    assert engine.saves == 1  # nothing trained since that checkpoint was loaded


def test_each_rank_fsyncs_the_files_it_wrote(tmp_path, monkeypatch):
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_12_mp_rank_00_model_states.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    synced = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags: synced.append(Path(path).name) or real_open(path, flags))
    for rank in (0, 1, 12, 5):
        ckpt.fsync_tree(tmp_path, rank)
    files = [n for n in synced if n != tmp_path.name]
    assert sorted(files) == sorted(names)  # each exactly once, by its writer


def test_start_over_drops_the_old_runs_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    make(root, 4), make(root, 8, complete=False), (root / "step-4_universal").mkdir()
    ckpt.point_latest(root, "step-4")
    (root / "zero_to_fp32.py").write_text("# DeepSpeed's script")
    ckpt.start_over(tmp_path)
    assert names(root) == ["zero_to_fp32.py"]


def test_universal_conversion_is_reused_only_for_the_same_save(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    source = make(root, 4)
    target = ckpt.universal_dir(source, root)
    target.mkdir()
    (target / COMPLETE).write_text((source / COMPLETE).read_text())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("converted again"))
    assert ckpt.convert_to_universal(source, root) == target
    ckpt.write_marker(source, {"step": 4, "world_size": 2})  # step-4 was saved anew since

    class Failed:
        returncode, stderr = 1, "Traceback...\nValueError: boom"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(CheckpointError, match="ValueError: boom"):
        ckpt.convert_to_universal(source, root)
    assert not target.exists()  # the stale conversion is gone, not reused


def test_stop_flag_keeps_the_first_signal_and_ignores_the_rest():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    flag = StopFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. torchrun stopping the workers: must not kill us
        assert flag.requested and flag.signal_name == "SIGUSR1"
    finally:
        flag.uninstall()
    assert {sig: signal.getsignal(sig) for sig in before} == before  # what was there before install()


def test_rng_states_round_trip():
    from pipeline.rng import rng_state, set_rng_state

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(pickle.loads(pickle.dumps(state)))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_export_reads_shards_as_weights_only(tmp_path):
    from pipeline.checkpoint.export import consolidated_state_dict

    tag = tmp_path / "step-1"
    tag.mkdir()
    torch.save({"module": {"w": torch.ones(2)}, "evil": Payload()}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="cannot be read as weights only"):
        consolidated_state_dict(tag, 0)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    torch.save({"module": {"w": torch.ones(2, dtype=torch.bfloat16)}}, tag / "mp_rank_00_model_states.pt")
    assert consolidated_state_dict(tag, 0)["w"].dtype == torch.float32
    assert zipfile.is_zipfile(tag / "mp_rank_00_model_states.pt")


def test_model_config_fields_are_all_known_to_the_resume_check():
    """A new ModelConfig field must be classified: a shape field of some task (refused on change),
    free to change, or one whose change is logged on resume."""
    from pipeline.tasks import ClassificationTask, MAETask, SimMIMTask

    fields = set(ModelConfig.__dataclass_fields__)
    shape = set().union(*(task.shape_fields for task in (ClassificationTask, MAETask, SimMIMTask)))
    logged = {"hidden_act", "initializer_range", "layer_norm_eps", "encoder_stride", "pooler_act", "mask_ratio",
              "norm_pix_loss", "mask_patch_size", "simmim_mask_ratio"}
    classified = shape | set(ckpt.FREE_FIELDS) | logged
    assert fields == classified, fields ^ classified


def test_saves_skip_the_crc32_that_torch_load_never_checks(tmp_path):
    from torch.utils.serialization import config

    tensor = torch.arange(1000, dtype=torch.float32)
    with checkpoint_saving._without_crc32():
        assert config.save.compute_crc32 is False
        torch.save({"t": tensor}, tmp_path / "fast.pt")
    assert config.save.compute_crc32 is True  # restored for everyone else
    torch.save({"t": tensor}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "fast.pt") as fast, zipfile.ZipFile(tmp_path / "plain.pt") as plain:
        data = [i for i in fast.infolist() if i.filename.endswith("/data/0")][0]
        assert data.CRC == 0 and [i for i in plain.infolist() if i.filename.endswith("/data/0")][0].CRC != 0
    assert torch.equal(torch.load(tmp_path / "fast.pt")["t"], tensor)


def test_old_checkpoints_go_in_the_background_never_during_a_save(tmp_path, no_dist, monkeypatch):
    import threading

    events, real_prune, real_wait = [], ckpt.prune, checkpoint_saving.wait_for_prune
    pruning, release, save_waits = threading.Event(), threading.Event(), threading.Event()

    def held_prune(root, keep_last):  # runs until the test releases it: no timing involved
        events.append("prune starts")
        pruning.set()
        assert release.wait(60)
        real_prune(root, keep_last=keep_last)
        events.append("prune ends")

    def wait_for_prune():
        save_waits.set()
        real_wait()

    class RecordingEngine(FakeEngine):
        def save_checkpoint(self, *args, **kwargs):
            events.append("save writes")
            super().save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(checkpoint_saving, "prune", held_prune)
    monkeypatch.setattr(checkpoint_saving, "wait_for_prune", wait_for_prune)
    engine = RecordingEngine()
    release.set()
    for step in (1, 2):
        save(engine, tmp_path, step)  # keep_last=2
    release.clear(), pruning.clear()
    save(engine, tmp_path, 3)
    assert pruning.wait(60) and events[-1] == "prune starts"  # save 3 returned while its prune still runs
    save_waits.clear()
    saving = threading.Thread(target=save, args=(engine, tmp_path, 4))
    saving.start()
    assert save_waits.wait(60) and events[-1] == "prune starts"  # save 4 waits, and has written nothing
    release.set()
    saving.join(60)
    ckpt.wait_for_prune()  # save 4's own prune, released too: read the events once it has ended
    assert events[-5:] == ["prune starts", "prune ends", "save writes", "prune starts", "prune ends"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == ["step-3", "step-4"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["step-3", "step-4"]


def test_plan_refuses_other_optimizer_groups_in_one_line(tmp_path):
    """optim.layer_decay on, off or another factor: DeepSpeed's load failed with a traceback (on/off),
    or the old LR scales came back with the optimizer state (another factor)."""
    tag = make(tmp_path, 5)
    marker = json.loads((tag / COMPLETE).read_text())
    ckpt.write_marker(tag, {**marker, "optim_groups": {"layer_decay": None}})
    with pytest.raises(CheckpointError) as error:
        ckpt.plan_resume(tag, model_config=MODEL, zero_stage=2, world_size=2, shape_fields=SHAPE,
                         optim_groups={"layer_decay": 0.75})
    message = str(error.value)
    assert "saved with optim.layer_decay=null but the config has optim.layer_decay=0.75" in message, message
    assert "resume with optim.layer_decay=null" in message and "train.init_from=" in message
    assert "\n" not in message
    ckpt.write_marker(tag, {**marker, "optim_groups": {"layer_decay": 0.65}})
    with pytest.raises(CheckpointError, match=r"optim.layer_decay=0.65 but the config has optim.layer_decay=0.75"):
        ckpt.plan_resume(tag, model_config=MODEL, zero_stage=2, world_size=2, shape_fields=SHAPE,
                         optim_groups={"layer_decay": 0.75})
    assert ckpt.plan_resume(tag, model_config=MODEL, zero_stage=2, world_size=2, shape_fields=SHAPE,
                            optim_groups={"layer_decay": 0.65}).step == 5
    # a checkpoint from before the record: not checked
    assert ckpt.plan_resume(make(tmp_path / "old", 5), model_config=MODEL, zero_stage=2, world_size=2,
                            shape_fields=SHAPE, optim_groups={"layer_decay": 0.75}).step == 5

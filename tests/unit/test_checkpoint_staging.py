"""The training-visible half of an asynchronous save: host copies that training cannot change,
reused from save to save; and the `checkpoint.async` key."""
from __future__ import annotations

from collections import OrderedDict

import torch
import yaml

from pipeline.checkpoint.staging import HostBuffers, StagingEngine
from pipeline.config import dump_config, load_config


def state(weight: torch.Tensor) -> dict:
    return {"module": OrderedDict(w=weight, b=weight[:2]), "param_groups": [{"lr": 0.1, "params": [0, 1]}],
            "step": 3, "pair": (weight.sum(), "x"), "param_shapes": [OrderedDict(w=weight.shape)]}


def test_staged_state_is_a_copy_that_training_cannot_change():
    weight = torch.arange(6.0)
    source = state(weight)
    staged = HostBuffers().stage(source, "model.pt")
    weight.add_(100)  # the next optimizer step
    source["param_groups"][0]["lr"] = 0.2  # a schedule updating its group in place
    assert torch.equal(staged["module"]["w"], torch.arange(6.0)) and torch.equal(staged["module"]["b"], torch.arange(2.0))
    assert staged["param_groups"] == [{"lr": 0.1, "params": [0, 1]}] and staged["step"] == 3
    assert type(staged["module"]) is OrderedDict and staged["pair"][1] == "x"
    assert type(staged["param_shapes"][0]["w"]) is torch.Size  # zero_to_fp32 calls .numel() on it
    # a view is staged as a tensor of its own size (what DeepSpeed's clone before torch.save gives)
    assert staged["module"]["b"].untyped_storage().nbytes() == 2 * 4


def test_buffers_are_reused_between_saves_and_replaced_when_a_shape_changes():
    buffers = HostBuffers()
    first = buffers.stage(state(torch.zeros(6)), "model.pt")
    second = buffers.stage(state(torch.ones(6)), "model.pt")
    assert second["module"]["w"].data_ptr() == first["module"]["w"].data_ptr()  # no new allocation
    assert torch.equal(second["module"]["w"], torch.ones(6))
    assert buffers.bytes == (6 + 2 + 1) * 4
    third = buffers.stage(state(torch.ones(8)), "model.pt")
    assert third["module"]["w"].shape == (8,) and buffers.bytes == (8 + 2 + 1) * 4
    other = buffers.stage(state(torch.ones(6)), "optim.pt")  # another file: buffers of its own
    assert other["module"]["w"].data_ptr() != third["module"]["w"].data_ptr()


def test_staging_engine_records_files_and_asks_deepspeed_for_its_live_tensors(tmp_path):
    engine = StagingEngine(HostBuffers())
    engine.save(state_dict=state(torch.ones(3)), path=str(tmp_path / "step-2" / "model.pt"))
    assert [path for path, _ in engine.files] == [str(tmp_path / "step-2" / "model.pt")]
    assert not (tmp_path / "step-2").exists()  # nothing written: that is the background's job
    assert engine.preserves_storage_sharing() is False  # DeepSpeed then skips its own clone


def test_checkpoint_async_key(tmp_path):
    assert load_config(None, []).checkpoint.async_ is False  # off by default
    cfg = load_config(None, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True
    dump_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["checkpoint"]["async"] is True  # the user's name
    assert load_config(tmp_path / "config.yaml").checkpoint.async_ is True

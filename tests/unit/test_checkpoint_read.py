"""The faster checkpoint reads (pipeline/checkpoint/read.py): the same objects as torch.load, no
tensor left on the file's mapping, shared storages still shared, and DeepSpeed's second read of a
model-states file served from its first. The resume tests check the same through whole runs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from pipeline.checkpoint.read import faster_reads, read


class Holder:  # a plain object with a tensor inside, as DeepSpeed's pickled objects may hold
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def sample_state() -> dict:
    torch.manual_seed(0)
    flat = torch.randn(1000)
    return {"flat": flat, "views": [flat[:10], flat[500:].view(20, 25)],
            "bf16": torch.randn(7, 3).to(torch.bfloat16), "param": torch.nn.Parameter(torch.randn(4)),
            "holder": Holder(torch.arange(5)), "step": 12, "shapes": {"w": torch.Size([3, 4])},
            "empty": torch.empty(0)}


def assert_same(got, expected) -> None:
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for key in expected:
            assert_same(got[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b)
    elif isinstance(expected, Holder):
        assert_same(got.tensor, expected.tensor)
    else:
        assert got == expected


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_read_equals_torch_load_and_leaves_nothing_mapped(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "shard_model_states.pt"
    torch.save(sample_state(), path, _use_new_zipfile_serialization=zipped)
    expected = torch.load(path, weights_only=False)

    got = read(path, map_location="cpu")

    assert_same(got, expected)
    assert str(path) not in mapped_files()  # every tensor was copied off the mapping
    # Views of one storage in the file are views of one storage after the read.
    got["flat"][0] = 123.0
    got["flat"][600] = -5.0
    assert got["views"][0][0] == 123.0 and got["views"][1][4, 0] == -5.0
    assert isinstance(got["param"], torch.nn.Parameter) and got["param"].requires_grad


def test_mapping_does_not_outlive_the_read_when_the_file_is_deleted(tmp_path: Path) -> None:
    """A pruned checkpoint must not keep its disk space because a loaded tensor still maps it."""
    path = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"exp_avg": torch.randn(256, 256)}, path)
    state = read(path, map_location="cpu")
    path.unlink()
    assert str(path) not in mapped_files()  # not even as "(deleted)"
    assert state["exp_avg"].sum().isfinite()


def test_faster_reads_serves_a_model_states_file_once_more_and_nothing_else(tmp_path: Path) -> None:
    model_states = tmp_path / "mp_rank_00_model_states.pt"
    optim_states = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save(sample_state(), model_states)
    torch.save({"state": torch.randn(10)}, optim_states)

    class Engine:  # holds DeepSpeed's real reader where DeepSpeedEngine holds it
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    with faster_reads(engine):
        first = engine.checkpoint_engine.load(str(model_states), map_location=lambda s, loc: s)
        second = engine.checkpoint_engine.load(str(model_states), map_location=lambda s, loc: s)
        third = engine.checkpoint_engine.load(str(model_states), map_location=lambda s, loc: s)
        optim_a = engine.checkpoint_engine.load(str(optim_states), map_location="cpu")
        optim_b = engine.checkpoint_engine.load(str(optim_states), map_location="cpu")
    assert second is first  # DeepSpeed's check-then-use pair costs one read
    assert third is not first  # kept only until asked for again
    assert optim_b is not optim_a  # optimizer shards are never kept
    assert_same(third, torch.load(model_states, weights_only=False))
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's own method again after the block
    assert engine.checkpoint_engine.load(str(model_states)) is not third


def test_another_reader_keeps_its_own_load(tmp_path: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"w": torch.ones(3)}, path)
    calls = []

    class OwnReader(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            calls.append(path)
            return torch.load(path, map_location=map_location, weights_only=False)

    class Engine:
        checkpoint_engine = OwnReader()

    engine = Engine()
    with faster_reads(engine):
        first = engine.checkpoint_engine.load(str(path))
        assert engine.checkpoint_engine.load(str(path)) is first
    assert calls == [str(path)]  # its load did the reading, once

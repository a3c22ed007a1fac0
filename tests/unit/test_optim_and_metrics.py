"""Parameter groups, the LR schedule across a resume, and metrics rows across a resume."""
import json
import sys

import pytest
import torch

from pipeline.config import load_config
from pipeline.metrics import JsonlWriter
from pipeline.model import build_model
from pipeline.optim import WarmupCosine, apply_current_schedule, build_optimizer, build_scheduler, param_groups


def optim_cfg(*overrides):
    return load_config(None, ["data.train_shards=x.tar", *overrides]).optim


def optim_cfg_model():
    return load_config(None, ["data.train_shards=x.tar", "model.size=tiny"]).model


def test_no_weight_decay_on_biases_norms_positions_and_cls():
    model = build_model(optim_cfg_model())
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "vit.embeddings.cls_token" in no_decay_names
    assert "vit.embeddings.position_embeddings" in no_decay_names
    assert "vit.layernorm.weight" in no_decay_names and "classifier.bias" in no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "classifier.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_warmup_then_cosine_to_min_lr():
    cfg = optim_cfg("optim.lr=1e-3", "optim.min_lr=1e-5", "optim.warmup_steps=10")
    schedule = WarmupCosine(cfg, total_steps=110)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert schedule(110) == pytest.approx(0.01)


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_resumed_schedule_follows_the_new_config_not_the_saved_one(layer_decay):
    decay = [f"optim.layer_decay={layer_decay}"] if layer_decay else []
    cfg = optim_cfg("optim.lr=1e-3", "optim.warmup_steps=0", *decay)
    # With layer decay, every group's base LR is optim.lr x its scale, after a resume too.
    model = build_model(optim_cfg_model()) if layer_decay else torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=8)
    for _ in range(8):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    # Same config: the resumed lr is exactly what was saved.
    opt_same = build_optimizer(model, cfg)
    sched_same = build_scheduler(opt_same, cfg, total_steps=8)
    sched_same.load_state_dict(saved)
    apply_current_schedule(sched_same, cfg)
    assert [g["lr"] for g in opt_same.param_groups] == sched.get_last_lr()
    # Longer run and another lr: the new schedule wins.
    longer = optim_cfg("optim.lr=2e-3", "optim.warmup_steps=0", *decay)
    opt_new = build_optimizer(model, longer)
    sched_new = build_scheduler(opt_new, longer, total_steps=16)
    sched_new.load_state_dict(saved)
    apply_current_schedule(sched_new, longer)
    expected = 2e-3 * WarmupCosine(longer, 16)(8)
    assert [g["lr"] for g in opt_new.param_groups] == pytest.approx([expected * g.get("lr_scale", 1.0)
                                                                     for g in opt_new.param_groups])


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = JsonlWriter(path)
    for step in range(1, 7):
        writer.log({"loss": 1.0 / step}, step)
    writer.close()
    with path.open("a") as handle:
        handle.write('{"step": 7, "lo')  # a line torn by SIGKILL
    writer = JsonlWriter(path, resume_step=4)
    writer.log({"loss": 0.5}, 5)
    writer.close()
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_a_fresh_start_over_an_old_run_starts_a_fresh_metrics_file(tmp_path):
    from pipeline.metrics import build_metrics_writer

    old = build_metrics_writer(tmp_path, rank=0, resume_step=0)
    old.log({"loss": 2.0}, 1)
    old.log({"loss": 1.0}, 2)
    old.close()
    new = build_metrics_writer(tmp_path, rank=0, resume_step=0)  # what checkpoint.overwrite=true does
    new.log({"loss": 2.5}, 1)
    new.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.5}]


ROW = {"loss": 1.2345, "lr": 3e-4, "samples_per_s": 812.4, "data_wait_fraction": 0.021, "step_time_s": 0.5}


def test_without_a_terminal_each_row_is_one_plain_progress_line(caplog, monkeypatch):
    """Slurm's output file is not a terminal: no bar, but one line per metrics row with what a
    user watches (step, loss, lr, img/s, data wait, ETA). The same with train.progress_bar=false."""
    import io
    import logging

    from pipeline.metrics import Progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal, however pytest was started (-s, a tty)
    for bar in (True, False):
        progress = Progress(100, initial=0, enabled=True, bar=bar)
        assert progress._bar is None
        with caplog.at_level(logging.INFO, logger="pipeline.metrics"):
            progress.log(40, ROW)
        progress.close()
        assert caplog.messages[-1] == "step 40/100  loss 1.2345  lr 0.0003  812 img/s  data wait 2.1%  ETA 0:00:30"
    caplog.clear()
    silent = Progress(100, initial=0, enabled=False)  # other ranks print nothing
    silent.log(40, ROW)
    assert caplog.messages == []


def test_the_bar_shows_images_per_second(monkeypatch):
    import io
    import sys

    from pipeline.metrics import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = Progress(100, initial=0, enabled=True, bar=True)
    progress.log(40, ROW)
    progress.update(40)
    progress.close()
    assert "img/s=812" in sys.stderr.getvalue() and "loss=1.234" in sys.stderr.getvalue()


def test_tensorboard_groups_train_and_val(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.metrics import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path)
    writer.log({"loss": 2.0, "samples_per_s": 10.0}, 5)
    writer.log({"val_top1": 0.5, "val_knn_top1": 0.4}, 5)
    writer.close()
    tags = EventAccumulator(str(tmp_path)).Reload().Tags()["scalars"]
    assert sorted(tags) == ["train/loss", "train/samples_per_s", "val/knn_top1", "val/top1"]

"""The phases of ``make gpu-check``: real trainer runs under torchrun, each judged by what it wrote.

- throughput: the trainer on JPEG shards next to the model alone (``benchmark.py gpu``, same
  model, batch, dtype and compile setting, same machine, same run): images/s, their ratio,
  the trainer's data wait and MFU; classification, and MAE pretraining (``train.objective=mae``,
  HF's default decoder, its MFU from MAE's analytic FLOPs) on the same shards, labels unused;
- sync: a ZeRO-0 run with ``PIPELINE_SYNC_DEBUG=error`` (torch refuses any host-device
  synchronisation in a steady-state step), and one at ZeRO-2 with ``warn`` that counts the
  synchronisations DeepSpeed's optimizer makes itself (CUDA only);
- matrix: short runs of every precision at every ZeRO stage: exit 0, finite and falling losses;
- resume: SIGUSR1 mid-run, the same command again; losses bitwise and ledgers equal to an
  uninterrupted run, per ZeRO stage (the matrix's run of that stage and precision, which has the
  same shape and length, when the matrix ran: one launch fewer per stage);
- export: the last checkpoint exported and loaded in ``transformers``: same logits as ours.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Plan:
    """What to run: GPU sizes, or tiny ones that exercise the same code on a CPU in a minute or two."""

    images: int
    height: int
    width: int
    shards: int
    workers: int
    throughput: list[dict]
    matrix: dict
    resume: dict
    gpu: bool = True
    goals: dict = field(default_factory=dict)


def gpu_plan() -> Plan:
    workers = max(1, min(14, (os.cpu_count() or 2) - 2))
    return Plan(images=12_350, height=360, width=440, shards=25, workers=workers,
                throughput=[dict(name="B/16 eager", size="B/16", batch=256, compile=False, steps=80, after=30),
                            dict(name="L/16 compiled", size="L/16", batch=256, compile=True, steps=60, after=30),
                            dict(name="B/16 MAE eager", size="B/16", batch=256, compile=False, steps=80, after=30,
                                 objective="mae")],
                matrix=dict(size="S/16", batch=64, steps=20,
                            runs=[(p, z) for p in ("fp32", "bf16", "fp16") for z in (0, 1, 2, 3)]),
                resume=dict(size="S/16", batch=64, steps=20, stop_at=10, stages=[0, 1, 2, 3], precision="bf16"),
                goals={"ratio": 0.92, "data_wait_b16": 0.03, "mfu_l16": 0.42, "mae_cost_b16": 0.60})


# The tiny plan's MAE decoder: HF's default (8 x 512) would be 25x the tiny encoder and slow the CPU
# check down for nothing; the GPU plan keeps HF's.
TINY_DECODER = ("model.decoder_hidden_size=64", "model.decoder_num_hidden_layers=2",
                "model.decoder_num_attention_heads=4", "model.decoder_intermediate_size=256")


def tiny_plan() -> Plan:
    # No data workers on CPU: on 2 cores each is one more process beside the ranks, for no figure here.
    return Plan(images=120, height=40, width=48, shards=4, workers=0, gpu=False,
                throughput=[dict(name="tiny eager", size="tiny", batch=16, compile=False, steps=12, after=4),
                            dict(name="tiny MAE eager", size="tiny", batch=16, compile=False, steps=8, after=4,
                                 objective="mae", extra=TINY_DECODER)],
                matrix=dict(size="tiny", batch=16, steps=8, runs=[("bf16", 3)]),  # the code path, once
                resume=dict(size="tiny", batch=16, steps=8, stop_at=4, stages=[3], precision="bf16"))


def env(extra: dict | None = None) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return {**out, **(extra or {})}


class Runs:
    """Trainer runs on the check's shards, one torchrun each, as a user starts them."""

    def __init__(self, plan: Plan, shards: Path, out: Path, nproc: int):
        self.plan, self.out, self.nproc = plan, out, nproc
        self.finished: dict[tuple, dict] = {}  # uninterrupted runs by (size, batch, steps, stage, precision)
        manifest = json.loads((shards / "manifest.json").read_text())
        self.data = [f"data.train_shards={shards}/{manifest['splits']['train']['pattern']}",
                     f"data.val_shards={shards}/{manifest['splits']['val']['pattern']}",
                     f"data.num_workers={plan.workers}", "model.num_labels=10"]

    def overrides(self, name: str, size: str, batch: int, steps: int, *, stage: int = 2, precision: str = "bf16",
                  compile: bool = False, log_every: int = 1, objective: str = "classification",
                  extra: tuple = ()) -> list[str]:
        if objective != "classification":  # a throughput run: no k-NN bank pass over the training shards
            extra = (f"train.objective={objective}", "probe.knn=false", *extra)
        return [*self.data, f"model.size={size}", f"data.batch_size={batch}", f"train.max_steps={steps}",
                f"train.zero_stage={stage}", f"train.precision={precision}", f"train.compile={str(compile).lower()}",
                f"train.log_every={log_every}", "train.eval_every=0", "checkpoint.every_steps=0",
                "checkpoint.resume=auto", "optim.warmup_steps=2", "optim.lr=2e-3", "train.progress_bar=false",
                f"train.output_dir={self.out / name}", *extra]

    def launch(self, overrides: list[str], log: Path, extra_env: dict | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                   str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / "configs/imagenet_vit_b16.yaml"),
                   *overrides]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as handle:
            return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env(extra_env),
                                    start_new_session=True)

    def fresh(self, name: str) -> None:
        """No output of an earlier check: every run starts from nothing (checkpoint.resume=auto)."""
        import shutil

        shutil.rmtree(self.out / name, ignore_errors=True)
        (self.out / f"{name}.log").unlink(missing_ok=True)

    def run(self, name: str, overrides: list[str], extra_env: dict | None = None, *, fresh: bool = True) -> dict:
        if fresh:
            self.fresh(name)
        log = self.out / f"{name}.log"
        start = time.perf_counter()
        code = self.launch(overrides, log, extra_env).wait()
        return {"name": name, "rc": code, "wall_s": round(time.perf_counter() - start, 1), "log": str(log),
                "rows": train_rows(self.out / name)}


def train_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def model_only(plan: Plan, specs: list[dict], out: Path) -> dict[str, dict]:
    """``benchmark.py gpu`` on the same model, batch and compile setting, bf16 weights as the trainer's,
    for every objective of ``specs`` (which share size, batch and compile) in one process; by spec name."""
    first = specs[0]
    path = out / f"model-{first['name'].replace('/', '').replace(' ', '-')}.json"
    objectives = [spec.get("objective", "classification") for spec in specs]
    # The runs' model overrides (a decoder's shape: fields another objective ignores), all at once.
    overrides = list(dict.fromkeys(o for spec in specs for o in spec.get("extra", ())))
    steps = ["--steps", "10", "--warmup", "3"] if plan.gpu else ["--steps", "4", "--warmup", "1"]
    command = [sys.executable, str(ROOT / "launch/benchmark.py"), "gpu", "--sizes", first["size"],
               "--checkpointing", "none", "--compile", "on" if first["compile"] else "off",
               "--batch-size", str(first["batch"]), "--weights", "bf16", *steps,
               "--objectives", *objectives, "--json", str(path), *(["--overrides", *overrides] if overrides else [])]
    if not plan.gpu:
        command += ["--device", "cpu"]
    subprocess.run(command, check=True, cwd=ROOT, env=env(), capture_output=True, text=True)
    rows = {row["objective"]: row for row in json.loads(path.read_text())["result"]["rows"]}
    return {spec["name"]: {"images_per_s": rows[objective]["images_per_s"], "mfu": rows[objective].get("mfu")}
            for spec, objective in zip(specs, objectives)}


def throughput(plan: Plan, runs: Runs) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}  # one model-alone process per (size, batch, compile): fewer starts
    for spec in plan.throughput:
        groups.setdefault((spec["size"], spec["batch"], spec["compile"]), []).append(spec)
    models = {name: figures for specs in groups.values() for name, figures in model_only(plan, specs, runs.out).items()}
    results = []
    for spec in plan.throughput:
        model = models[spec["name"]]
        name = "throughput-" + spec["name"].replace("/", "").replace(" ", "-")
        objective = spec.get("objective", "classification")
        run = runs.run(name, runs.overrides(name, spec["size"], spec["batch"], spec["steps"], compile=spec["compile"],
                                            log_every=10 if plan.gpu else 2, objective=objective,
                                            extra=spec.get("extra", ())))
        rows = [r for r in run["rows"] if r["step"] > spec["after"]]
        trainer = mean([r["samples_per_s"] for r in rows])
        results.append({"name": spec["name"], "objective": objective, "rc": run["rc"],
                        "model_images_per_s": model["images_per_s"],
                        "model_mfu": model["mfu"], "trainer_images_per_s": trainer,
                        "ratio": trainer / model["images_per_s"] if trainer else None,
                        "data_wait_fraction": mean([r["data_wait_fraction"] for r in rows]),
                        "trainer_mfu": mean([r["mfu"] for r in rows]), "ok": run["rc"] == 0 and bool(rows)})
    return results


def sync(plan: Plan, runs: Runs) -> list[dict]:
    """CUDA only: torch's sync debug mode inside steady-state steps (see train_step.steady_state)."""
    if not plan.gpu:
        return []
    spec, results = plan.matrix, []
    for stage, mode in ((0, "error"), (2, "warn")):
        name = f"sync-zero{stage}"
        run = runs.run(name, runs.overrides(name, spec["size"], spec["batch"], 12, stage=stage, log_every=6),
                       extra_env={"PIPELINE_SYNC_DEBUG": mode})
        text = Path(run["log"]).read_text(errors="replace")
        results.append({"name": name, "mode": mode, "rc": run["rc"],
                        "sync_warnings": text.count("called a synchronizing CUDA operation"),
                        "ok": run["rc"] == 0})
    return results


def matrix(plan: Plan, runs: Runs) -> list[dict]:
    spec, results = plan.matrix, []
    for precision, stage in spec["runs"]:
        name = f"matrix-{precision}-zero{stage}"
        # Every step's loss and the ledger: what the resume phase compares a resumed run with.
        run = runs.run(name, runs.overrides(name, spec["size"], spec["batch"], spec["steps"], stage=stage,
                                            precision=precision, extra=("data.ledger=true",)))
        runs.finished[(spec["size"], spec["batch"], spec["steps"], stage, precision)] = run
        losses = [r["loss"] for r in run["rows"]]
        finite = len(losses) >= 4 and all(isinstance(x, float) and math.isfinite(x) for x in losses)
        first, last = (mean(losses[:2]), mean(losses[-2:])) if finite else (None, None)  # two steps each
        results.append({"name": name, "rc": run["rc"], "first_loss": first, "last_loss": last, "wall_s": run["wall_s"],
                        "ok": run["rc"] == 0 and finite and last < first})
    return results


def _workers_of(process: subprocess.Popen) -> list[int]:
    """torchrun's children: the training processes (their data workers are grandchildren)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == process.pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _ledger(out: Path, rank: int = 0) -> list[str]:
    path = out / "ledger" / f"rank{rank}.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def resume(plan: Plan, runs: Runs) -> list[dict]:
    spec, results = plan.resume, []
    for stage in spec["stages"]:
        common = dict(stage=stage, precision=spec["precision"], extra=("data.ledger=true",))
        full = runs.finished.get((spec["size"], spec["batch"], spec["steps"], stage, spec["precision"]))
        if full is None or full["rc"] != 0:
            full = runs.run(f"resume-full-zero{stage}", runs.overrides(f"resume-full-zero{stage}", spec["size"],
                                                                      spec["batch"], spec["steps"], **common))
        name = f"resume-cut-zero{stage}"
        overrides = runs.overrides(name, spec["size"], spec["batch"], spec["steps"], **common)
        runs.fresh(name)
        first = runs.launch(overrides, runs.out / f"{name}.log")
        deadline = time.monotonic() + 900
        while len(_ledger(runs.out / name)) < spec["stop_at"] and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in _workers_of(first):
            os.kill(pid, signal.SIGUSR1)
        first.wait()
        status = (runs.out / name / "exit_status").read_text().strip() if (runs.out / name / "exit_status").is_file() else None
        second = runs.run(name, overrides, fresh=False)  # the same command again: it resumes
        expected = {r["step"]: r["loss"] for r in full["rows"]}
        got = {r["step"]: r["loss"] for r in second["rows"]}
        ledgers_equal = all(_ledger(runs.out / full["name"], r) == _ledger(runs.out / name, r)
                            for r in range(runs.nproc))
        results.append({"name": f"ZeRO-{stage} {spec['precision']}", "reference": full["name"],
                        "stopped_status": status, "rc": second["rc"],
                        "losses_bitwise": got == expected and len(expected) == spec["steps"],
                        "ledgers_equal": ledgers_equal,
                        "ok": full["rc"] == 0 and status == "75" and second["rc"] == 0 and got == expected
                        and ledgers_equal})
    return results


def export(plan: Plan, runs: Runs) -> list[dict]:
    """The last resume run, exported and loaded by transformers: the same logits as our own model
    (both in fp32 on the CPU: within 1e-5, the export tests' tolerance)."""
    source = runs.out / f"resume-cut-zero{plan.resume['stages'][-1]}"
    target = runs.out / "export"
    command = [sys.executable, str(ROOT / "launch/export.py"), "--checkpoint", str(source), "--out", str(target)]
    done = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True)
    difference, error = None, done.stderr[-500:]
    if done.returncode == 0:
        try:
            difference = max_logit_difference(target)
        except Exception as failure:  # noqa: BLE001 - a check reports what failed, and goes on to its table
            error = f"{type(failure).__name__}: {failure}"[-500:]
    return [{"name": "export -> transformers", "rc": done.returncode, "max_logit_difference": difference,
             "error": error if difference is None else None,
             "ok": done.returncode == 0 and difference is not None and difference <= 1e-5}]


def max_logit_difference(export_dir: Path) -> float:
    """Our model and transformers' ViTForImageClassification, both loaded from the export, on
    the same random images (fp32, CPU): the largest difference of their logits."""
    import torch
    from transformers import ViTForImageClassification

    from pipeline.model import from_pretrained

    ours = from_pretrained(str(export_dir)).eval()
    theirs = ViTForImageClassification.from_pretrained(str(export_dir)).eval()
    c = ours.config
    x = torch.randn(2, c.num_channels, *c.image_hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((ours(x).logits - theirs(pixel_values=x).logits).abs().max())

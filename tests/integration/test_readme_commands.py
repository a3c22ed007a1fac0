"""Every command in README.md's ```bash blocks runs as written, as far as it can here cheaply: the
trainer's commands (torchrun, Slurm's) with `--check` in this process (config file, overrides,
the checks that need no data), the digits shards command for real (into a scratch folder), and
every other launch script's `--help`. What cannot run here (installing, the suite, a GPU, a
cluster, ImageNet, a finished run) is listed in SKIPPED, so that a new command is seen to."""
from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
import pretrain  # noqa: E402  - launch/pretrain.py

# Commands not run here, by their first words, and why.
SKIPPED = {
    "make demo": "the demo itself (minutes)", "make test": "the suite itself", "make gpu-check": "a GPU",
    "python3 -m venv": "installing", ".venv/bin/pip": "installing", "pip install": "installing",
    "export ": "setting the environment for the commands after it",
}


def readme_commands() -> list[str]:
    """The README's ```bash commands, a backslash-continued command as one line, comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def trainer_check(command: str) -> list[str] | None:
    """A trainer command (torchrun, sbatch) as `pretrain.py --check` arguments; None if it is none."""
    words = shlex.split(command.replace("$HEAD", "localhost"))
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z]+=", w))
    words = [w for w in words if not re.match(r"^[A-Z]+=", w)]
    if "launch/pretrain.py" in words:
        args = words[words.index("launch/pretrain.py") + 1:]
    elif words[:1] == ["sbatch"] and any(w.endswith(".sbatch") for w in words):
        script = next(i for i, w in enumerate(words) if w.endswith(".sbatch"))
        rest = words[script + 1:]
        config = rest[0] if rest and rest[0].endswith(".yaml") else env.get("CONFIG")
        overrides = rest[1:] if rest and rest[0].endswith(".yaml") else []
        args = ["--config", config, *shlex.split(env.get("OVERRIDES", "")), *overrides]
    else:
        return None
    return ["--check", *args]


def test_every_readme_command_is_run_or_listed():
    for command in readme_commands():
        runnable = trainer_check(command) is not None or command.startswith("python launch/")
        assert runnable or any(command.startswith(prefix) for prefix in SKIPPED), command


@pytest.mark.parametrize("command", [c for c in readme_commands() if trainer_check(c)])
def test_the_trainer_commands_pass_check(command, capfd, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.chdir(ROOT)
    code = pretrain.main(trainer_check(command))
    assert code == 0, capfd.readouterr().err


def test_the_digits_shards_command_writes_the_demos_shards(tmp_path, monkeypatch, capsys):
    (command,) = [c for c in readme_commands() if "--source digits" in c]
    for name in ("launch", "pipeline", "configs"):
        (tmp_path / name).symlink_to(ROOT / name)
    result = subprocess.run(shlex.split(command.replace("python ", f"{sys.executable} ", 1)), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train: 1618 samples in 4 shards" in result.stdout and "make_shards: 100%" in result.stderr
    manifest = json.loads((tmp_path / "data/digits/manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    assert sum(n.startswith("train") for n in names) == 4 and sum(n.startswith("val") for n in names) == 1
    # The same command again (its main(), in this process) is refused: it would overwrite the shards.
    import make_shards  # launch/make_shards.py

    monkeypatch.chdir(tmp_path)
    assert make_shards.main(shlex.split(command)[2:]) == 2
    assert "pass --overwrite" in capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads((tmp_path / "data/digits/manifest.json").read_text()) == manifest


@pytest.mark.parametrize("script", sorted({c.split()[1] for c in readme_commands() if c.startswith("python launch/")}
                                          | {"launch/linear_probe.py"}))
def test_every_launch_script_the_readme_names_has_a_help(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert ended.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out
    if script == "launch/pretrain.py":
        assert "train.objective=" in out and "exit codes:" in out and "pipeline/config/" in out

"""A real Slurm cluster on this machine for tests: two nodes (n1, n2) from slurm/local/start.sh.

The session fixture ``slurm_cluster`` starts a cluster of its own (a fresh folder under /tmp and
free ports, so a cluster started by hand, or another test session, is left alone; slurm-wlm and
munge are installed with apt-get when missing) and stops it at the end. With VIT_SLURM_DIR set
to the folder of a cluster that is already up, that one is used as it is and left running.
When the cluster cannot be started (not root, no apt, install failed) the tests that need it
fail with the reason: they do not skip.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import is_trainer

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "slurm" / "local"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


@dataclass
class SlurmCluster:
    dir: Path
    env: dict  # os.environ with SLURM_CONF: pass it to every Slurm command and job
    start_seconds: float | None  # how long start.sh took; None when a running cluster was reused

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    def sbatch(self, script: str, *args: str, sbatch_args: tuple = (), env: dict | None = None,
               cwd: Path = REPO) -> int:
        """Submit ``script`` from ``cwd`` (the repository root, as a user would); returns the job id."""
        out = self.run("sbatch", "--parsable", *sbatch_args, script, *args, env={**self.env, **(env or {})},
                       cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out))

    def wait_job(self, job_id: int, until: Callable[[dict], bool], timeout: float, what: str,
                 poll: float = 0.5) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} within {timeout:.0f}s; now "
                                     f"JobState={info.get('JobState')} Restarts={info.get('Restarts')}\n"
                                     f"{self.output(info)}")
            time.sleep(poll)

    def wait_finished(self, job_id: int, timeout: float) -> dict:
        return self.wait_job(job_id, lambda j: j.get("JobState") in FINISHED, timeout, "end")

    @staticmethod
    def output(info: dict, tail: int = 6000) -> str:
        path = Path(info.get("StdOut", ""))
        return path.read_text(errors="replace")[-tail:] if path.is_file() else f"(no output at {path})"

    def processes(self, job_id: int, script: str, *, trainers_only: bool = False) -> list[dict[str, str]]:
        """The environments of this cluster's job ``job_id``'s Python processes running ``script``.

        Both emulated nodes are this machine, so /proc shows every node's processes, and each
        one's SLURMD_NODENAME says which node started it. torchrun_node.py (whose arguments also
        name the script) and srun are left out; SLURM_CONF tells this cluster's jobs from another's.
        """
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                if not (Path(argv[0]).name.startswith("python") and any(a.endswith(script) for a in argv)
                        and not any(a.endswith("torchrun_node.py") for a in argv)):
                    continue
                if trainers_only and not is_trainer(int(entry.name), script):  # not a data worker or their server
                    continue
                env = dict(item.split("=", 1) for item in
                           (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
            except OSError:  # exited meanwhile
                continue
            if env.get("SLURM_JOB_ID") == str(job_id) and env.get("SLURM_CONF") == self.env["SLURM_CONF"]:
                found.append(env)
        return found


def _cluster_up(env: dict, slurm_dir: Path) -> bool:
    pid_file = slurm_dir / "run" / "slurmctld.pid"
    try:  # without a live slurmctld, sinfo would retry for 10 s
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N=%t"], env=env, capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = dict(line.split("=", 1) for line in out.split() if "=" in line)
    return all(states.get(n) in ("idle", "mix", "alloc") for n in ("n1", "n2"))


def _free_ports(count: int) -> int:
    """A first port such that it and the next ``count - 1`` ports are all free on 127.0.0.1."""
    for _ in range(100):
        first = random.randrange(10000, 20000)  # below torch rendezvous ports (29500+)
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no free ports for the local Slurm cluster")


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    given = os.environ.get("VIT_SLURM_DIR")
    if given:
        env = {**os.environ, "SLURM_CONF": str(Path(given) / "slurm.conf")}
        if _cluster_up(env, Path(given)):
            yield SlurmCluster(Path(given), env, start_seconds=None)
            return
    if os.geteuid() != 0:
        pytest.fail("the local Slurm cluster needs root (slurm/local/start.sh runs munged and slurmd as root "
                    "and adds n1, n2 to /etc/hosts); run the tests as root")
    # A short path: munged's socket lives in it, and socket paths are limited to about 100 bytes.
    slurm_dir = Path(given) if given else Path(tempfile.mkdtemp(prefix="vit-slurm-", dir="/tmp"))
    port = _free_ports(3)
    env = {**os.environ, "VIT_SLURM_DIR": str(slurm_dir), "SLURM_CONF": str(slurm_dir / "slurm.conf"),
           "VIT_SLURM_CTLD_PORT": str(port), "VIT_SLURM_NODE_PORT": str(port + 1)}
    t0 = time.monotonic()
    try:
        started = subprocess.run([str(LOCAL / "start.sh")], env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("slurm/local/start.sh did not finish within 600 s (apt-get stuck?)")
    if started.returncode != 0:
        subprocess.run([str(LOCAL / "stop.sh")], env=env, capture_output=True, timeout=120)
        pytest.fail(f"could not start the local Slurm cluster: slurm/local/start.sh exited "
                    f"{started.returncode}:\n{started.stderr[-4000:]}")
    try:
        yield SlurmCluster(slurm_dir, env, start_seconds=time.monotonic() - t0)
    finally:
        subprocess.run([str(LOCAL / "stop.sh")], env=env, capture_output=True, timeout=120)
        if not given:
            shutil.rmtree(slurm_dir, ignore_errors=True)

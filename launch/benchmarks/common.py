"""What every benchmark suite shares: interleaved timing, the machine's description, thread setup.

Timings on a shared machine move with the load, so every comparison is made side by side in
one process: the contenders take turns (the order rotates every repetition) and each one's
median is reported. The load average before and after is part of every result.
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def descendants_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every live process descended from this one (children and
    theirs: DataLoader workers are children of a fork server, itself our child), each with the
    CPU time of its own children that it has reaped (Linux /proc; empty elsewhere)."""
    tick, parents, cpu = os.sysconf("SC_CLK_TCK"), {}, {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return {}
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1]: ppid; [11], [12]: utime, stime; [13], [14]: reaped children's utime, stime
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(v) for v in fields[11:15]) / tick
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in ours}
        ours |= frontier
    return {pid: cpu[pid] for pid in ours}


class OtherLoad:
    """How busy the machine's other processes kept the CPUs while we ran: (all busy CPU time
    from /proc/stat - the CPU time of this process and of its descendants) / (wall x cores).
    The load average counts our own threads too; this does not."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        try:
            fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
            busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system + sum(descendants_cpu_s().values())
        return time.perf_counter(), busy, own

    def share(self) -> float | None:
        wall0, busy0, own0 = self.start
        wall1, busy1, own1 = self._snapshot()
        if busy1 != busy1 or wall1 <= wall0:  # NaN: no /proc/stat
            return None
        return round(max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1)), 3)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where and when a figure was taken: CPU, cores, threads, versions, date, load."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def set_threads(threads: int | None) -> int:
    """Intra-op threads for this process (default: every core); returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def summarize(times: list[float]) -> dict:
    """Median (the figure reported), min, max and count of a list of seconds."""
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4), "n": len(times)}


# What a suite's --clock measures: wall time, or this process's CPU time (every thread's, so with
# one torch thread the time the step itself computed). On a shared machine whose load exceeds its
# cores, wall time counts the other processes' turns and moves with them; CPU time does not.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(contenders: dict[str, Callable[[], None]], *, repeats: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds of each call (``clock``: "wall" or "cpu", see CLOCKS), the contenders taking turns;
    the order rotates every repetition so that none always runs first (after a pause) or last."""
    now = CLOCKS[clock]
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    if sync:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            gc.collect()
            start = now()
            contenders[name]()
            if sync:
                sync()
            times[name].append(now() - start)
    return times


def option(args, name: str, default):
    """``args.name`` when given (not None), else ``default``: suites also run with ``args=None``."""
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


def model_config(size: str, **overrides):
    """A ModelConfig of a named size (MODEL_SIZES), the given fields (not None) winning."""
    from pipeline.config import MODEL_SIZES, ModelConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return ModelConfig(size=size, **{k: v for k, v in overrides.items() if v is not None})

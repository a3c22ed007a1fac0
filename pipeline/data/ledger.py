"""The sample ledger: which keys each rank consumed at each optimizer step.

``<output_dir>/ledger/rank<R>.jsonl``, one line per step: ``{"step": N, "keys": [...]}``. With
it anyone can check coverage, duplicates and resumes without trusting the loader.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.storage import keep_rows_up_to, writing


class LedgerWriter:
    """Append-only writer of one rank's ledger; each line is flushed as it is written.

    ``resume_step``: on a resume from the checkpoint of that step, lines of later steps (written
    by the interrupted run after its last checkpoint) are dropped first, so that the ledger tells
    what the model actually trained on.
    """

    def __init__(self, output_dir: str | Path, rank: int, *, resume_step: int | None = None):
        self.path = Path(output_dir) / "ledger" / f"rank{rank}.jsonl"
        with writing("the sample ledger", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                keep_rows_up_to(self.path, resume_step)
            self._file = open(self.path, "a", buffering=1)  # line-buffered

    def write(self, step: int, keys: list[str]) -> None:
        """One line; a write the disk refuses (full, read-only) is a one-line StorageError."""
        with writing("the sample ledger", self.path):
            self._file.write(json.dumps({"step": int(step), "keys": list(keys)}) + "\n")

    def close(self) -> None:
        with writing("the sample ledger", self.path):
            self._file.close()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_ledger(output_dir: str | Path) -> dict[int, dict[int, list[str]]]:
    """{rank: {step: keys}} of every ledger under ``output_dir`` (a later line for a step wins)."""
    result: dict[int, dict[int, list[str]]] = {}
    for path in sorted((Path(output_dir) / "ledger").glob("rank*.jsonl")):
        rank = int(path.stem[4:])
        steps = result.setdefault(rank, {})
        for line in path.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                steps[int(entry["step"])] = entry["keys"]
    return result

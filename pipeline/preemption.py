"""Stop signals (Slurm's warning before preemption or time limit) become a flag, nothing more.

The handler runs between two bytecodes of whatever the main thread was doing, possibly in the
middle of a collective or a checkpoint write: so it only records the signal. The step loop
checks the flag at step boundaries, where all ranks agree to stop together (see trainer.py).
A second signal while the checkpoint is being written just sets the flag again.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

# The exit code that means "saved, requeue me" (BSD's EX_TEMPFAIL); any other non-zero code is
# a real failure that a requeue would only repeat.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: will save a checkpoint at the next step boundary and exit %d",
                        self.signal_name, EXIT_PREEMPTED)

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

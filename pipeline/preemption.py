"""Stop signals (Slurm's warning before preemption or time limit) become a flag, nothing more.

The handler runs between two bytecodes of whatever the main thread was doing, possibly in the
middle of a collective or a checkpoint write: so it only records the signal. The step loop
checks the flag at step boundaries, where all ranks agree to stop together (see trainer.py).
A second signal while the checkpoint is being written is ignored, and so is every stop signal
after it (``ignore_from_now_on``): torchrun sends SIGTERM to the other workers as soon as one
exits non-zero, 75 included, and a rank killed in its teardown would lose its exit code (and
rank 0 the ``exit_status`` file).
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
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            log.warning("received %s: will save a checkpoint at the next step boundary and exit %d",
                        name, EXIT_PREEMPTED)
        else:  # e.g. Slurm's SIGTERM after its USR1, or torchrun stopping the others once one exited 75
            log.info("received %s again while stopping (after %s): ignored", name, self.signal_name)

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def ignore_from_now_on(self) -> None:
        """After the stop checkpoint: the process only exits now, so further stop signals are
        ignored at the OS level. A Python handler would not do: the interpreter restores the
        default action while it shuts down, and a SIGTERM then (torchrun stopping the other
        workers once one exited 75) would turn this rank's 75 into -15."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

"""Stop signals become a flag, nothing more: Slurm's warning before preemption or the time limit
(SIGUSR1, SIGTERM), and Ctrl-C (SIGINT).

The handler runs between two bytecodes of whatever the main thread was doing, possibly in the
middle of a collective or a checkpoint write: so it only records the signal. The step loop
checks the flag at step boundaries, where all ranks agree to stop together (see trainer.py),
saves, and exits with ``StopFlag.exit_code``: 75 for SIGTERM/SIGUSR1 ("saved, requeue me"), 130
for SIGINT ("saved, stopped by the user"; a requeue would undo the user's Ctrl-C).

A second SIGTERM/SIGUSR1 while stopping is ignored, and so is every one after the stop checkpoint
(``ignore_from_now_on``): torchrun sends SIGTERM to the other workers as soon as one exits
non-zero, 75 included, and a rank killed in its teardown would lose its exit code (and rank 0 the
``exit_status`` file). Before training starts (``exit_before_training``, set by the launcher) a stop
signal ends the process at once with its code: nothing is trained, so nothing is lost, and under
torchrun it is typically torchrun stopping this rank because another one refused the config,
which is no reason to announce a checkpoint. A second SIGINT is different: the user wants out now. After the first one
SIGINT goes back to the operating system's default action, so the next one ends the process at
once, even inside a C call that would delay a Python handler; rank 0 writes 130 to
``exit_status`` when the first one comes, so that file is right either way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
from pathlib import Path

from pipeline.storage import rewrite_small_file

log = logging.getLogger(__name__)

# The exit code that means "saved, requeue me" (BSD's EX_TEMPFAIL); any other non-zero code is
# a real failure that a requeue would only repeat.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_REQUEUE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        # Set by the launcher on rank 0: where a Ctrl-C leaves 130 at once (see the module doc).
        self.exit_status_path: Path | None = None
        self._previous: dict[int, object] = {}
        self._phase = "training"  # "checking" -> "starting" -> "training": see checking_first
        self._loud = True
        self._peer_code = None
        # The launcher whose death is a SIGTERM here (lifetime.die_with_parent): said in the log
        self.launcher_pid: int | None = None

    def checking_first(self, *, loud: bool, peer_code=None) -> None:
        """The launcher's first call: until ``exit_before_training``, the run checks its inputs,
        and a stop signal is only recorded, without the checkpoint announcement (nothing is
        trained): a rank that then finds a mistake still ends with its own code (2), as every rank
        of a failed run must (Slurm requeues a job whose code is 75). ``loud``: say what a stop
        before training does as a warning, else at debug level (not shown; under torchrun a stop
        then is mostly torchrun ending the others after one rank refused). ``peer_code()``: the
        code of another rank that has already refused the run, if any: a rank stopped because of
        it ends with that code too."""
        self._phase, self._loud, self._peer_code = "checking", loud, peer_code

    def exit_before_training(self) -> None:
        """The checks passed: from now until ``training_starts`` a stop signal exits at once
        (nothing to save), and one that came during the checks does so now."""
        self._phase = "starting"
        if self.signal_name is not None:
            self.exit_now(self.signal_name, "before training started")

    def training_starts(self) -> None:
        """From here on a stop signal means "save at the next step boundary"."""
        self._phase = "training"

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        """What a run that stopped for this flag exits with, once its checkpoint is saved."""
        return EXIT_INTERRUPTED if self.signal_name == "SIGINT" else EXIT_PREEMPTED

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self._phase == "starting" and self.signal_name is None:
            self.signal_name = name
            self.exit_now(name, "before training started")
        if signum == signal.SIGINT:
            self._on_interrupt()
        if self._phase == "checking":
            log.log(logging.WARNING if self._loud else logging.DEBUG, "received %s while checking the run: it "
                    "ends once the checks are done (nothing trained, nothing to save)", name)
            self.signal_name = self.signal_name or name
            return
        if self.signal_name is None:
            self.signal_name = name
            if signum == signal.SIGINT:
                log.warning("received SIGINT (Ctrl-C): will save a checkpoint at the next step boundary and "
                            "exit %d; press Ctrl-C again to abort at once without saving", EXIT_INTERRUPTED)
            else:
                why = " (torchrun ended: its death is a SIGTERM to its ranks)" if self._launcher_gone() else ""
                log.warning("received %s%s: will save a checkpoint at the next step boundary and exit %d",
                            name, why, EXIT_PREEMPTED)
        else:  # e.g. Slurm's SIGTERM after its USR1, or torchrun stopping the others once one exited 75
            log.info("received %s again while stopping (after %s): ignored", name, self.signal_name)

    def _launcher_gone(self) -> bool:
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def _on_interrupt(self) -> None:
        """The first Ctrl-C: the next one takes the default action (the process ends at once)."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.exit_status_path is not None:
            try:
                rewrite_small_file(self.exit_status_path, f"{EXIT_INTERRUPTED}\n")
            except OSError:  # no run directory yet, or a full disk: the final write will say it
                pass

    @contextlib.contextmanager
    def ending_the_wait(self, what: str):
        """Around a wait that nothing can interrupt (joining the process group: a C++ call, in
        which the Python handler would only run once the wait timed out, 30 minutes by default):
        a stop signal ends the process at once with ``exit_code``. Nothing is trained yet, so
        nothing is lost. The kernel-level wakeup fd sees the signal while the main thread waits."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                ready, _, _ = select.select([read_end], [], [], 0.2)
                signums = os.read(read_end, 64) if ready else b""
                stops = [n for n in signums if n in STOP_SIGNALS]
                if stops and not done.is_set():
                    self.signal_name = self.signal_name or signal.Signals(stops[0]).name
                    self.exit_now(signal.Signals(stops[0]).name, f"while {what}")

        watcher = threading.Thread(target=watch, name="stop-while-waiting", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            signal.set_wakeup_fd(previous)
            watcher.join()
            os.close(read_end)
            os.close(write_end)

    def exit_now(self, name: str, when: str) -> None:
        """End the process with this flag's code: nothing is trained yet, so nothing is lost. The
        exit status is written only over ``running`` (or where there is none yet): a rank stopped
        because another one failed must not hide that rank's code (2) behind a 75."""
        code = (self._peer_code() if self._peer_code is not None else None) or self.exit_code
        level = logging.WARNING if self._loud else logging.DEBUG
        log.log(level, "received %s %s: nothing trained yet, nothing to save; exiting %d", name, when, code)
        if self.exit_status_path is not None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                path = self.exit_status_path
                if not path.is_file() or path.read_text().strip() in ("", "running"):
                    rewrite_small_file(path, f"{code}\n")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(code)

    def install(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if sig not in self._previous:
                    self._previous[sig] = signal.signal(sig, self._handle)
            if self.signal_name == "SIGINT":  # installed again after a Ctrl-C: keep the abort armed
                signal.signal(signal.SIGINT, signal.SIG_DFL)
        return self

    def ignore_from_now_on(self) -> None:
        """After the stop checkpoint: the process only exits now, so further SIGTERM/SIGUSR1 are
        ignored at the OS level. A Python handler would not do: the interpreter restores the
        default action while it shuts down, and a SIGTERM then (torchrun stopping the other
        workers once one exited 75) would turn this rank's 75 into -15. SIGINT keeps its handler:
        a Ctrl-C then only arms the next one, which ends the process at once."""
        if threading.current_thread() is threading.main_thread():
            for sig in _REQUEUE_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

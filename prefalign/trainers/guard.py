"""Never lose a run: stop cleanly on SIGINT/SIGTERM, skip non-finite steps, give up loudly after K."""

from __future__ import annotations

import math
import signal
import threading

from prefalign.errors import UserError


class StopRequested(UserError):
    """SIGINT/SIGTERM arrived; a checkpoint was written. Exit code 128 + signal number, like a shell."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class GracefulStop:
    """While active, SIGINT/SIGTERM only set ``signum``; the loop checkpoints at the end of the step.

    A second SIGINT while the first is pending raises KeyboardInterrupt at once (the user insists).
    Outside the main thread (signal handlers cannot be installed there) it does nothing. With an ``accelerator``
    of several processes, `check` is a collective: a signal may reach them in different steps, and they stop
    together (the checkpoint is a collective too).
    """

    def __init__(self, accelerator=None):
        self.signum: int | None = None
        self._old: dict = {}
        self._acc = accelerator

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def check(self, step: int, total: int, checkpoint, resume_hint: str) -> None:
        """If a stop was requested (on any process): write a checkpoint (``checkpoint()`` returns its path) and
        raise."""
        if self._acc is not None:
            from prefalign.collectives import process_max

            self.signum = process_max(self.signum or 0, self._acc.device) or None
        if self.signum is None:
            return
        path = checkpoint()
        name = signal.Signals(self.signum).name
        raise StopRequested(
            f"{name}: stopped after step {step} of {total}; checkpoint {path}; resume with: {resume_hint}", self.signum
        )


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient; stops after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0

    @staticmethod
    def finite(*values) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    def record(self, finite: bool, step: int, last_good: str) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise UserError(
                f"non-finite loss or gradients for {self.in_a_row} steps in a row (last at step {step}); "
                f"stopped. Last good checkpoint: {last_good}. Lower --learning-rate, check the data, or "
                "try --precision fp32"
            )

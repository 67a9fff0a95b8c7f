"""How a training run ends early without losing work or training garbage.

* :class:`TrainingStopped`: the run stopped itself for a reason it states in one line;
  ``exit_code`` is the command's exit status (the commands print the line, no traceback).
* :class:`TrainingDiverged`: the loss was NaN or infinite at a step; nothing of that
  step is saved (``last.pt`` keeps the last good step).
* :class:`TrainingInterrupted`: SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) arrived;
  the step under way was finished and ``last.pt`` written before stopping (exit 130 /
  143, the shell's codes for those signals).
* :class:`StopSignals`: while training, catches SIGINT / SIGTERM and only notes them, so
  the loop can stop at the end of a step; a second signal acts as it would have without
  this (Ctrl-C: KeyboardInterrupt; SIGTERM: the process ends): the handlers that were there
  before are put back at the first signal, and on exit.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Dict, Optional


class TrainingStopped(RuntimeError):
    """Training ended before its last step, for the reason in the message."""
    exit_code = 1


class TrainingDiverged(TrainingStopped):
    """The loss became NaN or infinite."""


class TrainingInterrupted(TrainingStopped):
    """A stop signal arrived; the run saved its state first. ``exit_code``: 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager: within it, SIGINT and SIGTERM set :attr:`received` (the signal's
    name) instead of ending the process; a second one acts as before. Outside the main thread (where Python cannot take signals) it does nothing."""

    def __init__(self):
        self.received: Optional[str] = None
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received, self.signum = signal.Signals(signum).name, signum
        self._restore()                     # a second signal acts as it did before (Ctrl-C twice: stop now)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: loader processes ignore SIGINT / SIGTERM (a terminal's
    Ctrl-C and a scheduler's stop reach them too), so that the training process can finish
    its step and save; they end with it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

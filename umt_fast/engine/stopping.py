"""Stopping a training run cleanly on SIGTERM or SIGUSR1 (preemption, a job's time limit) or on
Ctrl-C (SIGINT).

Schedulers ask a job to end before they kill it: SLURM sends SIGTERM (or the signal named by
``--signal``, often SIGUSR1) some time before the hard kill, Kubernetes sends SIGTERM and waits
``terminationGracePeriodSeconds``, torchrun forwards SIGTERM to every rank and waits 30 s. A
training loop inside :class:`StopOnSignal` turns such a signal into a flag. The loop then
saves a checkpoint after the current step and raises :class:`TrainingStopped`; the command
exits with 128 + the signal number, and ``--resume auto`` continues exactly.

When the flag is read: in a single process after every step (free: it is a Python bool). Under
torchrun the ranks must agree on the step to stop after (the checkpoint is collective), so the
flag travels in the all-reduce that every logging point already does, and the run stops at the
next logging point (``--log.every_steps``). A second signal ends the process at once (a second
Ctrl-C as KeyboardInterrupt, which the commands report with exit code 130).

The data loaders' worker processes ignore these signals (`umt_fast.data.dataset.init_worker`):
a scheduler that signals the whole process group must not kill them before the checkpoint.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingStopped(Exception):
    """A run stopped on a signal, after saving its checkpoint.

    Attributes:
        signal_name: "SIGTERM", "SIGUSR1" or "SIGINT".
        step: the last optimizer step done (and saved).
        checkpoint: the checkpoint written at that step.
        exit_code: 128 + the signal number, the shell's convention for a process ended by it.
    """

    def __init__(self, signal_name: str, signal_number: int, step: int, checkpoint: str | None):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint: {checkpoint}")
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signal_number


class StopOnSignal:
    """Context manager (or ``install()`` ... ``restore()``): while open, SIGTERM, SIGUSR1 and SIGINT set
    :attr:`received` instead of ending the process (handlers are installed only from the main
    thread; elsewhere it never fires).

    Args:
        distributed: whether ranks must agree through the logging all-reduce (then
            :meth:`check_every_step` is False).
    """

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopOnSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: stop now, the default way
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.received = signum
        if signum == signal.SIGINT:
            sys.stderr.write("\nCtrl-C: stopping after this step, once its checkpoint is saved "
                             "(Ctrl-C again stops at once, losing the steps since the last checkpoint)\n")

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.received is not None

    @property
    def check_every_step(self) -> bool:
        """True in a single process once a signal arrived: the loop stops after this step (under
        torchrun the ranks agree at the next logging point instead)."""
        return not self.distributed and self.requested

    @property
    def flag(self) -> float:
        """1.0 when requested, else 0.0: the value this rank adds to the logging all-reduce."""
        return float(self.requested)

    def stopped(self, step: int, checkpoint: str | None) -> TrainingStopped:
        """The exception to raise once the checkpoint of ``step`` is saved (on a rank that got
        no signal itself, because another rank did, it reports SIGTERM)."""
        signum = self.received or signal.SIGTERM
        return TrainingStopped(signal.Signals(signum).name, signum, step, checkpoint)


def stop_run(stop: StopOnSignal, step: int, checkpoint: str | None, metrics=None) -> TrainingStopped:
    """Logs the stop (and records it in ``metrics`` on rank 0) and returns the exception to raise."""
    stopped = stop.stopped(step, checkpoint)
    logging.getLogger("umt_fast").warning("%s; resume with --resume auto", stopped)
    if metrics is not None:
        metrics.write({"event": "stopped", "signal": stopped.signal_name, "step": step, "checkpoint": checkpoint})
    return stopped

"""SIGTERM/SIGUSR1 -> "stop when the ranks agree", recorded from the first line of the trainer's CLI.

Imports nothing but the standard library, so `python -m ds_linclip.train` can install the
handlers before it imports torch, DeepSpeed or the config (seconds, during which Python's
default action for SIGTERM/SIGUSR1 would kill the rank and leave the others waiting in their
next collective). The handler only records the signal: what to do is decided by all ranks
together at the trainer's agreement points (`loop.agree_to_stop` and the step loop), so ranks that got the signal
at different moments still leave at the same point.

Only the interpreter's own start-up (before `ds_linclip/train/__main__.py` runs, a fraction of a
second) is left to the default action.
"""

from __future__ import annotations

import os
import signal

REQUEUE_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first SIGTERM/SIGUSR1; the trainer checkpoints (if it trained) and exits 75.

    One per process (`install()`); constructing it installs the handlers.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.signum: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)
            # SA_RESTART: a blocking call in torch's C++ (a rendezvous connect, a gloo read) carries on
            # instead of failing with EINTR; the flag is only read at the agreement points anyway
            signal.siginterrupt(sig, False)

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if self.signum is None:
            self.signum = signum
            # os.write, not print: a handler that prints while the interrupted code is inside a
            # print to the same stream raises "reentrant call" at an arbitrary point of the trainer
            message = (f"[ds_linclip.train] got {signal.Signals(signum).name}: stopping at the next point all "
                       f"ranks agree on (checkpoint if training started), exit {REQUEUE_EXIT_CODE}\n")
            try:
                os.write(2, message.encode())
            except OSError:
                pass

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


_INSTALLED: StopRequest | None = None


def install() -> StopRequest:
    """The process's StopRequest, installing the handlers on the first call (idempotent)."""
    global _INSTALLED
    if _INSTALLED is None:
        _INSTALLED = StopRequest()
    return _INSTALLED

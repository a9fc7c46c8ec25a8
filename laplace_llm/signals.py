"""Signal handlers that only note a signal, for a loop that acts at its next step.

:class:`SignalWatch` replaces the handlers of SIGINT and SIGTERM while it is entered: the
first signal is noted (``pending``), and the loop (e.g. ``fit`` with a checkpoint) writes
what it must at its next batch boundary and then calls :meth:`SignalWatch.deliver`, which
does what the previous handler would have done; a second signal acts at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["SIGNALS", "SignalWatch"]

logger = logging.getLogger(__name__)

#: The signals watched.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalWatch:
    """Signal handlers that only note a signal; the fit loop acts at the next batch boundary."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.previous: dict[int, Any] = {}
        self.pending: int | None = None

    def __enter__(self) -> SignalWatch:
        """Note SIGINT and SIGTERM from now on (main thread only; ignored signals stay so)."""
        if not self.enabled:
            return self
        if threading.current_thread() is not threading.main_thread():
            logger.info("fit runs outside the main thread, where Python cannot handle "
                        "signals: its checkpoint is written every checkpoint_every batches "
                        "only, not on SIGTERM/SIGINT")
            return self
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:
                continue  # ignored on purpose, or set outside Python: left alone
            self.previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        """Restore the previous handlers; pass on a signal still pending."""
        self._restore()
        signum, self.pending = self.pending, None
        if signum is not None and exc[0] is None:
            self._call_previous(signum)

    def _restore(self) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.pending is not None:  # a second signal: act now
            logger.warning("%s again: stopping now, without writing the checkpoint", name)
            self.pending = None
            self._restore_one_and_call(signum, frame)
            return
        self.pending = signum
        logger.warning("%s: the fit writes its checkpoint after the current batch, then "
                       "stops (send it again to stop at once)", name)

    def deliver(self, written: Path | None) -> None:
        """Do what the previous handler of the pending signal does (the checkpoint is written)."""
        signum, self.pending = self.pending, None
        if written is None:
            logger.warning("no new checkpoint was written (nothing new since the last one)")
        self._restore_one_and_call(signum, None)

    def _restore_one_and_call(self, signum: int, frame: Any) -> None:
        previous = self.previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)  # e.g. KeyboardInterrupt; if it returns, the fit goes on
            return
        self._restore()  # SIG_DFL: the default action (SIGINT, SIGTERM: end the process)
        signal.raise_signal(signum)

    def _call_previous(self, signum: int) -> None:
        previous = signal.getsignal(signum)
        if callable(previous):
            previous(signum, None)
        elif previous is signal.SIG_DFL:
            signal.raise_signal(signum)

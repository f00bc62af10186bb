"""How a background daemon (the forge, the bench) stops: gracefully, then at once.

The first SIGINT/SIGTERM (or `request()`) ends the loop before its next job and gives the job in
hand `grace_s` to finish; a second one, or the end of the grace period, stops that job too (the
job polls `job_must_stop`). Signal handlers can only be set from the main thread; elsewhere the
caller stops the daemon with `request()`.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class GracefulStop:
    def __init__(self, grace_s: float, *, log: logging.Logger, job: str):
        self.grace_s = grace_s
        self._log = log
        self._job = job  # what the grace period is for, in the log line ("job", "gauntlet")
        self._requested_at: float | None = None
        self._force = False

    @property
    def requested(self) -> bool:
        return self._requested_at is not None

    def request(self) -> None:
        """A first request lets the current job finish within the grace period; a second ends it
        at once."""
        if self._requested_at is None:
            self._requested_at = time.monotonic()
            self._log.info("%s: stopping; the current %s has %g s to finish",
                           self._log.name.removeprefix("esper."), self._job, self.grace_s)
        else:
            self._force = True

    def job_must_stop(self) -> bool:
        if self._requested_at is None:
            return False
        return self._force or time.monotonic() - self._requested_at > self.grace_s

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM request the stop while inside; the previous handlers come back."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, lambda *_: self.request())
                    for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

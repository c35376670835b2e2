"""Rate-limited logging of errors a guest or a peer can repeat at will.

A hostile guest or front end can make the same mistake millions of times a
second; one log line each would let it fill the disk and burn the CPU of
the process it attacks.  :class:`RateLimitedLog` logs a *kind* of error
(with a key, e.g. a register offset or a ring index) once, and then either
never again (``interval=None``: the MMIO transport, whose errors are
register-level and repetitive) or at most once per ``interval`` seconds,
saying how many were suppressed meanwhile (the vhost-user back end, which
runs for days).  The key set is bounded: past ``max_keys`` distinct keys one
last line says further messages are suppressed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Final

__all__ = ["DEFAULT_MAX_KEYS", "RateLimitedLog"]

#: Distinct keys remembered before further rate-limited messages are dropped.
DEFAULT_MAX_KEYS = 512


class RateLimitedLog:
    """Logs each ``(kind, key)`` once, or once per ``interval`` seconds, to ``logger``.

    ``counts[(kind, key)]`` is how often each was reported, logged or not.
    """

    def __init__(
        self,
        logger: logging.Logger,
        name: str,
        *,
        interval: float | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.logger: Final = logger
        self.name: Final = name
        self.interval: Final = interval
        self.max_keys: Final = max_keys
        #: Reports per key (logged or suppressed).
        self.counts: dict[tuple[str, Hashable], int] = {}
        #: Per key: when it was last logged, and the reports suppressed since.
        self._last: dict[tuple[str, Hashable], tuple[float, int]] = {}
        self._saturated = False

    def warn(
        self, kind: str, key: Hashable, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        self.log(logging.WARNING, kind, key, msg, *args, exc_info=exc_info)

    def log(
        self,
        level: int,
        kind: str,
        key: Hashable,
        msg: str,
        *args: object,
        exc_info: bool = False,
    ) -> None:
        """Log ``msg % args`` at ``level`` unless ``(kind, key)`` was logged too recently."""
        full_key = (kind, key)
        count = self.counts.get(full_key)
        if count is None and len(self.counts) >= self.max_keys:
            if not self._saturated:
                self._saturated = True
                self.logger.warning("%s: too many distinct errors, suppressing further", self.name)
            return
        self.counts[full_key] = (count or 0) + 1
        now = time.monotonic()
        last = self._last.get(full_key)
        if last is not None:
            logged_at, suppressed = last
            if self.interval is None or now - logged_at < self.interval:
                self._last[full_key] = (logged_at, suppressed + 1)
                return
            if suppressed:
                msg += f" ({suppressed} more like it since the last report)"
        self._last[full_key] = (now, 0)
        self.logger.log(level, "%s: " + msg, self.name, *args, exc_info=exc_info)

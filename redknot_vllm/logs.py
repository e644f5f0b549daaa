"""Rate-limited logging for anything a request can trigger: one line per kind of event per
interval, with a count of the lines left out, so no client can flood the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any


class RateLimited:
    """``logger`` lines by kind: the first of a kind is logged at once, then at most one per
    ``interval_s``, which says how many of that kind were left out since the last."""

    def __init__(self, logger: Any, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def log(self, level: int, kind: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log unless a line of ``kind`` went out less than ``interval_s`` ago; returns
        whether it was logged."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._dropped[kind] = self._dropped.get(kind, 0) + 1
            return False
        self._last[kind] = now
        dropped = self._dropped.pop(kind, 0)
        if dropped:
            msg += " (%d similar line(s) left out in the last %.0f s)"
            args = (*args, dropped, now - last if last is not None else 0.0)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def error(self, kind: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        return self.log(logging.ERROR, kind, msg, *args, exc_info=exc_info)

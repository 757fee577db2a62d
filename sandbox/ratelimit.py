"""Sliding-window request limits, as the real API enforces per account."""

from __future__ import annotations

import math
from collections import deque


class SlidingWindow:
    """At most `limit` admissions in any `window` seconds; refusals are not counted."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit = limit
        self.window = window
        self._admitted: deque[float] = deque()

    def admit(self, now: float) -> float | None:
        """Admit and return None, or refuse and return the seconds until a slot frees."""
        if math.isinf(self.limit):
            return None
        while self._admitted and self._admitted[0] <= now - self.window:
            self._admitted.popleft()
        if len(self._admitted) < self.limit:
            self._admitted.append(now)
            return None
        return max(0.0, self._admitted[0] + self.window - now)

    def clear(self) -> None:
        self._admitted.clear()

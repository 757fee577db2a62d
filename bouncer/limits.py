"""In-process pacing: a token bucket and a gate (semaphore + bucket).

Defense in depth only: global limits across processes are the Temporal server's job
(`max_task_queue_activities_per_second`). These keep one process polite on its own.
"""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType


class TokenBucket:
    """`rate_per_minute` tokens a minute, at most `burst` saved up (default 1: even spacing).

    `acquire()` takes one token, sleeping until it is due. Waiters are served in call
    order: each reserves its token ahead (the balance may go negative) and sleeps exactly
    until then, so there is no polling. A waiter cancelled while asleep gives its token back.
    """

    def __init__(self, rate_per_minute: float, burst: int | None = None) -> None:
        if not rate_per_minute > 0:
            raise ValueError("rate_per_minute must be > 0")
        if burst is not None and burst < 1:
            raise ValueError("burst must be >= 1")
        self.rate_per_second = rate_per_minute / 60.0
        self.burst = float(burst if burst is not None else 1)
        self._tokens = self.burst
        self._updated = time.monotonic()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_second)
        self._updated = now

    async def acquire(self) -> None:
        if math.isinf(self.rate_per_second):
            return
        self._refill(time.monotonic())
        self._tokens -= 1.0
        if self._tokens >= 0:
            return
        try:
            await asyncio.sleep(-self._tokens / self.rate_per_second)
        except asyncio.CancelledError:
            self._tokens += 1.0
            raise


class RateGate:
    """At most `max_concurrency` holders at once, each admitted through `bucket`.

    Usage: `async with gate: ...`. The slot is taken first, then the token, so requests
    leave at the bucket's pace and never more than `max_concurrency` are in flight.
    """

    def __init__(self, max_concurrency: int, bucket: TokenBucket) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.bucket = bucket
        self._slots = asyncio.Semaphore(max_concurrency)

    async def __aenter__(self) -> None:
        await self._slots.acquire()
        try:
            await self.bucket.acquire()
        except BaseException:
            self._slots.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._slots.release()

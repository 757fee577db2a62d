"""Heartbeats for activities that spend long stretches inside one SQL statement or HTTP call.

Without them a worker that dies mid-activity is noticed only at `start_to_close_timeout`
(30 minutes for prepare): the chaos run found a user batch stalled that long after a SIGKILL.
With them, Temporal retries elsewhere once `heartbeat_timeout` passes without a beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

from temporalio import activity

# What workflows pass as `heartbeat_timeout` for these activities; beats go out far more often.
HEARTBEAT_TIMEOUT = timedelta(seconds=30)
_EVERY_S = 5.0

P = ParamSpec("P")
R = TypeVar("R")


def heartbeats(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate an async activity (under `@activity.defn`): it heartbeats while it runs."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not activity.in_activity():  # called directly (tests, the CLI): nobody to beat to
            return await fn(*args, **kwargs)

        async def beat() -> None:
            # None at the start: the heartbeat timeout runs from the start anyway, and most of
            # these activities end within a few seconds (each beat is a Temporal server write).
            while True:
                await asyncio.sleep(_EVERY_S)
                activity.heartbeat()

        task = asyncio.create_task(beat())
        try:
            return await fn(*args, **kwargs)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return wrapper

"""Stores wait while this worker process refills the API's slots.

Batches created together finish together, so a lane's completions come in bursts: each frees a
slot that a pack and a creation refill, and each leaves a 10,000-result store behind. All of it
shares the host's cores (and its Postgres). The API bills slot-time, not storing time, so a
regular store waits until this process's dispatch work (a completion heard, a pack, a creation)
has been quiet for STORE_QUIET_S, and never longer than STORE_TURN_WAIT_S (so a fast API's
completions, which never leave the dispatch quiet, cannot hold the stores back for good).

A queue of waiting stores is bounded too: the scheduler counts a batch being stored against its
cap (in flight + storing ≤ 2 × slots), so once more stores wait than a lane has slots, their wait
no longer lets refills run first: it holds them back. The oldest beyond that bound go at once.

Per process, as the CPU is: in a deployment with several worker hosts a store only yields to the
dispatch of its own host. No asyncio primitive is kept (they bind to one event loop, and tests
run many): a waiting store looks again every `_LOOK_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

_LOOK_S = 0.05


class DispatchGate:
    def __init__(self) -> None:
        self._running = 0
        self._last = float("-inf")  # time.monotonic() of the latest dispatch event
        self._waiting: list[object] = []  # the stores waiting for quiet, oldest first

    def heard(self) -> None:
        """A completion was heard: a pack and a creation are about to follow."""
        self._last = time.monotonic()

    @contextlib.contextmanager
    def dispatching(self) -> Iterator[None]:
        """Around a pack or a creation."""
        self._running += 1
        self._last = time.monotonic()
        try:
            yield
        finally:
            self._running -= 1
            self._last = time.monotonic()

    def _wait_s(self, quiet_s: float) -> float:
        if self._running:
            return _LOOK_S
        return self._last + quiet_s - time.monotonic()

    async def quiet(self, quiet_s: float, deadline: float, backlog: int) -> bool:
        """Return once dispatch has been quiet for `quiet_s`, or at `deadline` (time.monotonic()),
        or once more than `backlog` waiters came after this one (then True: it is not to wait more)."""
        me = object()
        self._waiting.append(me)
        try:
            while (wait := self._wait_s(quiet_s)) > 0 and (left := deadline - time.monotonic()) > 0:
                if self._waiting.index(me) < len(self._waiting) - backlog:
                    return True
                await asyncio.sleep(min(wait, left))
            return False
        finally:
            self._waiting.remove(me)


DISPATCH = DispatchGate()  # the process's one gate: packs, creations, the callback receiver, stores

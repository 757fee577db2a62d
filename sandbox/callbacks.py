"""Completion callbacks: POST {"batchId", "status", "quantity"} to the batch's URL."""

from __future__ import annotations

import asyncio
import logging

import httpx
import orjson

log = logging.getLogger("sandbox.callbacks")

RETRY_DELAYS = (0.2, 0.5, 1.0)  # real seconds between attempts


class CallbackSender:
    """Fire-and-forget delivery in background tasks, retried a few times."""

    def __init__(self) -> None:
        self.sent = 0  # delivered with a 2xx answer
        self.failed = 0  # given up after every attempt failed
        self._tasks: set[asyncio.Task[None]] = set()
        # Made now, not at the first callback: building httpx's TLS context takes ~85 ms, which
        # delayed the first completion's callback and stalled the event loop of every request.
        self._client: httpx.AsyncClient | None = httpx.AsyncClient(timeout=5.0)

    def send(self, url: str, batch_id: str, quantity: int) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(url, batch_id, quantity))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, batch_id: str, quantity: int) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=5.0)
        body = orjson.dumps({"batchId": batch_id, "status": "completed", "quantity": quantity})
        headers = {"content-type": "application/json"}
        for attempt in range(len(RETRY_DELAYS) + 1):
            try:
                response = await self._client.post(url, content=body, headers=headers)
                if response.is_success:
                    self.sent += 1
                    return
            except httpx.HTTPError as exc:
                log.debug("callback %s attempt %d failed: %s", batch_id, attempt + 1, exc)
            if attempt < len(RETRY_DELAYS):
                await asyncio.sleep(RETRY_DELAYS[attempt])
        self.failed += 1
        log.warning("callback for batch %s failed after %d attempts", batch_id, len(RETRY_DELAYS) + 1)

    def reset(self) -> None:
        self.sent = 0
        self.failed = 0

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

"""STORE_CONCURRENCY: a worker downloads and stores at most that many Bouncer batches at once;
a store that waited STORE_TURN_WAIT_S runs anyway; an express batch (one small list, its user
waiting) never waits for a turn.

`store_results` runs in Temporal's activity test environment against the real database. The
download is held open (an asyncio event) so that overlapping stores are observable.
"""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import psycopg
from temporalio.testing import ActivityEnvironment

import db
from activities.bouncer_api import BouncerApiActivities
from helpers import make_settings
from workflows.models import StoreRequest

LANE = "deliverability"


class HeldDownloads:
    """Stands in for `BouncerClient.download_raw`: counts downloads in flight, holds them open."""

    def __init__(self) -> None:
        self.in_flight: list[str] = []
        self.most = 0
        self.release = asyncio.Event()

    async def download_raw(self, provider_batch_id: str) -> bytes:
        self.in_flight.append(provider_batch_id)
        self.most = max(self.most, len(self.in_flight))
        try:
            await self.release.wait()
            return b"[]"
        finally:
            self.in_flight.remove(provider_batch_id)


def _batches(db_url: str, express: list[bool]) -> list[tuple[int, str]]:
    """Submitted Bouncer batches with no parts: (id, provider batch id)."""
    out = []
    with psycopg.connect(db_url) as conn, conn.transaction():
        for flag in express:
            provider = uuid.uuid4().hex
            (bb,) = conn.execute(
                "insert into bouncer_batches (lane, pack_key, state, size, provider_batch_id, callback_token, express)"
                " values (%s, %s, 'submitted', 0, %s, 'token', %s) returning id",
                (LANE, f"store-test:{provider}", provider, flag),
            ).fetchone()
            out.append((bb, provider))
    return out


async def _until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within 5 s: {what}")


async def test_at_most_store_concurrency_batches_are_stored_at_once_and_express_ones_never_wait(db_url):
    settings = make_settings(db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"), store_concurrency=2,
                             store_turn_wait_s=1.5)
    pool = db.open_pool(db_url, 8)
    await pool.open()
    try:
        downloads = HeldDownloads()
        api = BouncerApiActivities(settings, pool, downloads)  # type: ignore[arg-type]
        env = ActivityEnvironment()
        regular = _batches(db_url, [False] * 5)
        (express,) = _batches(db_url, [True])

        stores = [asyncio.create_task(env.run(api.store_results, StoreRequest(bb, LANE, download=True)))
                  for bb, _ in regular]
        await _until(lambda: len(downloads.in_flight) == 2, "two regular downloads under way")
        await asyncio.sleep(0.2)
        assert len(downloads.in_flight) == 2  # the other three wait their turn

        # The express batch's store starts at once, beside the two held ones.
        express_store = asyncio.create_task(env.run(api.store_results, StoreRequest(express[0], LANE, download=True)))
        await _until(lambda: express[1] in downloads.in_flight, "the express download")
        assert len(downloads.in_flight) == 3

        # The three that waited run anyway once they have waited STORE_TURN_WAIT_S for a turn.
        waited_from = asyncio.get_running_loop().time()
        await _until(lambda: len(downloads.in_flight) == 6, "the waiting stores to run anyway")
        assert asyncio.get_running_loop().time() - waited_from > 0.8  # they had already waited ~0.3 s

        downloads.release.set()
        await asyncio.wait_for(asyncio.gather(*stores, express_store), timeout=30)
        assert downloads.most == 6
        with psycopg.connect(db_url) as conn:
            states = conn.execute(
                "select state from bouncer_batches where id = any(%s)", ([bb for bb, _ in regular] + [express[0]],)
            ).fetchall()
        assert [s for (s,) in states] == ["stored"] * 6
    finally:
        await pool.close()

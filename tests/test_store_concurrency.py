"""STORE_CONCURRENCY: a worker downloads and stores at most that many Bouncer batches at once;
a regular store first waits for its process's dispatch (packs, creations, completions heard)
to be quiet for STORE_QUIET_S; a store that waited STORE_TURN_WAIT_S, or that more than
MAX_CONCURRENT_BATCHES stores wait behind, runs anyway; an express batch (one small list, its
user waiting) never waits.

`store_results` runs in Temporal's activity test environment against the real database. The
download is held open (an asyncio event) so that overlapping stores are observable.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import psycopg
from helpers import make_settings
from temporalio.testing import ActivityEnvironment

import db
from activities.bouncer_api import BouncerApiActivities
from activities.dispatch_gate import DISPATCH
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


@contextlib.asynccontextmanager
async def _store_api(db_url: str, api_client, **settings) -> AsyncIterator[BouncerApiActivities]:
    """The API activities over a pool of their own, with `api_client` as the Bouncer client."""
    pool = db.open_pool(db_url, 8)
    await pool.open()
    try:
        yield BouncerApiActivities(make_settings(db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"),
                                                 **settings), pool, api_client)
    finally:
        await pool.close()


async def _until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within 5 s: {what}")


async def test_at_most_store_concurrency_batches_are_stored_at_once_and_express_ones_never_wait(db_url):
    downloads = HeldDownloads()
    async with _store_api(db_url, downloads, store_concurrency=2, store_turn_wait_s=1.5) as api:
        env = ActivityEnvironment()
        regular = _batches(db_url, [False] * 5)
        (express,) = _batches(db_url, [True])

        started = asyncio.get_running_loop().time()
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
        await _until(lambda: len(downloads.in_flight) == 6, "the waiting stores to run anyway")
        # Not before STORE_TURN_WAIT_S (1.5 s) from their start: measured from there, not from the
        # express store, so a slow start on a loaded machine does not shorten what is left to wait.
        assert asyncio.get_running_loop().time() - started >= 1.45

        downloads.release.set()
        await asyncio.wait_for(asyncio.gather(*stores, express_store), timeout=30)
        assert downloads.most == 6
        with psycopg.connect(db_url) as conn:
            states = conn.execute(
                "select state from bouncer_batches where id = any(%s)", ([bb for bb, _ in regular] + [express[0]],)
            ).fetchall()
        assert [s for (s,) in states] == ["stored"] * 6


class HeldCreate(HeldDownloads):
    """Also stands in for `BouncerClient.create_batch_body`: the creation is held open until
    `created` is set; downloads answer at once and are recorded with their start time."""

    def __init__(self) -> None:
        super().__init__()
        self.created = asyncio.Event()
        self.release.set()
        self.started: dict[str, float] = {}

    create_gate = contextlib.nullcontext()

    async def create_batch_body(self, body: bytes, callback_url: str | None = None, gate_held: bool = False):
        await self.created.wait()
        return SimpleNamespace(batch_id=uuid.uuid4().hex)

    async def download_raw(self, provider_batch_id: str) -> bytes:
        self.started[provider_batch_id] = asyncio.get_running_loop().time()
        return await super().download_raw(provider_batch_id)


def _packed_batch(db_url: str) -> int:
    """A packed Bouncer batch of one queued address, ready for `submit_batch`."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        (ub,) = conn.execute("insert into user_batches (user_id, state) values ('u', 'queued') returning id").fetchone()
        (address,) = conn.execute("insert into addresses (email) values (%s) returning id",
                                  (f"{uuid.uuid4().hex}@example.com",)).fetchone()
        conn.execute("insert into queue (user_batch_id, lane, seq, address_id) values (%s, %s, 0, %s)",
                     (ub, LANE, address))
        (bb,) = conn.execute(
            "insert into bouncer_batches (lane, pack_key, size, callback_token) values (%s, %s, 1, 'token') returning id",
            (LANE, f"store-test:{uuid.uuid4().hex}"),
        ).fetchone()
        conn.execute("insert into bouncer_batch_parts values (%s, %s, 0, 1, 1)", (bb, ub))
    return bb


async def test_a_regular_store_waits_until_its_process_has_created_the_refills(db_url):
    """A store yields to a creation under way in its worker process, then to STORE_QUIET_S of
    quiet; an express store does not wait; with a creation that never ends it runs anyway after
    STORE_TURN_WAIT_S."""
    api_client = HeldCreate()
    async with _store_api(db_url, api_client, store_quiet_s=0.4, store_turn_wait_s=2.5) as api:
        env = ActivityEnvironment()
        loop = asyncio.get_running_loop()
        (regular, regular_id), (express, express_id) = _batches(db_url, [False, True])

        creating = asyncio.create_task(env.run(api.submit_batch, _packed_batch(db_url)))
        await asyncio.sleep(0.1)
        store = asyncio.create_task(env.run(api.store_results, StoreRequest(regular, LANE, download=True)))
        express_store = asyncio.create_task(env.run(api.store_results, StoreRequest(express, LANE, download=True)))
        await asyncio.wait_for(express_store, timeout=10)  # the express batch's user is waiting
        assert express_id in api_client.started and not creating.done()
        await asyncio.sleep(0.6)
        assert regular_id not in api_client.started  # still creating: the regular store waits

        api_client.created.set()
        created_at = loop.time()
        assert (await asyncio.wait_for(creating, timeout=10)).submitted
        await asyncio.wait_for(store, timeout=10)
        assert 0.35 < api_client.started[regular_id] - created_at < 1.5  # after STORE_QUIET_S of quiet

        # Dispatch that never quiets (a fast API's completions) holds a store back at most
        # STORE_TURN_WAIT_S.
        ((late, late_id),) = _batches(db_url, [False])
        with DISPATCH.dispatching():
            asked_at = loop.time()
            await asyncio.wait_for(env.run(api.store_results, StoreRequest(late, LANE, download=True)), timeout=10)
        assert 2.3 < api_client.started[late_id] - asked_at < 4.0


async def test_stores_beyond_a_lanes_slots_do_not_wait_for_quiet(db_url):
    """The scheduler counts waiting stores against its cap (in flight + storing ≤ 2 × slots):
    once more stores wait than MAX_CONCURRENT_BATCHES, the oldest go at once, so a fast API's
    completions do not stall the lane's dispatch behind stores that wait for a quiet that never
    comes."""
    api_client = HeldCreate()
    async with _store_api(db_url, api_client, max_concurrent_batches=2, store_quiet_s=0.2,
                          store_turn_wait_s=30) as api:
        env = ActivityEnvironment()
        batches = _batches(db_url, [False] * 4)
        stores = []
        with DISPATCH.dispatching():  # dispatch that never quiets
            for bb, _ in batches:
                stores.append(asyncio.create_task(env.run(api.store_results, StoreRequest(bb, LANE, download=True))))
                await asyncio.sleep(0.3)
            await _until(lambda: len(api_client.started) == 2, "the two oldest stores to start")
            await asyncio.sleep(0.5)
            assert set(api_client.started) == {batches[0][1], batches[1][1]}  # two wait: the lane's slots
        await asyncio.wait_for(asyncio.gather(*stores), timeout=10)  # quiet: the other two run
        assert set(api_client.started) == {provider for _, provider in batches}

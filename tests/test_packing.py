"""The packer on a real database: the activities are called directly, outside Temporal.

User batches are ingested the way the CLI does (insert `user_batches`, COPY the rows with
`copy_items`), prepared with `UserBatchActivities.prepare_user_batch`, then packed with
`PackingActivities.pack_batches`. Assertions read `bouncer_batch_parts`.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import orjson
import psycopg
import pytest
from temporalio.testing import ActivityEnvironment

import db
from activities.bouncer_api import BouncerApiActivities
from activities.ingest import copy_items
from activities.packing import PackingActivities
from activities.user_batches import UserBatchActivities
from helpers import make_settings, write_list
from workflows.models import PRIORITIES, PackRequest, PackResult, PauseRequest, StandbyRefresh, StoreRequest

LANE = "deliverability"


class World:
    """One test's database, pool and activities, plus helpers to submit, prepare and pack."""

    def __init__(self, db_url: str, pool, tmp_path: Path) -> None:
        self.db_url = db_url
        self.tmp_path = tmp_path
        settings = make_settings(db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"))
        self.user_batches = UserBatchActivities(settings, pool, client=None)
        self.packer = PackingActivities(pool)
        self._files = 0

    def sql(self, query: str, params=None) -> list[tuple]:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute(query, params).fetchall()

    def submit(self, user: str, emails: list[str], priority: str = "normal") -> int:
        """Ingest like `starter.py submit`: a user_batches row and the file's rows COPYed into items."""
        self._files += 1
        path = write_list(self.tmp_path / f"{self._files}-{user}.csv", emails)
        with psycopg.connect(self.db_url) as conn, conn.transaction():
            (ub,) = conn.execute(
                "insert into user_batches (user_id, name, priority, lanes, source) values (%s, %s, %s, %s, %s)"
                " returning id",
                (user, path.name, PRIORITIES.index(priority), [LANE], str(path)),
            ).fetchone()
            stats = copy_items(conn, ub, path)
            conn.execute("update user_batches set rows_total = %s where id = %s", (stats.rows, ub))
        assert stats.rows == len(emails)
        return ub

    async def add(self, user: str, emails: list[str], priority: str = "normal") -> int:
        ub = self.submit(user, emails, priority)
        progress = await self.user_batches.prepare_user_batch(ub)
        assert progress.state == "queued"
        return ub

    async def pack(self, key: str, slots: int = 15, batch_size: int = 10_000, **express) -> PackResult:
        return await self.packer.pack_batches(
            PackRequest(lane=LANE, pack_key=key, slots=slots, batch_size=batch_size, **express)
        )

    def parts(self, bouncer_batch_id: int | None = None) -> list[tuple[int, str, int, int, int, int]]:
        """(bouncer batch, user, user batch, seq_from, seq_to, addresses), in batch then user-batch order."""
        return self.sql(
            "select p.bouncer_batch_id, b.user_id, p.user_batch_id, p.seq_from, p.seq_to, p.addresses"
            " from bouncer_batch_parts p join user_batches b on b.id = p.user_batch_id"
            " where %(bb)s::bigint is null or p.bouncer_batch_id = %(bb)s"
            " order by p.bouncer_batch_id, p.user_batch_id, p.seq_from",
            {"bb": bouncer_batch_id},
        )

    def composition(self, bouncer_batch_id: int) -> dict[str, int]:
        made: dict[str, int] = defaultdict(int)
        for _bb, user, _ub, _f, _t, n in self.parts(bouncer_batch_id):
            made[user] += n
        return dict(made)

    def packed_addresses(self, user_batch_id: int) -> int:
        return self.sql(
            "select coalesce(sum(addresses), 0) from bouncer_batch_parts where user_batch_id = %s", (user_batch_id,)
        )[0][0]

    def address_id(self, email: str) -> int:
        return self.sql("select id from addresses where email = %s", (email,))[0][0]


def emails(user: str, n: int, start: int = 0) -> list[str]:
    return [f"{user}.{i}@company{i % 41}.example" for i in range(start, start + n)]


def fifo_pack_of_last_user(queues: list[tuple[str, int]], batch_size: int) -> int:
    """In which pack (1-based) the last user's first address goes out if batches are filled oldest first."""
    ahead = sum(n for _u, n in queues[:-1])
    return ahead // batch_size + 1


@pytest.fixture
async def world(db_url, tmp_path):
    pool = db.open_pool(db_url, 4)
    await pool.open()
    try:
        yield World(db_url, pool, tmp_path)
    finally:
        await pool.close()


# ---- the seed's example ----------------------------------------------------------------------


async def test_seed_example_john_alice_bob(world):
    john = await world.add("john", emails("john", 5_000))
    alice = await world.add("alice", emails("alice", 2_000))
    bob = await world.add("bob", emails("bob", 6_000))

    result = await world.pack("k1")

    assert [b.size for b in result.batches] == [10_000, 3_000]
    assert result.queue_drained
    first, second = (b.bouncer_batch_id for b in result.batches)
    assert world.parts(first) == [
        (first, "john", john, 0, 5_000, 5_000),
        (first, "alice", alice, 0, 2_000, 2_000),
        (first, "bob", bob, 0, 3_000, 3_000),
    ]
    assert world.parts(second) == [(second, "bob", bob, 3_000, 6_000, 3_000)]
    assert world.sql("select id, size, state from bouncer_batches order by id") == [
        (first, 10_000, "packed"), (second, 3_000, "packed")
    ]
    # Cursors moved past everything; the queue keeps the claimed rows until results are stored.
    assert world.sql(
        "select user_batch_id, cursor, next_seq, dispatched from user_batch_lanes order by user_batch_id"
    ) == [(john, 5_000, 5_000, 5_000), (alice, 2_000, 2_000, 2_000), (bob, 6_000, 6_000, 6_000)]
    assert world.sql("select count(*) from queue")[0][0] == 13_000

    again = await world.pack("k2")
    assert again.batches == [] and again.queue_drained


# ---- order: priority, fair share, age -------------------------------------------------------


async def test_critical_batch_submitted_after_a_low_one_is_packed_first(world):
    low = await world.add("lou", emails("lou", 300), priority="low")
    normal = await world.add("nora", emails("nora", 300), priority="normal")
    critical = await world.add("cara", emails("cara", 300), priority="critical")

    result = await world.pack("k1", slots=3, batch_size=300)

    assert [world.parts(b.bouncer_batch_id)[0][2] for b in result.batches] == [critical, normal, low]


async def test_priority_outranks_fair_share(world):
    # cara has been served a lot already; her critical batch still goes before a fresh user's normal one.
    await world.add("cara", emails("cara", 1_000), priority="critical")
    await world.pack("k1", slots=1, batch_size=500)
    fresh = await world.add("fred", emails("fred", 200), priority="normal")
    result = await world.pack("k2", slots=2, batch_size=500)
    assert world.composition(result.batches[0].bouncer_batch_id) == {"cara": 500}
    assert world.composition(result.batches[1].bouncer_batch_id) == {"fred": 200}
    assert world.packed_addresses(fresh) == 200


async def test_a_small_batch_is_not_starved_behind_a_big_import(world):
    big = await world.add("alice", emails("alice", 50_000))
    first = await world.pack("k1", slots=1)
    assert world.composition(first.batches[0].bouncer_batch_id) == {"alice": 10_000}
    assert not first.queue_drained

    small = await world.add("bob", emails("bob", 100))
    second = await world.pack("k2", slots=1)

    # Fair share: bob (nothing dispatched yet) goes first, alice fills the rest of the batch.
    assert world.composition(second.batches[0].bouncer_batch_id) == {"bob": 100, "alice": 9_900}
    assert world.packed_addresses(small) == 100
    # FIFO (priority, then age) would have filled pack 2 with alice's next 10,000 and kept bob
    # waiting until pack 6.
    assert fifo_pack_of_last_user([("alice", 50_000), ("bob", 100)], 10_000) == 6

    # The rest of alice's import still goes out, each address once.
    rest = await world.pack("k3", slots=15)
    assert sum(b.size for b in rest.batches) == 50_000 - 10_000 - 9_900
    assert rest.queue_drained
    assert world.packed_addresses(big) == 50_000


async def test_express_slots_send_small_lists_alone_even_when_regular_slots_are_full(world):
    big = await world.add("a", emails("a", 3_000))
    small1 = await world.add("b", emails("b", 100))
    small2 = await world.add("c", emails("c", 150))
    over = await world.add("d", emails("d", 300))  # more than EXPRESS_MAX_ADDRESSES: regular only

    result = await world.pack("x1", slots=0, batch_size=1_000, express_slots=2, express_max_addresses=200)

    # No regular slot: only the small lists go, together (both fit in one express batch), unpadded.
    assert [(b.size, b.express) for b in result.batches] == [(200, True), (50, True)]
    first, second = (b.bouncer_batch_id for b in result.batches)
    assert world.composition(first) == {"b": 100, "c": 100}
    assert world.composition(second) == {"c": 50}
    assert world.sql("select id, express from bouncer_batches order by id") == [(first, True), (second, True)]
    assert world.packed_addresses(big) == world.packed_addresses(over) == 0
    assert world.packed_addresses(small1) == 100 and world.packed_addresses(small2) == 150

    # Regular slots then take the rest; the retry of a pack answers with the express flag too.
    regular = await world.pack("x2", slots=15, batch_size=1_000, express_slots=2, express_max_addresses=200)
    assert all(not b.express for b in regular.batches)
    assert sum(b.size for b in regular.batches) == 3_300 and regular.queue_drained
    again = await world.pack("x1", slots=0, batch_size=1_000, express_slots=2, express_max_addresses=200)
    assert again.batches == result.batches
    assert (await world.packer.unfinished_batches(LANE))[:2] == result.batches


async def test_within_one_priority_and_equal_share_older_batches_go_first(world):
    older = await world.add("ann", emails("ann", 50))
    newer = await world.add("ben", emails("ben", 50))
    result = await world.pack("k1", slots=2, batch_size=50)
    assert [world.parts(b.bouncer_batch_id)[0][2] for b in result.batches] == [older, newer]


# ---- pause / resume ---------------------------------------------------------------------------


async def test_a_paused_user_batch_is_skipped_and_packed_after_resume(world):
    paused = await world.add("pam", emails("pam", 1_000))
    other = await world.add("otto", emails("otto", 500))

    progress = await world.user_batches.set_paused(PauseRequest(paused, True))
    assert progress.state == "paused"
    result = await world.pack("k1")
    assert [world.composition(b.bouncer_batch_id) for b in result.batches] == [{"otto": 500}]
    assert world.packed_addresses(paused) == 0
    assert world.packed_addresses(other) == 500

    progress = await world.user_batches.set_paused(PauseRequest(paused, False))
    assert progress.state == "queued"
    result = await world.pack("k2")
    assert [world.composition(b.bouncer_batch_id) for b in result.batches] == [{"pam": 1_000}]
    assert world.packed_addresses(paused) == 1_000
    assert world.sql("select count(*), count(distinct address_id) from queue where user_batch_id = %s", (paused,)) == [
        (1_000, 1_000)
    ]


async def test_pausing_after_a_partial_pack_releases_only_unclaimed_addresses(world):
    ub = await world.add("pam", emails("pam", 1_500))
    first = await world.pack("k1", slots=1, batch_size=1_000)
    assert first.batches[0].size == 1_000

    await world.user_batches.set_paused(PauseRequest(ub, True))
    # In-flight addresses stay (they are paid for); the 500 unclaimed ones are withdrawn.
    assert world.sql("select count(*) from queue where user_batch_id = %s", (ub,))[0][0] == 1_000
    lane = "select remaining, withdrawn from user_batch_lanes where user_batch_id = %s"
    assert world.sql(lane, (ub,)) == [(1_000, 500)]  # none settled: not 500 of 1,500
    assert (await world.pack("k2", batch_size=1_000)).batches == []

    await world.user_batches.set_paused(PauseRequest(ub, False))
    assert world.sql(lane, (ub,)) == [(1_500, 0)]
    resumed = await world.pack("k3", batch_size=1_000)
    assert [b.size for b in resumed.batches] == [500]
    # Pay once: every address of the list was packed exactly once.
    assert world.packed_addresses(ub) == 1_500
    assert world.sql("select count(distinct address_id) from queue where user_batch_id = %s", (ub,))[0][0] == 1_500


async def test_pausing_the_owner_of_a_shared_address_hands_it_to_the_batch_waiting_on_it(world):
    shared = "shared.lead@company1.example"
    owner = await world.add("ann", [shared, *emails("ann", 9)])
    waiter = await world.add("ben", [shared, *emails("ben", 4)])
    sid = world.address_id(shared)
    assert world.sql("select user_batch_id from queue where address_id = %s", (sid,)) == [(owner,)]

    await world.user_batches.set_paused(PauseRequest(owner, True))
    assert world.sql("select user_batch_id from queue where address_id = %s", (sid,)) == [(waiter,)]
    assert world.sql("select user_batch_id from waits where address_id = %s", (sid,)) == []

    result = await world.pack("k1")
    assert [world.composition(b.bouncer_batch_id) for b in result.batches] == [{"ben": 5}]

    # On resume the former owner waits on the address instead of queueing it again.
    await world.user_batches.set_paused(PauseRequest(owner, False))
    assert world.sql("select user_batch_id from waits where address_id = %s", (sid,)) == [(owner,)]
    result = await world.pack("k2")
    assert [world.composition(b.bouncer_batch_id) for b in result.batches] == [{"ann": 9}]


async def test_parts_count_exactly_the_rows_they_claim_with_and_without_seq_gaps(world):
    """A first prepare numbers a lane's queue densely, so the packer claims seq ranges without
    counting rows; after a pause and a resume whose ON CONFLICT insert skips addresses another
    batch holds, the numbers have gaps and the packer counts. Either way, every part's
    `addresses` is the number of queue rows in its range."""
    def holes(ub: int) -> bool:
        return world.sql("select holes from user_batch_lanes where user_batch_id = %s", (ub,))[0][0]

    def check_parts() -> None:
        for _bb, _user, ub, seq_from, seq_to, n in world.parts():
            rows = world.sql("select count(*) from queue where user_batch_id = %s and lane = %s"
                             " and seq >= %s and seq < %s", (ub, LANE, seq_from, seq_to))[0][0]
            assert rows == n, (ub, seq_from, seq_to)

    shared = emails("shared", 100)
    ben = await world.add("ben", shared)
    ann = await world.add("ann", [*emails("ann", 100), *shared, *emails("ann2", 100)])
    assert (holes(ben), holes(ann)) == (False, False)  # ann's shared 100 wait on ben: not numbered
    await world.pack("k1", slots=2, batch_size=70)
    check_parts()

    await world.user_batches.set_paused(PauseRequest(ann, True))
    assert holes(ann)
    await world.user_batches.set_paused(PauseRequest(ann, False))  # ben still holds the shared 100
    assert holes(ann)
    gaps = world.sql("select max(seq) - min(seq) + 1 - count(*) from queue q join user_batch_lanes l"
                     " on l.user_batch_id = q.user_batch_id and l.lane = q.lane"
                     " where q.user_batch_id = %s and q.seq >= l.cursor", (ann,))[0][0]
    assert gaps > 0  # the case the counting path is for
    while (await world.pack(f"k{len(world.parts())}", slots=3, batch_size=70)).batches:
        pass
    check_parts()
    # Pay once: ann's 200 own addresses were each packed once; the shared ones only by ben.
    assert world.packed_addresses(ann) == 200
    assert world.packed_addresses(ben) == 100


# ---- standby batches, refreshed when new work is owed their places ------------------------------


async def pack_ahead(world, key: str, follow: list[int], batch_size: int = 100) -> list[int]:
    result = await world.packer.pack_batches(
        PackRequest(lane=LANE, pack_key=key, slots=len(follow), batch_size=batch_size, follow=follow))
    assert [b.after for b in result.batches] == follow[: len(result.batches)]
    return [b.bouncer_batch_id for b in result.batches]


def sent_once(world, ub: int) -> tuple[int, int]:
    """(addresses in non-empty batches' parts, distinct ones) of a user batch: each packed once?"""
    return world.sql(
        "select count(*), count(distinct q.address_id) from bouncer_batch_parts p"
        " join queue q on q.user_batch_id = p.user_batch_id and q.lane = %s and q.seq >= p.seq_from and q.seq < p.seq_to"
        " where p.user_batch_id = %s", (LANE, ub))[0]


async def test_standby_batches_give_their_places_to_a_less_served_newcomer(world):
    """Two batches in flight, two packed ahead behind them (ann's 200-400). Ben's list arrives:
    with fair share he is owed their places, so they are emptied, ann's addresses go back under
    her cursor, and the next pack ahead serves ben first."""
    ann = await world.add("ann", emails("ann", 500))
    flying = [b.bouncer_batch_id for b in (await world.pack("r1", slots=2, batch_size=100)).batches]
    standby = await pack_ahead(world, "a1", flying)
    assert [world.composition(bb) for bb in standby] == [{"ann": 100}, {"ann": 100}]

    refresh = StandbyRefresh(LANE, standby)
    assert await world.packer.refresh_standby(refresh) == []  # nobody owed: nothing changes
    assert world.sql("select sum(size) from bouncer_batches where id = any(%s)", (standby,)) == [(200,)]

    await world.add("ben", emails("ben", 150))
    assert await world.packer.refresh_standby(refresh) == standby
    assert world.sql("select size, state from bouncer_batches where id = any(%s)", (standby,)) == [(0, "packed")] * 2
    assert world.parts(standby[0]) == world.parts(standby[1]) == []
    assert world.sql("select cursor, dispatched, holes from user_batch_lanes where user_batch_id = %s", (ann,)) == [
        (200, 200, False)]
    assert await world.packer.refresh_standby(refresh) == standby  # a retry answers the same

    again = await pack_ahead(world, "a2", flying)
    assert [world.composition(bb) for bb in again] == [{"ben": 100}, {"ben": 50, "ann": 50}]
    assert [p[3:5] for p in world.parts(again[1]) if p[1] == "ann"] == [(200, 250)]


async def test_withdrawn_standby_parts_are_numbered_again_when_a_later_pack_claimed_past_them(world):
    """A slot freed (batch r2 packed ann's 400-500) after ann's 200-400 stood by: the cursor cannot
    go back, so those rows are numbered after the queue's end; every address is still packed once."""
    ann = await world.add("ann", emails("ann", 500))
    flying = [b.bouncer_batch_id for b in (await world.pack("r1", slots=2, batch_size=100)).batches]
    standby = await pack_ahead(world, "a1", flying)
    await world.pack("r2", slots=1, batch_size=100)
    ben = await world.add("ben", emails("ben", 50))
    assert await world.packer.refresh_standby(StandbyRefresh(LANE, standby)) == standby
    assert world.sql("select cursor, next_seq, dispatched, holes from user_batch_lanes where user_batch_id = %s",
                     (ann,)) == [(500, 700, 300, True)]
    while await pack_ahead(world, f"a{len(world.parts())}", flying):
        pass
    assert sent_once(world, ann) == (500, 500)
    assert sent_once(world, ben) == (50, 50)


async def test_only_priority_or_fair_share_empties_standby_batches(world):
    """A newcomer of lower priority, or (without fair share) of the same one, is not owed the
    places of standby batches; one of higher priority is, fair share or not."""
    await world.add("ann", emails("ann", 500))
    flying = [b.bouncer_batch_id for b in (await world.pack("r1", slots=1, batch_size=100)).batches]
    standby = await pack_ahead(world, "a1", flying)
    await world.add("lou", emails("lou", 50), priority="low")
    assert await world.packer.refresh_standby(StandbyRefresh(LANE, standby)) == []
    await world.add("ben", emails("ben", 50))
    assert await world.packer.refresh_standby(StandbyRefresh(LANE, standby, fair_share=False)) == []
    await world.add("hal", emails("hal", 50), priority="high")
    assert await world.packer.refresh_standby(StandbyRefresh(LANE, standby, fair_share=False)) == standby


# ---- idempotency ------------------------------------------------------------------------------


async def test_pack_is_idempotent_by_pack_key(world):
    await world.add("ann", emails("ann", 1_200))
    await world.add("ben", emails("ben", 1_300))

    first = await world.pack("k1", slots=2, batch_size=1_000)
    state = world.sql("select user_batch_id, cursor, dispatched from user_batch_lanes order by 1")
    parts = world.parts()
    again = await world.pack("k1", slots=2, batch_size=1_000)

    assert [b.size for b in first.batches] == [1_000, 1_000] and not first.queue_drained
    assert again.batches == first.batches
    assert not again.queue_drained
    # Nothing more was claimed.
    assert world.sql("select count(*) from bouncer_batches")[0][0] == 2
    assert world.parts() == parts
    assert world.sql("select user_batch_id, cursor, dispatched from user_batch_lanes order by 1") == state

    # A new key goes on from where the first pack stopped; the old key still answers the same batches.
    nxt = await world.pack("k2", slots=2, batch_size=1_000)
    assert [b.size for b in nxt.batches] == [500] and nxt.queue_drained
    assert (await world.pack("k1", slots=2, batch_size=1_000)).batches == first.batches


async def test_pack_keys_that_share_a_prefix_do_not_see_each_others_batches(world):
    await world.add("ann", emails("ann", 500))
    seen = set()
    for key in ("k1", "k10", "k1_", "k1%", "k", "run-1:1", "run-1:10", "run-1:2"):
        result = await world.pack(key, slots=1, batch_size=50)
        assert [b.size for b in result.batches] == [50], key
        assert result.batches[0].bouncer_batch_id not in seen, key
        seen.add(result.batches[0].bouncer_batch_id)


async def test_pack_retry_answers_exactly_what_the_first_attempt_answered(world):
    ann = await world.add("ann", emails("ann", 1_500))
    first = await world.pack("k1", slots=1, batch_size=1_000)  # 500 left
    assert first.queued_after == 500 and not first.queue_drained
    second = await world.pack("k2", slots=1, batch_size=500)  # every slot filled, queue drained
    assert second.queue_drained and world.packed_addresses(ann) == 1_500
    assert (await world.pack("k1", slots=1, batch_size=1_000), await world.pack("k2", slots=1, batch_size=500)) == (
        first, second
    )


class Answers:
    """Stands in for `BouncerClient.download_raw`: a `deliverable` record for every address sent."""

    def __init__(self, world: World, bouncer_batch_id: int) -> None:
        self.ids = [i for (i,) in world.sql(
            "select q.address_id from bouncer_batch_parts p join queue q on q.user_batch_id = p.user_batch_id"
            " and q.lane = %s and q.seq >= p.seq_from and q.seq < p.seq_to where p.bouncer_batch_id = %s",
            (LANE, bouncer_batch_id))]

    async def download_raw(self, provider_batch_id: str) -> bytes:
        return orjson.dumps([{"email": f"{i}@x.example", "name": str(i), "status": "deliverable"} for i in self.ids])


async def test_the_store_that_settles_a_small_list_completes_it_and_leaves_a_big_one_to_its_workflow(world):
    small = await world.add("sam", emails("sam", 30))
    big = await world.add("bea", emails("bea", 120))
    (batch,) = (await world.pack("k1", slots=1, batch_size=1_000)).batches
    world.sql("update bouncer_batches set state = 'submitted', provider_batch_id = 'p1' where id = %s returning id",
              (batch.bouncer_batch_id,))
    settings = make_settings(world.db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"),
                             express_max_addresses=100)
    api = BouncerApiActivities(settings, world.packer.pool, Answers(world, batch.bouncer_batch_id))  # type: ignore[arg-type]
    stored = await ActivityEnvironment().run(api.store_results, StoreRequest(batch.bouncer_batch_id, LANE, download=True))

    assert stored.stored == 150
    # A retry (the first attempt's signals failed after its commit) answers what the commit did.
    again = await ActivityEnvironment().run(api.store_results,
                                            StoreRequest(batch.bouncer_batch_id, LANE, download=True))
    assert again == stored
    rows = dict((ub, (state, remaining, finished)) for ub, state, remaining, finished in world.sql(
        "select b.id, b.state, l.remaining, b.finished_at is not null from user_batches b"
        " join user_batch_lanes l on l.user_batch_id = b.id"))
    assert rows == {small: ("completed", 0, True), big: ("queued", 0, False)}
    assert world.sql("select summary from user_batches where id = %s", (small,)) == [
        ({"by_state": {"verified": 30}, "by_status": {"deliverable": 30}},)]
    # Its workflow's next read answers the summary (and ends it); the big list is finalized by it.
    assert (await world.user_batches.advance_user_batch(small)).summary.by_state == {"verified": 30}
    advanced = await world.user_batches.advance_user_batch(big)
    assert advanced.summary.by_state == {"verified": 120} and world.sql(
        "select state from user_batches where id = %s", (big,)) == [("completed",)]


async def test_a_row_cancelled_while_its_batch_was_at_the_api_shows_the_verdict_paid_for(world):
    """Cancelled while its Bouncer batch was at the API: the rows end `cancelled`, and the verdicts
    that batch brought back (paid for) are shown on them and counted in the summary."""
    ub = await world.add("cy", emails("cy", 40))
    (batch,) = (await world.pack("k1", slots=1, batch_size=1_000)).batches
    world.sql("update bouncer_batches set state = 'submitted', provider_batch_id = 'p1' where id = %s returning id",
              (batch.bouncer_batch_id,))
    cancelled = await world.user_batches.cancel_user_batch(ub)
    assert cancelled.by_state == {"cancelled": 40} and cancelled.by_status == {}
    settings = make_settings(world.db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"))
    api = BouncerApiActivities(settings, world.packer.pool, Answers(world, batch.bouncer_batch_id))  # type: ignore[arg-type]
    await ActivityEnvironment().run(api.store_results, StoreRequest(batch.bouncer_batch_id, LANE, download=True))
    assert world.sql("select state, status, count(*) from item_outcomes where user_batch_id = %s group by 1, 2",
                     (ub,)) == [("cancelled", "deliverable", 40)]
    summary = await world.user_batches._summarize(ub)
    assert summary.by_state == {"cancelled": 40} and summary.by_status == {"deliverable": 40}


async def store_answering(world, bouncer_batch_id: int, leave_out: set[int] = frozenset()):
    """Store a batch marked submitted, its download answering every address sent but `leave_out`."""
    world.sql("update bouncer_batches set state = 'submitted', provider_batch_id = %s where id = %s returning id",
              (f"p{bouncer_batch_id}", bouncer_batch_id))
    answers = Answers(world, bouncer_batch_id)
    answers.ids = [i for i in answers.ids if i not in leave_out]
    settings = make_settings(world.db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"))
    api = BouncerApiActivities(settings, world.packer.pool, answers)  # type: ignore[arg-type]
    return await ActivityEnvironment().run(api.store_results, StoreRequest(bouncer_batch_id, LANE, download=True))


async def test_a_list_resumed_while_a_batch_of_it_is_at_the_api_sends_its_unanswered_addresses_again(world):
    """Packed as B1 (seq 0-19) and B2 (20-29); B2 stored; paused and resumed while B1 is at the API;
    B1 comes back without 5 answers. Resume used to set the queue's end to max(seq) + 1 = 20,
    below the cursor (30): the 5 were re-queued at seq 20-24, where the packer never looks, and
    the list stayed `queued` with 5 remaining for good."""
    ub = await world.add("rae", emails("rae", 30))
    b1, b2 = (await world.pack("k1", slots=2, batch_size=20)).batches
    assert (b1.size, b2.size) == (20, 10)
    await store_answering(world, b2.bouncer_batch_id)

    await world.user_batches.set_paused(PauseRequest(ub, True))
    await world.user_batches.set_paused(PauseRequest(ub, False))
    lane = "select cursor, next_seq from user_batch_lanes where user_batch_id = %s"
    assert world.sql(lane, (ub,)) == [(30, 30)]  # never lowered below the cursor

    unanswered = set(Answers(world, b1.bouncer_batch_id).ids[:5])
    stored = await store_answering(world, b1.bouncer_batch_id, leave_out=unanswered)
    assert (stored.stored, stored.requeued) == (15, 5)
    again = (await world.pack("k2", slots=1, batch_size=20)).batches
    assert [b.size for b in again] == [5]
    await store_answering(world, again[0].bouncer_batch_id)
    advanced = await world.user_batches.advance_user_batch(ub)
    assert advanced.state == "completed" and advanced.summary.by_state == {"verified": 30}
    assert world.packed_addresses(ub) == 35  # 30, and the 5 unanswered once more


@pytest.mark.parametrize("stop", ["cancel", "pause"])
async def test_an_unanswered_address_of_a_stopped_list_goes_to_the_list_waiting_on_it(world, stop):
    """Ann owns the shared address and her batch is at the API when she cancels (or pauses) the
    list; ben waits on the address. The batch comes back without its answer. It used to be
    re-queued on ann's queue, which is never packed while she is stopped: ben hung (until cleanup
    deleted ann, 90 days later, or for as long as she stayed paused). Now ben inherits it, with
    its attempt counted."""
    shared = "shared.lead@company1.example"
    ann = await world.add("ann", [shared, *emails("ann", 9)])
    (batch,) = (await world.pack("k1", slots=1, batch_size=100)).batches
    ben = await world.add("ben", [shared, *emails("ben", 4)])
    sid = world.address_id(shared)
    assert world.sql("select user_batch_id from waits where address_id = %s", (sid,)) == [(ben,)]
    if stop == "cancel":
        await world.user_batches.cancel_user_batch(ann)
    else:
        await world.user_batches.set_paused(PauseRequest(ann, True))

    stored = await store_answering(world, batch.bouncer_batch_id, leave_out={sid})
    assert (stored.stored, stored.requeued, stored.dead_lettered) == (9, 1, 0)
    assert world.sql("select user_batch_id, attempts from queue where address_id = %s", (sid,)) == [(ben, 1)]
    assert world.sql("select count(*) from waits") == [(0,)]
    lanes = "select enqueued, shared, remaining from user_batch_lanes where user_batch_id = %s"
    assert world.sql(lanes, (ben,)) == [(5, 0, 5)]
    if stop == "pause":  # ann: nothing in flight any more; the shared address is hers again on resume
        assert world.sql("select remaining, withdrawn from user_batch_lanes where user_batch_id = %s", (ann,)) == [
            (0, 1)]

    (again,) = (await world.pack("k2", slots=1, batch_size=100)).batches
    assert world.composition(again.bouncer_batch_id) == {"ben": 5}
    await store_answering(world, again.bouncer_batch_id)
    advanced = await world.user_batches.advance_user_batch(ben)
    assert advanced.state == "completed" and advanced.summary.by_state == {"verified": 5}
    if stop == "pause":
        await world.user_batches.set_paused(PauseRequest(ann, False))
        assert (await world.pack("k3", slots=1, batch_size=100)).batches == []  # all of ann's have results
        advanced = await world.user_batches.advance_user_batch(ann)
        assert advanced.state == "completed" and advanced.summary.by_state == {"verified": 10}


# ---- cross-batch dedupe and the result cache --------------------------------------------------


async def test_an_address_in_two_user_batches_is_queued_once_and_the_second_waits(world):
    shared = "shared.lead@company1.example"
    ann = await world.add("ann", [shared, *emails("ann", 3)])
    ben = await world.add("ben", [*emails("ben", 2), shared])
    sid = world.address_id(shared)

    assert world.sql("select user_batch_id from queue where lane = %s and address_id = %s", (LANE, sid)) == [(ann,)]
    assert world.sql("select user_batch_id from waits where lane = %s and address_id = %s", (LANE, sid)) == [(ben,)]
    progress = await world.user_batches.read_progress(ben)
    lane = progress.lanes[0]
    assert (lane.unique_addresses, lane.cached, lane.shared, lane.enqueued, lane.remaining) == (3, 0, 1, 2, 3)

    result = await world.pack("k1")
    assert sum(b.size for b in result.batches) == 6  # 4 + 2: the shared address once
    assert world.composition(result.batches[0].bouncer_batch_id) == {"ann": 4, "ben": 2}


async def test_a_fresh_result_is_reused_and_a_stale_one_is_not(world):
    fresh, stale, shared = "fresh@company1.example", "stale@company2.example", "shared@company3.example"
    await world.add("ann", [shared])
    with psycopg.connect(world.db_url) as conn:
        conn.execute("insert into addresses (email) values (%s), (%s)", (fresh, stale))
        conn.execute(
            "insert into results (address_id, lane, status, record, verified_at)"
            " select id, %s, 'deliverable', '{}', case when email = %s then now() else now() - interval '90 days' end"
            " from addresses where email in (%s, %s)",
            (LANE, fresh, fresh, stale),
        )
    cid = await world.add("cid", [fresh, stale, shared, *emails("cid", 2)])

    lane = (await world.user_batches.read_progress(cid)).lanes[0]
    assert (lane.unique_addresses, lane.cached, lane.shared, lane.enqueued, lane.remaining) == (5, 1, 1, 3, 4)
    queued = {e for (e,) in world.sql(
        "select a.email from queue q join addresses a on a.id = q.address_id where q.user_batch_id = %s", (cid,)
    )}
    assert fresh not in queued and stale in queued and shared not in queued

    result = await world.pack("k1")
    assert world.composition(result.batches[0].bouncer_batch_id) == {"ann": 1, "cid": 3}


async def test_an_unknown_verdict_is_reused_only_for_unknown_result_ttl_days(world):
    """`unknown` means the mail provider gave no answer: reused for a day (UNKNOWN_RESULT_TTL_DAYS),
    not for RESULT_TTL_DAYS, so a later submission asks again."""
    recent, older, known = "recent@company1.example", "older@company2.example", "known@company3.example"
    with psycopg.connect(world.db_url) as conn:
        conn.execute("insert into addresses (email) values (%s), (%s), (%s)", (recent, older, known))
        conn.execute(
            "insert into results (address_id, lane, status, record, verified_at)"
            " select id, %s, case when email = %s then 'deliverable' else 'unknown' end, '{}',"
            " case when email = %s then now() - interval '1 hour' else now() - interval '2 days' end"
            " from addresses where email in (%s, %s, %s)",
            (LANE, known, recent, recent, older, known),
        )
    dan = await world.add("dan", [recent, older, known])
    lane = (await world.user_batches.read_progress(dan)).lanes[0]
    assert (lane.unique_addresses, lane.cached, lane.enqueued) == (3, 2, 1)
    assert world.sql("select a.email from queue q join addresses a on a.id = q.address_id"
                     " where q.user_batch_id = %s", (dan,)) == [(older,)]


async def test_prepare_is_idempotent(world):
    ub = world.submit("ann", [*emails("ann", 20), "ann.0@company0.example", "not-an-address"])
    first = await world.user_batches.prepare_user_batch(ub)
    again = await world.user_batches.prepare_user_batch(ub)
    assert again == first
    assert (first.rows, first.invalid, first.duplicates) == (22, 1, 1)
    assert first.lanes[0].enqueued == 20
    assert world.sql("select count(*) from queue")[0][0] == 20


# ---- cost ---------------------------------------------------------------------------------


def _backlog(db_url: str, user: str, rows: int, first_address: int) -> int:
    """A prepared user batch of `rows` queued addresses, built set-wise (no CSV: only the queue matters)."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        (ub,) = conn.execute(
            "insert into user_batches (user_id, state) values (%s, 'queued') returning id", (user,)
        ).fetchone()
        conn.execute(
            "insert into user_batch_lanes (user_batch_id, lane, unique_addresses, enqueued, remaining, next_seq)"
            " values (%s, %s, %s, %s, %s, %s)",
            (ub, LANE, rows, rows, rows, rows),
        )
        conn.execute(
            "insert into queue (user_batch_id, lane, seq, address_id)"
            " select %s, %s, g, %s + g from generate_series(0, %s - 1) g",
            (ub, LANE, first_address, rows),
        )
    return ub


async def test_pack_cost_does_not_grow_with_the_backlog(world):
    began = time.perf_counter()
    small = _backlog(world.db_url, "small", 35_000, 0)
    big = _backlog(world.db_url, "big", 250_000, 10_000_000)
    if time.perf_counter() - began > 8:
        pytest.skip("building the backlog is too slow on this machine")
    with psycopg.connect(world.db_url, autocommit=True) as conn:
        conn.execute("analyze queue")

    async def timed(user_batch_id: int, keys: list[str]) -> float:
        # Only this batch is eligible: pause the other one by state (no release; this is about read cost).
        other = big if user_batch_id == small else small
        with psycopg.connect(world.db_url) as conn:
            conn.execute("update user_batches set state = 'paused' where id = %s", (other,))
            conn.execute("update user_batches set state = 'queued' where id = %s", (user_batch_id,))
        times = []
        for key in keys:
            t = time.perf_counter()
            result = await world.pack(key, slots=1)
            times.append(time.perf_counter() - t)
            assert [b.size for b in result.batches] == [10_000]
        return sorted(times)[len(times) // 2]

    t_small = await timed(small, ["s1", "s2", "s3"])
    t_big = await timed(big, ["b1", "b2", "b3"])
    assert t_big < 3 * t_small + 0.05, (t_small, t_big)


# ---- the pack starts the batches' workflows (since release 3) --------------------------------


async def test_a_pack_starts_one_workflow_per_batch_and_its_retry_starts_none_again(world, dev_env):
    """`PackRequest.start`: each batch's workflow is started once its batch is committed. A retry
    of the pack (same key) answers the same batches and starts no second run of a running one."""
    import uuid

    from temporalio.client import WorkflowExecutionStatus

    from workflows.models import BouncerBatchInput, bouncer_batch_workflow_id

    # Batch ids no earlier test on this Temporal server has used (workflow ids derive from them).
    world.sql("select setval('bouncer_batches_id_seq', %s)", (int(uuid.uuid4().int % 10**12) + 10**6,))
    await world.add("carol", emails("carol", 2_500))
    tiny = await world.add("dave", emails("dave", 40))
    packer = PackingActivities(world.packer.pool, client=dev_env.client)
    queue = f"no-worker-{uuid.uuid4().hex[:8]}"  # nothing runs them: their state is the start's alone
    request = PackRequest(lane=LANE, pack_key=f"start-{uuid.uuid4().hex[:8]}", slots=15, batch_size=1_000,
                          express_slots=1, express_max_addresses=100,
                          start=BouncerBatchInput(0, LANE), start_task_queue=queue)
    first = await packer.pack_batches(request)
    assert sorted((b.size, b.express) for b in first.batches) == [(40, True), (500, False)] + [(1_000, False)] * 2
    assert world.sql("select distinct user_batch_id from bouncer_batch_parts p join bouncer_batches b"
                     " on b.id = p.bouncer_batch_id where b.express") == [(tiny,)]

    async def runs(bb: int) -> list:
        wid = bouncer_batch_workflow_id(LANE, bb)
        return [w async for w in dev_env.client.list_workflows(f"WorkflowId = '{wid}'")]

    for batch in first.batches:
        handle = dev_env.client.get_workflow_handle(bouncer_batch_workflow_id(LANE, batch.bouncer_batch_id))
        started = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes
        assert started.input.payloads and started.task_queue.name == queue
        assert started.priority.priority_key == (1 if batch.express else 0)

    again = await packer.pack_batches(request)
    assert again.batches == first.batches
    for batch in first.batches:
        for _ in range(50):  # the visibility store catches up
            found = await runs(batch.bouncer_batch_id)
            if found:
                break
            await asyncio.sleep(0.1)
        assert [w.status for w in found] == [WorkflowExecutionStatus.RUNNING], batch
        await dev_env.client.get_workflow_handle(bouncer_batch_workflow_id(LANE, batch.bouncer_batch_id)).terminate()


async def test_a_list_is_summarized_alike_whether_its_addresses_are_probed_or_the_table_read(world):
    """The summary probes the address index once the table is 8x the list, else reads it: same counts."""
    rows = emails("gus", 300) + ["gus.1@company1.example", "not-an-address"]
    ub = world.submit("gus", rows)
    await world.user_batches.prepare_user_batch(ub)
    world.sql("insert into results (address_id, lane, status, reason, score, accept_all, record)"
              " select id, %s, case when id %% 3 = 0 then 'risky' else 'deliverable' end, 'x', 50, 'no', '{}'::jsonb"
              " from addresses where email like 'gus.%%' and id %% 2 = 0 returning 1", (LANE,))
    table_read = await world.user_batches._summarize(ub)
    assert table_read.by_state == {"verified": 150, "pending": 150, "duplicate": 1, "invalid": 1}
    assert sum(table_read.by_status.values()) == 151  # the duplicate row shares its address's result
    world.sql("insert into addresses (email) select 'filler' || g || '@x.example' from generate_series(1, 3000) g"
              " returning 1")
    assert world.sql("select max(id) >= 8 * 302 from addresses") == [(True,)]
    assert await world.user_batches._summarize(ub) == table_read

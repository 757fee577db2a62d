"""Lock order between a store and the transactions that change the same list's queue: a resume
(`set_paused`) racing the store of a batch that holds the list's in-flight rows.

Both run as real activities (Temporal's activity test environment) against the real database.
The race is made deterministic by holding, from a third connection, a row lock the store needs
in the middle of its transaction (the lane row of a list that inherits one of its leftovers):
the store has then deleted the paused list's in-flight queue rows and not yet touched its lane
row, which is the window the resume used to walk into.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import psycopg
from helpers import eventually, make_settings
from temporalio.testing import ActivityEnvironment

import db
from activities.bouncer_api import BouncerApiActivities
from activities.user_batches import UserBatchActivities
from workflows.models import PauseRequest, StoreRequest

LANE = "deliverability"


def _setup(db_url: str) -> dict[str, int]:
    """ann's list (paused) has 3 addresses in flight in one submitted Bouncer batch; hal's list
    (queued) waits on the first of them. Returns the ids."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        ann, hal = (conn.execute(
            "insert into user_batches (user_id, state, rows_total) values (%s, %s, 3) returning id", (u, s)
        ).fetchone()[0] for u, s in (("ann", "paused"), ("hal", "queued")))
        emails = [f"race.{i}@lock-order.example" for i in range(3)]
        ids = [conn.execute("insert into addresses (email) values (%s) returning id", (e,)).fetchone()[0]
               for e in emails]
        for row_no, e in enumerate(emails, 1):
            conn.execute("insert into items values (%s, %s, %s, %s, 'pending')", (ann, row_no, e, e))
        conn.execute("insert into items values (%s, 1, %s, %s, 'pending')", (hal, emails[0], emails[0]))
        # ann: all 3 claimed (cursor 3) and in flight; paused, so only those count as remaining.
        conn.execute("insert into user_batch_lanes (user_batch_id, lane, unique_addresses, enqueued, remaining,"
                     " cursor, next_seq, dispatched, holes) values (%s, %s, 3, 3, 3, 3, 3, 3, true)", (ann, LANE))
        conn.execute("insert into user_batch_lanes (user_batch_id, lane, unique_addresses, shared, remaining,"
                     " holes) values (%s, %s, 1, 1, 1, true)", (hal, LANE))
        for seq, a in enumerate(ids):
            conn.execute("insert into queue (user_batch_id, lane, seq, address_id) values (%s, %s, %s, %s)",
                         (ann, LANE, seq, a))
        conn.execute("insert into waits values (%s, %s, %s)", (LANE, ids[0], hal))
        (bb,) = conn.execute(
            "insert into bouncer_batches (lane, pack_key, state, size, sent, provider_batch_id, callback_token)"
            " values (%s, 'lock-order:1', 'submitted', 3, 3, 'p-1', 't') returning id", (LANE,)).fetchone()
        conn.execute("insert into bouncer_batch_parts values (%s, %s, 0, 3, 3)", (bb, ann))
    return {"ann": ann, "hal": hal, "bb": bb}


async def test_a_resume_racing_the_store_of_its_leftovers_does_not_deadlock(db_url):
    ids = _setup(db_url)
    settings = make_settings(db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"))
    pool = db.open_pool(db_url, 4)
    await pool.open()
    env = ActivityEnvironment()
    try:
        store_api = BouncerApiActivities(settings, pool, SimpleNamespace())
        lists = UserBatchActivities(settings, pool, None)
        with psycopg.connect(db_url) as holder:
            # The store will stop at hal's lane row (hand_to_heirs), after deleting ann's queue rows.
            holder.execute("select 1 from user_batch_lanes where user_batch_id = %s for update", (ids["hal"],))
            # The batch came back with no results (abandoned): its 3 addresses are leftovers.
            store = asyncio.create_task(env.run(store_api.store_results, StoreRequest(ids["bb"], LANE, download=False)))

            def waiting() -> int:  # (its own connection: a transaction sees one stats snapshot)
                with psycopg.connect(db_url, autocommit=True) as look:
                    return look.execute("select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                                        " and datname = current_database()").fetchone()[0]

            await eventually(lambda: waiting() == 1, "the store waiting on hal's lane row")
            resume = asyncio.create_task(env.run(lists.set_paused, PauseRequest(ids["ann"], paused=False)))
            await eventually(lambda: waiting() == 2, "the resume waiting behind the store")
            holder.rollback()
            results = await asyncio.wait_for(asyncio.gather(store, resume, return_exceptions=True), timeout=30)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"the store or the resume failed: {errors!r}"
        with psycopg.connect(db_url) as conn:
            # hal inherited the address it waited on; ann queues its other two again and waits on it.
            assert conn.execute("select user_batch_id, count(*) from queue group by 1 order by 1").fetchall() == [
                (ids["ann"], 2), (ids["hal"], 1)]
            assert conn.execute("select user_batch_id from waits").fetchall() == [(ids["ann"],)]
            assert conn.execute("select state from user_batches where id = %s", (ids["ann"],)).fetchone() == (
                "queued",)
            assert conn.execute(
                "select user_batch_id, remaining, withdrawn from user_batch_lanes order by 1").fetchall() == [
                (ids["ann"], 3, 0), (ids["hal"], 1, 0)]
    finally:
        await pool.close()

"""Cleanup on the dev server: what is past retention goes, in bounded chunks; what may still be
needed stays (running batches, the latest run of a recurring list, results a retained batch shows
or the cache may reuse)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from temporalio.service import RPCError
from temporalio.worker import Replayer

import schedules
from helpers import make_settings, running_pipeline
from worker import WORKFLOWS
from workflows.cleanup import CleanupWorkflow
from workflows.models import CLEANUP_SCHEDULE_ID, CleanupInput, CleanupSummary

ROOT = Path(__file__).resolve().parent.parent


def seed(db_url: str) -> dict[str, int]:
    """Batches, items, results, events and bookkeeping of various ages (days ago)."""
    ids: dict[str, int] = {}
    with psycopg.connect(db_url) as conn:
        def batch(name: str, state: str, created: int, finished: int | None, items: int) -> None:
            (ub,) = conn.execute(
                "insert into user_batches (user_id, name, state, created_at, finished_at, rows_total)"
                " values ('u', %s, %s, now() - make_interval(days => %s),"
                " now() - make_interval(days => %s::int), %s) returning id",
                (name, state, created, finished, items),
            ).fetchone()
            ids[name] = ub
            for n in range(1, items + 1):
                conn.execute("insert into items (user_batch_id, row_no, raw, email, state) values (%s, %s, %s, %s,"
                             " 'pending')", (ub, n, f"{name}{n}@old.example", f"{name}{n}@old.example"))
            conn.execute("insert into user_batch_lanes (user_batch_id, lane) values (%s, 'deliverability')", (ub,))

        batch("old_done", "completed", 50, 45, 7)
        batch("old_cancelled", "cancelled", 40, 31, 0)
        batch("old_recurring_latest", "completed", 50, 45, 2)
        batch("running_long", "queued", 60, None, 3)
        batch("recent_done", "completed", 6, 5, 2)
        batch("old_cancelled_in_flight", "cancelled", 40, 35, 1)  # an open Bouncer batch still holds its address
        conn.execute("insert into recurring_lists (schedule_id, user_id, source_user_batch_id, latest_user_batch_id,"
                     " every_s) values ('recurring-list-x', 'u', %s, %s, 86400)",
                     (ids["old_recurring_latest"], ids["old_recurring_latest"]))
        for days in (100, 50, 10):
            (aid,) = conn.execute("insert into addresses (email) values (%s) returning id",
                                  (f"r{days}@old.example",)).fetchone()
            conn.execute("insert into results (address_id, lane, status, record, verified_at) values"
                         " (%s, 'deliverability', 'deliverable', '{}', now() - make_interval(days => %s))", (aid, days))
            ids[f"result{days}"] = aid
        for days, fanned, pending in ((40, True, False), (40, True, True), (40, False, False), (1, True, False)):
            (ev,) = conn.execute("insert into events (kind, created_at, fanned_out) values"
                                 " ('test', now() - make_interval(days => %s), %s) returning id",
                                 (days, fanned)).fetchone()
            if fanned:
                conn.execute("insert into deliveries (event_id, subscription_id, state) values (%s, 1, %s)",
                             (ev, "pending" if pending else "delivered"))
        for days in (40, 1):
            conn.execute("insert into pack_runs (lane, pack_key, batches, addresses, queue_drained, queued_after,"
                         " duration_ms, created_at) values ('deliverability', %s, 0, 0, true, 0, 1,"
                         " now() - make_interval(days => %s))", (f"k{days}", days))
        for key, state, days, owner in (("stored-old", "stored", 40, "old_done"),
                                        ("open-old", "submitted", 40, "old_cancelled_in_flight"),
                                        ("stored-new", "stored", 1, "old_done")):
            (bb,) = conn.execute("insert into bouncer_batches (lane, pack_key, state, size, callback_token, created_at)"
                                 " values ('deliverability', %s, %s, 1, 't', now() - make_interval(days => %s))"
                                 " returning id", (key, state, days)).fetchone()
            conn.execute("insert into bouncer_batch_parts values (%s, %s, 0, 1, 1)", (bb, ids[owner]))
            ids[key] = bb
    return ids


async def test_clean_deletes_only_what_is_past_retention_and_not_needed(dev_env, db_url, sandbox):
    settings = make_settings(db_url, sandbox, cleanup_chunk_rows=3)
    ids = seed(db_url)
    env = {**os.environ, "DATABASE_URL": db_url, "TASK_QUEUE": settings.task_queue, "CLEANUP_CHUNK_ROWS": "3",
           "RESULT_TTL_DAYS": "30", "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host}
    async with running_pipeline(dev_env.client, settings) as p:
        run = await asyncio.to_thread(subprocess.run, [sys.executable, "starter.py", "clean", "--older-than", "30d",
                                                       "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                                      timeout=60)
        assert run.returncode == 0, run.stderr
        printed = json.loads(run.stdout)
        assert printed["deleted"] == {"items": 7, "results": 1, "events": 1, "bouncer_batches": 1, "pack_runs": 1}
        assert printed["user_batches"] == 2
        assert printed["chunks"] > 8  # 7 items in chunks of 3, then a probe per kind: bounded transactions

        left = {name for (name,) in p.sql("select name from user_batches")}
        assert left == {"old_recurring_latest", "running_long", "recent_done", "old_cancelled_in_flight"}
        assert p.sql("select count(*) from items where user_batch_id = %s", (ids["old_done"],)) == [(0,)]
        assert p.sql("select count(*) from user_batch_lanes where user_batch_id in (%s, %s)",
                     (ids["old_done"], ids["old_cancelled"])) == [(0,)]
        assert p.sql("select count(*) from items where user_batch_id = %s", (ids["running_long"],)) == [(3,)]
        # The oldest retained batch began 60 days ago and the TTL is 30: results older than 90 days go.
        kept = {a for (a,) in p.sql("select address_id from results")}
        assert kept == {ids["result50"], ids["result10"]}
        # Old events go with their deliveries, unless not yet fanned out or a delivery is still pending.
        assert p.sql("select count(*) from events") == [(3,)]
        assert p.sql("select state, count(*) from deliveries group by 1 order by 1") == [
            ("delivered", 1), ("pending", 1)]
        assert {k for (k,) in p.sql("select pack_key from bouncer_batches")} == {"open-old", "stored-new"}
        assert p.sql("select count(*) from bouncer_batch_parts where bouncer_batch_id = %s", (ids["stored-old"],)) \
            == [(0,)]

        # A short retention never reaches into the cache TTL nor a running batch.
        summary = await dev_env.client.execute_workflow(
            CleanupWorkflow.run, CleanupInput(0.5, 30.0, 3), id="cleanup-test-short", task_queue=settings.task_queue,
            result_type=CleanupSummary)
        history = await dev_env.client.get_workflow_handle("cleanup-test-short").fetch_history()
        await Replayer(workflows=WORKFLOWS).replay_workflow(history)
        assert summary.user_batches == 1  # recent_done (finished 5 days ago)
        assert {name for (name,) in p.sql("select name from user_batches")} == {
            "old_recurring_latest", "running_long", "old_cancelled_in_flight"}
        assert {a for (a,) in p.sql("select address_id from results")} == {ids["result50"], ids["result10"]}


async def test_the_daily_schedule_is_installed_idempotently_and_runs_the_cleanup(dev_env, db_url, sandbox):
    settings = make_settings(db_url, sandbox, cleanup_cron="17 3 * * *")
    # A worker process of another test (they install it at start) may have left one on this server.
    with contextlib.suppress(RPCError):
        await dev_env.client.get_schedule_handle(CLEANUP_SCHEDULE_ID).delete()
    async with running_pipeline(dev_env.client, settings):
        try:
            assert await schedules.install_cleanup_schedule(dev_env.client, settings) == "created"
            handle = dev_env.client.get_schedule_handle(CLEANUP_SCHEDULE_ID)
            # Running, it is brought to the new settings, its note (what it deletes) too.
            shorter = settings.model_copy(update={"cleanup_retention_days": 60.0})
            assert await schedules.install_cleanup_schedule(dev_env.client, shorter) == "updated"
            assert (await handle.describe()).schedule.state.note == "deletes what is older than 60 days"
            await handle.pause(note="an operator paused it")
            changed = settings.model_copy(update={"cleanup_cron": "5 4 * * *", "cleanup_retention_days": 45.0})
            assert await schedules.install_cleanup_schedule(dev_env.client, changed) == "updated"
            desc = await handle.describe()
            (calendar,) = desc.schedule.spec.calendars  # the server keeps cron as a calendar
            assert (calendar.hour[0].start, calendar.minute[0].start) == (4, 5)
            assert desc.schedule.state.paused  # a worker restart does not undo an operator's pause
            assert desc.schedule.state.note == "an operator paused it"  # nor drop the reason given
            assert desc.schedule.action.workflow == "CleanupWorkflow"

            await handle.trigger()
            deadline = time.monotonic() + 30
            while not (desc := await handle.describe()).info.recent_actions:
                assert time.monotonic() < deadline, "the triggered cleanup did not start"
                await asyncio.sleep(0.2)
            started = desc.info.recent_actions[0].action
            summary = await dev_env.client.get_workflow_handle(
                started.workflow_id, run_id=started.first_execution_run_id, result_type=CleanupSummary).result()
            assert summary.deleted == {"items": 0, "results": 0, "events": 0, "bouncer_batches": 0, "pack_runs": 0}
            age = datetime.now(UTC) - datetime.fromisoformat(summary.cutoff)
            assert abs(age - timedelta(days=45)) < timedelta(minutes=1)  # the updated retention
        finally:
            await dev_env.client.get_schedule_handle(CLEANUP_SCHEDULE_ID).delete()


async def test_a_list_held_past_retention_does_not_pin_the_results_cutoff(db_url):
    """A paused list never resumed is kept, but once it is older than the retention it no longer
    holds every result back: before, the results cutoff was its creation minus the TTL, for
    everyone, for as long as it stayed. A running or finished list still does (it shows what it
    reused), and so does a paused one within the retention."""
    from temporalio.testing import ActivityEnvironment

    import db
    from activities.cleanup import CleanupActivities
    from workflows.models import CleanupChunk, ResultsCutoffRequest

    def batch(state: str, created_days: int) -> None:
        with psycopg.connect(db_url) as conn:
            conn.execute("insert into user_batches (user_id, state, created_at) values"
                         " ('u', %s, now() - make_interval(days => %s))", (state, created_days))

    with psycopg.connect(db_url) as conn:
        for days in (200, 125, 100):
            (aid,) = conn.execute("insert into addresses (email) values (%s) returning id",
                                  (f"r{days}@old.example",)).fetchone()
            conn.execute("insert into results (address_id, lane, status, record, verified_at) values"
                         " (%s, 'deliverability', 'deliverable', '{}', now() - make_interval(days => %s))", (aid, days))
        (now,) = conn.execute("select now()").fetchone()
    batch("paused", 400)  # paused 400 days ago and forgotten
    pool = db.open_pool(db_url, 2)
    await pool.open()
    try:
        acts, env = CleanupActivities(pool), ActivityEnvironment()
        cutoff = (now - timedelta(days=90)).isoformat()

        async def results_cutoff() -> datetime:
            return datetime.fromisoformat(await env.run(acts.results_cutoff, ResultsCutoffRequest(cutoff, 30.0)))

        # Nothing running: the bound is the retention and the TTL, not the lists left behind.
        at = await results_cutoff()
        assert abs(at - (now - timedelta(days=90))) < timedelta(minutes=1), at
        while (await env.run(acts.delete_chunk, CleanupChunk("results", at.isoformat(), 2))).more:
            pass
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select count(*) from results").fetchone() == (0,)  # all verified > 90 days ago

        # A list running or finished (however old) and a paused one within the retention still hold results back.
        for state in ("queued", "completed"):
            batch(state, 100)
            assert abs(await results_cutoff() - (now - timedelta(days=130))) < timedelta(minutes=1)
            with psycopg.connect(db_url) as conn:
                conn.execute("update user_batches set state = 'paused' where state = %s", (state,))
        batch("paused", 70)
        assert abs(await results_cutoff() - (now - timedelta(days=100))) < timedelta(minutes=1)
    finally:
        await pool.close()


async def test_a_user_batch_reopened_while_cleanup_picks_it_keeps_its_items(db_url):
    """`dlq retry` reopens a finished list (state back to queued) in a transaction; a cleanup chunk
    that chose the list as finished just before then waits on its row lock. Once the reopen commits,
    the chunk must see a running list and leave it: before, it deleted the reopened list's items."""
    from temporalio.testing import ActivityEnvironment

    import db
    from activities.cleanup import CleanupActivities
    from workflows.models import CleanupChunk

    with psycopg.connect(db_url) as conn:
        (ub,) = conn.execute(
            "insert into user_batches (user_id, state, created_at, finished_at) values"
            " ('u', 'completed', now() - interval '50 days', now() - interval '45 days') returning id").fetchone()
        for n in (1, 2):
            conn.execute("insert into items (user_batch_id, row_no, raw, email, state) values (%s, %s, 'x', 'x',"
                         " 'pending')", (ub, n))
        (now,) = conn.execute("select now()").fetchone()
    pool = db.open_pool(db_url, 2)
    await pool.open()
    try:
        acts = CleanupActivities(pool)
        async with await psycopg.AsyncConnection.connect(db_url) as reopen:
            # The reopen's transaction (as activities/dead_letters.py's retry does it) holds the row.
            await reopen.execute("update user_batches set state = 'queued', finished_at = null where id = %s",
                                 (ub,))
            chunk = asyncio.create_task(ActivityEnvironment().run(
                acts.delete_chunk, CleanupChunk("items", (now - timedelta(days=30)).isoformat(), 10)))
            await asyncio.sleep(1.0)  # the chunk has chosen the list (seen finished) and waits for its lock
            await reopen.commit()
            await chunk
        while (await ActivityEnvironment().run(
                acts.delete_chunk, CleanupChunk("items", (now - timedelta(days=30)).isoformat(), 10))).more:
            pass
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select state from user_batches where id = %s", (ub,)).fetchall() == [("queued",)]
            assert conn.execute("select count(*) from items where user_batch_id = %s", (ub,)).fetchone() == (2,)
    finally:
        await pool.close()


async def test_cleanup_never_deletes_a_result_a_store_is_writing(db_url):
    """A stale result whose address is being verified again: the store rewrites it (an INSERT ...
    WHERE NOT EXISTS that skips it, then an UPDATE, as `activities/bouncer_api.py` does) in the
    transaction that also resolves the address's queue row. A cleanup chunk running meanwhile must
    leave it. Before, (1) a chunk that waited on the store's row lock deleted the fresh version once
    the store committed, and (2) a chunk that committed between the store's INSERT and UPDATE left
    the UPDATE nothing to update: either way the address lost the result just paid for."""
    from temporalio.testing import ActivityEnvironment

    import db
    from activities.cleanup import CleanupActivities
    from workflows.models import CleanupChunk

    def stale_and_in_flight(name: str) -> int:
        with psycopg.connect(db_url) as conn:
            (aid,) = conn.execute("insert into addresses (email) values (%s) returning id",
                                  (f"{name}@old.example",)).fetchone()
            conn.execute("insert into results (address_id, lane, status, record, verified_at) values"
                         " (%s, 'deliverability', 'deliverable', '{}', now() - interval '200 days')", (aid,))
            # Sent again: its queue row is resolved by the store that writes its new result.
            conn.execute("insert into queue (user_batch_id, lane, seq, address_id) values (1, 'deliverability', %s, %s)",
                         (aid, aid))
        return aid

    def result_of(aid: int) -> list[tuple]:
        with psycopg.connect(db_url) as conn:
            return conn.execute("select status from results where address_id = %s", (aid,)).fetchall()

    with psycopg.connect(db_url) as conn:
        (now,) = conn.execute("select now()").fetchone()
    chunk = CleanupChunk("results", (now - timedelta(days=120)).isoformat(), 10)
    store_insert = ("insert into results (address_id, lane, status, record) select %(a)s, 'deliverability', 'risky', '{}'"
                    " where not exists (select 1 from results where address_id = %(a)s and lane = 'deliverability')")
    store_update = "update results set status = 'risky', verified_at = now() where address_id = %(a)s"
    store_resolve = "delete from queue where address_id = %(a)s"
    pool = db.open_pool(db_url, 2)
    await pool.open()
    found = {}
    try:
        acts = CleanupActivities(pool)
        # (1) The chunk waits on the row the store is rewriting.
        waited = stale_and_in_flight("waited")
        async with await psycopg.AsyncConnection.connect(db_url) as store:
            for sql in (store_insert, store_update):
                await store.execute(sql, {"a": waited})
            cleaning = asyncio.create_task(ActivityEnvironment().run(acts.delete_chunk, chunk))
            await asyncio.sleep(1.0)
            await store.execute(store_resolve, {"a": waited})
            await store.commit()
            await cleaning
        found["waited"] = result_of(waited)
        # (2) The chunk commits between the store's INSERT and its UPDATE.
        between = stale_and_in_flight("between")
        async with await psycopg.AsyncConnection.connect(db_url) as store:
            await store.execute(store_insert, {"a": between})
            await ActivityEnvironment().run(acts.delete_chunk, chunk)
            for sql in (store_update, store_resolve):
                await store.execute(sql, {"a": between})
            await store.commit()
        found["between"] = result_of(between)
        assert found == {"waited": [("risky",)], "between": [("risky",)]}
        # Once stored (and resolved), the new results are fresh: nothing to delete.
        assert (await ActivityEnvironment().run(acts.delete_chunk, chunk)).deleted == 0
    finally:
        await pool.close()

"""Workflow behaviour on the time-skipping test server, with the real activities, a fresh
Postgres database per test and the sandbox over HTTP.

Time on the V1 time-skipping server runs at wall-clock speed while it is "locked" and jumps
ahead to the next timer while it is unlocked and nothing runs. It is unlocked only while a
`handle.result()` of a handle returned by `start_workflow` is awaited (unless inside
`env.auto_time_skipping_disabled()`) and during `env.sleep(...)`. The tests below rely on
that: a long `poll_interval_s` holds a Bouncer batch "at the API" for as long as the test
keeps time locked, and skipping makes it complete when the test wants it to.

Assertions go through the database, workflow queries and results, histories, and the
sandbox's own counters; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.exceptions import CancelledError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Replayer

from activities.user_batches import scheduler_input
from conftest import SANDBOX_KEY
from db import outcomes
from devstack import free_port
from helpers import Pipeline, eventually, make_settings, running_pipeline, write_list
from sandbox.process import running_sandbox
from worker import WORKFLOWS
from workflows.models import (
    DONE_AT_API,
    BatchFinished,
    LanePause,
    Progress,
    SchedulerInput,
    SchedulerState,
    SchedulerStatus,
    Summary,
    UserBatchInput,
    bouncer_batch_workflow_id,
    scheduler_id,
)
from workflows.bouncer_batch import SPARSE_POLLS
from workflows.scheduler import GreedySchedulerWorkflow
from workflows.user_batch import UserBatchWorkflow

LANE = "deliverability"
TERMINAL = {"verified", "invalid", "duplicate", "cancelled", "failed"}


# ---- helpers ----------------------------------------------------------------------------------


def emails(tag: str, n: int, start: int = 0) -> list[str]:
    return [f"{tag}.{i}@company{i % 7}.example" for i in range(start, start + n)]


def sandbox_stats(sandbox) -> dict:
    return httpx.get(f"{sandbox.url}/_sandbox/stats").json()


def status_requests(stats: dict) -> int:
    return sum(stats["requests"].get("status", {}).values())


async def prepared(handle: WorkflowHandle) -> Progress:
    """Wait until the user batch's prepare activity is done (its progress query says so)."""

    async def check():
        p = await handle.query(UserBatchWorkflow.progress)
        return p if p is not None and p.state in ("queued", "paused") else None

    return await eventually(check, f"{handle.id} to be prepared")


async def events(client: Client, workflow_id: str, run_id: str | None = None) -> list:
    return (await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()).events


def scheduled_activities(history_events: list) -> Counter:
    return Counter(
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history_events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    )


def signals(history_events: list) -> Counter:
    return Counter(
        e.workflow_execution_signaled_event_attributes.signal_name
        for e in history_events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    )


def settled(evs: list) -> bool:
    """The last workflow task completed and left nothing pending (its upserts and markers aside)."""
    instant = (EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES, EventType.EVENT_TYPE_MARKER_RECORDED)
    last = next(e for e in reversed(evs) if e.event_type not in instant)
    return last.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED


async def idle_after_signal(client: Client, workflow_id: str, signal_name: str) -> list:
    """Wait until the workflow has received `signal_name` and finished reacting to it.

    Idle = the last event is a completed workflow task: no activity, timer or child pending
    (a search-attribute upsert or patch marker that task recorded may follow it).
    """

    async def check():
        evs = await events(client, workflow_id)
        ok = signals(evs)[signal_name] > 0 and settled(evs)
        return evs if ok else None

    return await eventually(check, f"{workflow_id} to settle after {signal_name}")


async def scheduler_status(client: Client) -> SchedulerStatus:
    return await client.get_workflow_handle(scheduler_id(LANE)).query(GreedySchedulerWorkflow.status)


def lane_row(p: Pipeline, user_batch_id: int) -> dict:
    cols = ("unique_addresses", "cached", "shared", "enqueued", "remaining", "failed", "dispatched")
    (row,) = p.sql(f"select {', '.join(cols)} from user_batch_lanes where user_batch_id = %s and lane = %s",
                   (user_batch_id, LANE))
    return dict(zip(cols, row))


def item_states(p: Pipeline, user_batch_id: int) -> dict[str, int]:
    return dict(p.sql("select state, count(*) from item_outcomes where user_batch_id = %s group by 1",
                      (user_batch_id,)))


def ub_id(handle: WorkflowHandle) -> int:
    return int(handle.id.rsplit("-", 1)[1])


async def run_histories(client: Client, p: Pipeline) -> list[WorkflowHistory]:
    """Every run of every workflow the test produced (the test server cannot list workflows).

    Ids come from the database (user batches, Bouncer batches) plus the lane schedulers;
    continue-as-new chains are followed backwards through `continued_execution_run_id`.
    """
    ids = [wid for (wid,) in p.sql("select workflow_id from user_batches where workflow_id is not null order by id")]
    ids += [bouncer_batch_workflow_id(lane, bb) for bb, lane in p.sql("select id, lane from bouncer_batches order by id")]
    ids += [scheduler_id(lane) for lane in ("deliverability", "catchall")]
    histories = []
    for wid in ids:
        run_id = None
        while True:
            try:
                history = await client.get_workflow_handle(wid, run_id=run_id).fetch_history()
            except RPCError as err:
                if err.status == RPCStatusCode.NOT_FOUND:
                    break
                raise
            histories.append(history)
            run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
            if not run_id:
                break
    return histories


async def _iterate(histories: list[WorkflowHistory]) -> AsyncIterator[WorkflowHistory]:
    for h in histories:
        yield h


async def assert_replays(client: Client, p: Pipeline) -> list[WorkflowHistory]:
    """Invariant 5: the recorded histories replay against today's workflow code."""
    histories = await run_histories(client, p)
    assert histories
    if os.environ.get("RECORD_HISTORIES"):  # refresh tests/histories/ (see test_replay_recorded.py)
        out = Path(os.environ["RECORD_HISTORIES"])
        out.mkdir(parents=True, exist_ok=True)
        for h in histories:
            (out / f"{h.workflow_id}-{h.run_id[:8]}.json").write_text(h.to_json())
    results = await Replayer(workflows=WORKFLOWS).replay_workflows(_iterate(histories), raise_on_replay_failure=False)
    assert not results.replay_failures, {run: repr(err) for run, err in results.replay_failures.items()}
    return histories


# ---- 1. polling ---------------------------------------------------------------------------------


async def test_polling_completes_a_user_batch_with_status_requests_and_no_callbacks(
    skipping_env, db_url, sandbox, tmp_path
):
    env = skipping_env
    rows = emails("poll", 250) + ["poll.1@COMPANY1.example", "not-an-address", "poll.7@company0.example"]
    settings = make_settings(db_url, sandbox, batch_size=100)
    async with running_pipeline(env.client, settings, callbacks_on=False) as p:
        handle = await p.submit_file(write_list(tmp_path / "poll.csv", rows), "pam")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)

        assert summary.state == "completed"
        assert summary.rows == len(rows)
        assert summary.by_state == {"verified": 250, "duplicate": 2, "invalid": 1}
        assert item_states(p, summary.user_batch_id) == summary.by_state
        assert set(summary.by_state) <= TERMINAL
        assert p.sql("select count(*) from items where user_batch_id = %s", (summary.user_batch_id,)) == [(len(rows),)]

        stats = sandbox_stats(sandbox)
        assert status_requests(stats) > 0, stats["requests"]  # completion came from polling
        assert stats["callbacks_sent"] == 0
        assert stats["batches_created"] == 3
        assert stats["addresses_received"] == 250 and stats["addresses_sent_twice"] == 0
        assert p.sql("select state, count(*) from bouncer_batches group by 1") == [("stored", 3)]
        assert p.sql("select count(*) from queue") == [(0,)]
        for (bb,) in p.sql("select id from bouncer_batches"):
            assert scheduled_activities(await events(env.client, bouncer_batch_workflow_id(LANE, bb)))[
                "await_batch_completion"
            ] == 1
        # The user batch's counts are read (and the batch finalized) by `advance_user_batch` alone.
        acts = scheduled_activities(await events(env.client, handle.id))
        assert acts["advance_user_batch"] >= 1 and "read_progress" not in acts and "finalize_user_batch" not in acts
        await assert_replays(env.client, p)


# ---- 2. callbacks -------------------------------------------------------------------------------


@pytest.fixture
def slow_sandbox():
    """A sandbox of its own that processes a 100-address batch in ~0.2 s. The shared one takes
    ~2 ms: a callback could overtake the create's answer being recorded, and the receiver, unable
    to verify it, would leave the slot to the batch workflow (correct, but another path)."""
    with running_sandbox(SANDBOX_KEY, "--time-scale", "100", "--speed", "5") as sb:
        yield sb


async def test_callbacks_complete_a_user_batch_without_any_status_request(skipping_env, db_url, slow_sandbox, tmp_path):
    """With an hour between polls, only the callback signal can end the wait.

    Time skipping stays disabled while waiting: otherwise the server would jump the hour as
    soon as every Bouncer batch sat in its timer (before the sandbox's HTTP callback arrived)
    and polling would win the race. Locked, time runs at wall-clock speed, so a status
    request would take an hour: zero status requests proves the callback path did it.
    """
    env, sandbox = skipping_env, slow_sandbox
    settings = make_settings(db_url, sandbox, batch_size=100, poll_interval_s=3600)
    async with running_pipeline(env.client, settings, callbacks_on=True) as p:
        handle = await p.submit_file(write_list(tmp_path / "cb.csv", emails("cb", 230)), "carl")
        with env.auto_time_skipping_disabled():
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)

        assert summary.state == "completed"
        assert summary.by_state == {"verified": 230}
        stats = sandbox_stats(sandbox)
        assert stats["batches_created"] == 3
        assert stats["callbacks_sent"] >= stats["batches_created"]
        assert status_requests(stats) == 0, stats["requests"]
        batches = httpx.get(f"{sandbox.url}/_sandbox/batches").json()
        assert len(batches) == 3 and all(b["callback"] for b in batches)
        for (bb,) in p.sql("select id from bouncer_batches"):
            evs = await events(env.client, bouncer_batch_workflow_id(LANE, bb))
            assert signals(evs)["completed"] == 1
            assert "await_batch_completion" not in scheduled_activities(evs)
            # The receiver verified the callback, freed the API slot and said so: the batch signals
            # the scheduler once, at its end.
            (completed,) = [e.workflow_execution_signaled_event_attributes for e in evs
                            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
                            and e.workflow_execution_signaled_event_attributes.signal_name == "completed"]
            assert await env.client.data_converter.decode(completed.input.payloads, [bool]) == [True]
            to_scheduler = [e for e in evs if e.event_type == EventType.EVENT_TYPE_SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED
                            and e.signal_external_workflow_execution_initiated_event_attributes.workflow_execution.workflow_id
                            == scheduler_id(LANE)]
            assert len(to_scheduler) == 1
        # So each batch reached the scheduler twice: done at the API (receiver), then stored (workflow).
        assert signals(await events(env.client, scheduler_id(LANE)))["batch_finished"] == 2 * 3
        await assert_replays(env.client, p)


def first_wait(evs) -> timedelta | None:
    """How long a Bouncer batch waited for its callback before its first status poll (None: the
    callback came before the wait began, so no timer was started)."""
    timers = [e.timer_started_event_attributes for e in evs if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED]
    return timers[0].start_to_fire_timeout.ToTimedelta() if timers else None


async def test_fallback_polls_are_sparse_while_the_lanes_callbacks_arrive(skipping_env, db_url, sandbox, tmp_path):
    """A batch polls after 1 interval until a callback has been heard in its lane; after one, after
    SPARSE_POLLS intervals; once a callback is lost (found by a poll), after 1 interval again."""
    env = skipping_env
    lost = {"callback_public_url": f"http://127.0.0.1:{free_port()}"}  # nothing listens: callbacks are lost
    heard: list[tuple[str, timedelta, int]] = []  # per batch: how it completed, its first wait, polls

    async def one_batch(name: str, callbacks_on: bool, **overrides) -> None:
        settings = make_settings(db_url, sandbox, batch_size=100, **overrides)
        async with running_pipeline(env.client, settings, callbacks_on=callbacks_on) as p:
            handle = await p.submit_file(write_list(tmp_path / f"{name}.csv", emails(name, 50)), "sid")
            if callbacks_on:  # see the callbacks test: the wall clock runs, an hour between polls
                with env.auto_time_skipping_disabled():
                    summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)
            else:
                summary = await asyncio.wait_for(handle.result(), timeout=30)
            assert summary.by_state == {"verified": 50}
            ((bb, by_callback),) = p.sql("select id, callback_at is not null from bouncer_batches"
                                         " where id = (select max(id) from bouncer_batches)")
            evs = await events(env.client, bouncer_batch_workflow_id(LANE, bb))
            polls = scheduled_activities(evs).get("await_batch_completion", 0)
            heard.append(("callback" if by_callback else "poll", first_wait(evs), polls))
            await assert_replays(env.client, p)

    await one_batch("lost1", False, **lost)  # a fresh lane: no callback heard yet
    await one_batch("heard", True, poll_interval_s=3600)
    await one_batch("lost2", False, **lost)  # the callbacks work: sparse
    await one_batch("lost3", False, **lost)  # the last one was lost: dense again
    half = timedelta(seconds=0.5)
    assert [(how, polls) for how, _wait, polls in heard] == [("poll", 1), ("callback", 0), ("poll", 1), ("poll", 1)]
    waits = [wait for _how, wait, _polls in heard]
    # (None: the sandbox's callback beat the batch's workflow to its wait)
    assert waits[0] == half and waits[1] in (timedelta(hours=1), None)
    assert waits[2:] == [half * SPARSE_POLLS, half]
    assert sandbox_stats(sandbox)["callbacks_sent"] == 1


# ---- 3. lane pause / resume -----------------------------------------------------------------------


async def test_a_paused_lane_dispatches_nothing_until_resumed(skipping_env, db_url, sandbox, tmp_path):
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100)
    async with running_pipeline(env.client, settings) as p:
        # Like `starter.py pause --lane`: signal-with-start, before the scheduler ever ran.
        await env.client.start_workflow(
            GreedySchedulerWorkflow.run,
            scheduler_input(p.settings, LANE),
            id=scheduler_id(LANE),
            task_queue=p.settings.task_queue,
            start_signal="pause",
            start_signal_args=[LanePause("test")],
        )
        handle = await p.submit_file(write_list(tmp_path / "lp.csv", emails("lp", 150)), "lena")
        await prepared(handle)
        # The user batch nudged the scheduler (work_available) and the scheduler settled without packing.
        evs = await idle_after_signal(env.client, scheduler_id(LANE), "work_available")
        assert "pack_batches" not in scheduled_activities(evs)
        await asyncio.sleep(0.3)  # longer than pack_linger_s: a pack would have begun by now
        status = await scheduler_status(env.client)
        assert status.paused and status.pause_reason == "test"
        assert status.in_flight == 0 and status.dispatched_batches == 0
        assert sandbox_stats(sandbox)["batches_created"] == 0
        assert p.sql("select count(*) from bouncer_batches") == [(0,)]
        assert p.sql("select count(*) from queue where user_batch_id = %s", (ub_id(handle),)) == [(150,)]

        await env.client.start_workflow(
            GreedySchedulerWorkflow.run,
            scheduler_input(p.settings, LANE),
            id=scheduler_id(LANE),
            task_queue=p.settings.task_queue,
            start_signal="resume",
        )
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)
        assert summary.state == "completed" and summary.by_state == {"verified": 150}
        status = await scheduler_status(env.client)
        assert not status.paused and status.pause_reason == ""
        assert status.dispatched_batches == 2
        stats = sandbox_stats(sandbox)
        assert stats["batches_created"] == 2 and stats["addresses_received"] == 150
        await assert_replays(env.client, p)


# ---- 4. user batch pause / resume ----------------------------------------------------------------


async def test_a_user_batch_paused_for_long_continues_as_new_and_then_completes_paying_once(
    skipping_env, db_url, sandbox, tmp_path
):
    """Paused, a list re-reads its counts every recheck period: a week of that would outgrow the
    history. Past `max_history_events` the run continues as new, still paused; resumed, it
    completes, each address sent once."""
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=1, poll_interval_s=30,
                             standby_batches=0)  # see the test below
    async with running_pipeline(env.client, settings) as p:
        started = await p.submit_file(write_list(tmp_path / "w.csv", emails("w", 300)), "wes", max_history_events=40)
        ub = ub_id(started)
        handle = env.client.get_workflow_handle(started.id)  # whichever run is current
        await eventually(lambda: sandbox_stats(sandbox)["batches_created"] == 1, "the first Bouncer batch")
        assert (await handle.execute_update(UserBatchWorkflow.pause)).state == "paused"

        await env.sleep(150)  # 30 re-reads of 5 s
        lengths, run_id = [], started.first_execution_run_id  # the chain of runs, from each one's last event
        while run_id:
            events = (await env.client.get_workflow_handle(started.id, run_id=run_id).fetch_history()).events
            lengths.append(len(events))
            last = events[-1]
            run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                      if last.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW else None)
        assert len(lengths) >= 3 and max(lengths) <= 60, lengths
        assert p.sql("select state from user_batches where id = %s", (ub,)) == [("paused",)]
        assert (await handle.query(UserBatchWorkflow.progress)).state == "paused"
        assert sandbox_stats(sandbox)["addresses_received"] == 100  # nothing more went out while paused

        assert (await handle.execute_update(UserBatchWorkflow.resume)).state == "queued"
        summary: Summary = await asyncio.wait_for(started.result(), timeout=60)  # follows the runs
        assert summary.state == "completed" and summary.by_state == {"verified": 300}
        stats = sandbox_stats(sandbox)
        assert stats["addresses_received"] == 300 and stats["addresses_sent_twice"] == 0
        await assert_replays(env.client, p)


async def test_pausing_a_user_batch_withdraws_its_unclaimed_addresses_and_resume_sends_each_once(
    skipping_env, db_url, sandbox, tmp_path
):
    """One slot, 100 per Bouncer batch, 500 addresses; the first batch waits 30 s at the API
    (a poll interval that passes only when the test lets time skip)."""
    env = skipping_env
    # No standby batch: its submit activity, waiting for batch 1 to leave the API, would hold the
    # test server's clock (time skips only while nothing runs). Standby batches of a paused list:
    # test_pausing_a_list_takes_its_addresses_out_of_standby_batches.
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=1, poll_interval_s=30,
                             standby_batches=0)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "ub.csv", emails("ub", 500)), "uma")
        ub = ub_id(handle)
        await eventually(lambda: sandbox_stats(sandbox)["batches_created"] == 1, "the first Bouncer batch")

        progress: Progress = await handle.execute_update(UserBatchWorkflow.pause)
        assert progress.state == "paused"
        assert progress.remaining == 100  # only the in-flight Bouncer batch is still outstanding
        assert p.sql("select state from user_batches where id = %s", (ub,)) == [("paused",)]
        assert outcomes.lane_progress(p.sql(outcomes.LANE_QUERY, (ub,)))["addresses_settled"] == 0
        # Unclaimed rows withdrawn; the claimed (in-flight) ones stay until their results are stored.
        assert p.sql("select count(*) from queue where user_batch_id = %s", (ub,)) == [(100,)]
        assert p.sql(
            "select count(*) from queue q join user_batch_lanes l using (user_batch_id, lane)"
            " where q.user_batch_id = %s and q.seq >= l.cursor",
            (ub,),
        ) == [(0,)]

        # Let the in-flight batch finish (time skips past its poll interval); nothing more may go out.
        await env.sleep(45)
        await eventually(
            lambda: p.sql("select count(*) from bouncer_batches where state = 'stored'") == [(1,)], "batch 1 stored"
        )
        await idle_after_signal(env.client, scheduler_id(LANE), "batch_finished")
        stats = sandbox_stats(sandbox)
        assert stats["batches_created"] == 1
        assert stats["addresses_received"] == 100 < 500
        assert (await scheduler_status(env.client)).in_flight == 0
        assert (await handle.query(UserBatchWorkflow.progress)).state == "paused"
        assert p.sql("select count(*) from queue") == [(0,)]
        # What `status` and the API show: 100 settled, 400 withdrawn, none in flight.
        assert outcomes.lane_progress(p.sql(outcomes.LANE_QUERY, (ub,)))["addresses_settled"] == 100
        assert p.sql("select remaining, withdrawn from user_batch_lanes where user_batch_id = %s", (ub,)) == [(0, 400)]

        progress = await handle.execute_update(UserBatchWorkflow.resume)
        assert progress.state == "queued"
        assert progress.remaining == 400
        assert lane_row(p, ub)["cached"] == 100  # the stored results are reused, not re-sent
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)

        assert summary.state == "completed" and summary.by_state == {"verified": 500}
        stats = sandbox_stats(sandbox)
        assert stats["addresses_received"] == 500
        assert stats["unique_addresses_received"] == 500
        assert stats["addresses_sent_twice"] == 0
        assert stats["batches_created"] == 5
        await assert_replays(env.client, p)


# ---- 5. cancel ------------------------------------------------------------------------------------


async def test_cancelling_a_user_batch_cancels_its_rows_and_hands_shared_addresses_to_another(
    skipping_env, db_url, sandbox, tmp_path
):
    """A: 300 addresses, its first 100 in flight (one slot, 30 s poll interval), 200 queued.
    B shares 50 of A's in-flight addresses and 100 of A's queued ones, plus 50 of its own.
    Cancelling A: its queued addresses are withdrawn, the 100 B waits on move to B's queue,
    A's rows end `cancelled`; B completes with every address sent exactly once."""
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=1, poll_interval_s=30,
                             standby_batches=0)  # see the test above
    a_rows = emails("a", 300)
    b_rows = a_rows[:50] + a_rows[200:] + emails("b", 50)
    async with running_pipeline(env.client, settings) as p:
        a = await p.submit_file(write_list(tmp_path / "a.csv", a_rows), "ann")
        await eventually(lambda: sandbox_stats(sandbox)["batches_created"] == 1, "A's first Bouncer batch")
        b = await p.submit_file(write_list(tmp_path / "b.csv", b_rows), "ben")
        await prepared(b)
        assert lane_row(p, ub_id(b))["shared"] == 150 and lane_row(p, ub_id(b))["enqueued"] == 50

        await a.cancel()
        with env.auto_time_skipping_disabled():  # keep A's in-flight batch at the API meanwhile
            with pytest.raises(WorkflowFailureError) as raised:
                await asyncio.wait_for(a.result(), timeout=15)
        assert isinstance(raised.value.cause, CancelledError)
        assert (await a.describe()).status == WorkflowExecutionStatus.CANCELED

        ua = ub_id(a)
        assert p.sql("select state from user_batches where id = %s", (ua,)) == [("cancelled",)]
        assert p.sql("select state, count(*) from items where user_batch_id = %s group by 1", (ua,)) == [
            ("cancelled", 300)
        ]
        # Its counts are kept, as a completed batch's are (`status`, the API's `summary`).
        assert p.sql("select summary -> 'by_state' from user_batches where id = %s", (ua,)) == [({"cancelled": 300},)]
        # Only the claimed (in-flight) rows remain, until their batch stores.
        assert p.sql(
            "select count(*) from queue q join user_batch_lanes l using (user_batch_id, lane)"
            " where q.user_batch_id = %s and q.seq >= l.cursor",
            (ua,),
        ) == [(0,)]
        assert p.sql("select count(*) from queue where user_batch_id = %s", (ua,)) == [(100,)]
        lb = lane_row(p, ub_id(b))
        assert (lb["enqueued"], lb["shared"], lb["remaining"]) == (150, 50, 200)
        assert p.sql("select count(*) from waits where user_batch_id = %s", (ub_id(b),)) == [(50,)]

        summary: Summary = await asyncio.wait_for(b.result(), timeout=30)
        assert summary.state == "completed" and summary.by_state == {"verified": 200}
        stats = sandbox_stats(sandbox)
        assert stats["addresses_received"] == 100 + 150  # A's batch 1, then B's; a.100..a.199 never sent
        assert stats["addresses_sent_twice"] == 0
        assert p.sql("select count(*) from queue") == [(0,)]
        assert p.sql("select count(*) from waits") == [(0,)]
        assert item_states(p, ua) == {"cancelled": 300}
        await assert_replays(env.client, p)


async def test_cancelling_a_user_batch_during_an_activity_still_withdraws_it(skipping_env, db_url, sandbox, tmp_path):
    """Hold a lock prepare_user_batch needs, cancel while it waits, then let it finish.

    The cancel reaches the workflow while its prepare activity runs (the activity's cancel
    request is in the history before the lock is released), which is also what happens
    when a user cancels a 2M-row import during prepare, or at any moment the workflow is
    in read_progress. The batch must still end `cancelled` with nothing left queued.
    """
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100)
    async with running_pipeline(env.client, settings) as p:
        with psycopg.connect(db_url) as blocker:
            blocker.execute("lock table addresses in share mode")  # prepare's insert into addresses waits
            handle = await p.submit_file(write_list(tmp_path / "c.csv", emails("c", 120)), "cid")
            await eventually(
                lambda: p.sql("select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                              " and datname = current_database()") == [(1,)],
                "prepare_user_batch to block on the lock",
            )
            await handle.cancel()
            await eventually(
                lambda: _has_event(env.client, handle.id, EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED),
                "the workflow to request the running activity's cancellation",
            )
            blocker.rollback()
        with env.auto_time_skipping_disabled():
            with pytest.raises(WorkflowFailureError) as raised:
                await asyncio.wait_for(handle.result(), timeout=15)
        assert isinstance(raised.value.cause, CancelledError)
        ub = ub_id(handle)
        # The abandoned prepare attempt still commits once the lock is gone.
        await eventually(
            lambda: p.sql("select state from user_batches where id = %s", (ub,)) != [("receiving",)], "prepare"
        )
        assert p.sql("select state from user_batches where id = %s", (ub,)) == [("cancelled",)]
        assert p.sql("select count(*) from queue where user_batch_id = %s", (ub,)) == [(0,)]
        assert "pending" not in item_states(p, ub)
        assert "cancel_user_batch" in scheduled_activities(await events(env.client, handle.id))


async def test_a_list_cancelled_while_its_batch_waits_for_its_creation_turn_is_not_sent(
    dev_env, db_url, sandbox, tmp_path
):
    """A submit takes its creation turn (the in-process gate of the API's creation limit) before
    it builds the request body. A list cancelled while its batch waits for that turn is left out
    of the body: not sent, not paid for."""
    settings = make_settings(db_url, sandbox, batch_size=100, bouncer_max_concurrency=1, standby_batches=0)
    async with running_pipeline(dev_env.client, settings) as p:
        async with p.bouncer.create_gate:  # the gate's one slot: every creation waits for it
            handle = await p.submit_file(write_list(tmp_path / "g.csv", emails("g", 50)), "gia")

            async def submit_waits() -> bool:
                ids = p.sql("select id from bouncer_batches")
                if not ids:
                    return False
                wid = bouncer_batch_workflow_id(LANE, ids[0][0])
                pending = (await dev_env.client.get_workflow_handle(wid).describe()).raw_description.pending_activities
                return any(a.activity_type.name == "submit_batch"
                           and a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED for a in pending)

            await eventually(submit_waits, "the Bouncer batch's submit to wait for its creation turn")
            await handle.cancel()
            await eventually(lambda: p.sql("select state from user_batches where id = %s", (ub_id(handle),))
                             == [("cancelled",)], "the list to be cancelled")
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), timeout=30)
        await eventually(lambda: p.sql("select state from bouncer_batches") == [("stored",)], "the batch to end")
        assert p.sql("select sent, provider_batch_id from bouncer_batches") == [(0, None)]
        stats = sandbox_stats(sandbox)
        assert stats["batches_created"] == 0 and stats["addresses_received"] == 0
        assert item_states(p, ub_id(handle)) == {"cancelled": 50}


async def _has_event(client: Client, workflow_id: str, event_type) -> bool:
    return any(e.event_type == event_type for e in await events(client, workflow_id))


# ---- 6. scheduler continue-as-new ------------------------------------------------------------------


async def test_scheduler_continue_as_new_keeps_in_flight_paused_and_dispatched_state(skipping_env, db_url, sandbox):
    env = skipping_env
    settings = make_settings(db_url, sandbox)
    async with running_pipeline(env.client, settings) as p:
        inp = scheduler_input(p.settings, LANE)
        inp.state = SchedulerState(
            in_flight={"123": 10, "124": 20}, paused=True, pause_reason="held by test", packs=3, dispatched_batches=7,
            queued=55, express_in_flight={"125": 40},
        )
        first = await env.client.start_workflow(
            GreedySchedulerWorkflow.run, inp, id=scheduler_id(LANE), task_queue=p.settings.task_queue
        )
        expected = SchedulerStatus(
            lane=LANE, paused=True, pause_reason="held by test", in_flight=2, in_flight_addresses=30,
            free_slots=p.settings.max_concurrent_batches - 2, dispatched_batches=7, queued=55,
            express_in_flight=1, free_express_slots=p.settings.express_slots - 1,
        )
        assert await first.query(GreedySchedulerWorkflow.status) == expected

        # Every signal is a history event: push the history past the 4,000-event threshold.
        original = env.client.get_workflow_handle(scheduler_id(LANE), run_id=first.first_execution_run_id)
        gate = asyncio.Semaphore(64)

        async def nudge() -> None:
            async with gate:
                await env.client.get_workflow_handle(scheduler_id(LANE)).signal(GreedySchedulerWorkflow.work_available)

        for _ in range(12):
            await asyncio.gather(*(nudge() for _ in range(500)))
            if (await original.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                break
        await eventually(
            lambda: _status_is(original, WorkflowExecutionStatus.CONTINUED_AS_NEW), "continue-as-new"
        )
        first_run = await events(env.client, scheduler_id(LANE), first.first_execution_run_id)
        assert len(first_run) > 4000
        assert first_run[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
        assert "pack_batches" not in scheduled_activities(first_run)  # paused all along

        latest = env.client.get_workflow_handle(scheduler_id(LANE))
        assert (await latest.describe()).run_id != first.first_execution_run_id
        assert await latest.query(GreedySchedulerWorkflow.status) == expected
        # The new run got the same configuration, plus the carried state.
        started = (await events(env.client, scheduler_id(LANE)))[0].workflow_execution_started_event_attributes
        assert started.continued_execution_run_id == first.first_execution_run_id
        (carried,) = await env.client.data_converter.decode(started.input.payloads, [SchedulerInput])
        assert carried.state is not None and carried.state.in_flight == {"123": 10, "124": 20}
        assert carried.state.express_in_flight == {"125": 40}
        assert dataclasses.replace(carried, state=None) == dataclasses.replace(inp, state=None)

        # The carried in-flight entries are real slots: finishing one frees it.
        await latest.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(123, "stored"))
        status = await eventually(lambda: _status_if(latest, lambda s: s.in_flight == 1), "slot 123 freed")
        assert status.in_flight_addresses == 20 and status.free_slots == p.settings.max_concurrent_batches - 1
        assert status.paused and status.dispatched_batches == 7

        await latest.signal(GreedySchedulerWorkflow.resume)
        await latest.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(124, "stored"))
        status = await eventually(lambda: _status_if(latest, lambda s: s.in_flight == 0 and not s.paused), "resume")
        assert status.free_slots == p.settings.max_concurrent_batches and status.dispatched_batches == 7
        # Resumed with an empty queue: it packs once, finds nothing, and dispatches nothing.
        evs = await eventually(
            lambda: _idle_with(env.client, lambda evs: scheduled_activities(evs)["pack_batches"] >= 1), "a pack"
        )
        assert p.sql("select count(*) from bouncer_batches") == [(0,)]
        assert (await latest.query(GreedySchedulerWorkflow.status)).dispatched_batches == 7
        assert len(evs) < 4000

        histories = await assert_replays(env.client, p)
        assert sum(h.workflow_id == scheduler_id(LANE) for h in histories) == 2


async def test_messages_delivered_with_a_continued_runs_first_task_act_on_the_state_it_carries(
    skipping_env, db_url, sandbox
):
    """A continued run's first task can carry signals (the callback receiver's `batch_finished`, a
    pause): their handlers run before `run` has loaded the carried state. They must still act on
    it: before, a `batch_finished` met the empty default state and its slot stayed taken for good."""
    env = skipping_env
    settings = make_settings(db_url, sandbox)
    async with running_pipeline(env.client, settings) as p:
        slots = p.settings.max_concurrent_batches

        async def start(state: SchedulerState, signal: str, args: list) -> WorkflowHandle:
            inp = dataclasses.replace(scheduler_input(p.settings, LANE), state=state)
            return await env.client.start_workflow(  # signal-with-start: the signal rides the first task
                GreedySchedulerWorkflow.run, inp, id=scheduler_id(LANE), task_queue=p.settings.task_queue,
                start_signal=signal, start_signal_args=args,
            )

        held = dict(paused=True, pause_reason="held by test")
        handle = await start(SchedulerState(in_flight={"123": 10, "124": 20}, **held),
                             "batch_finished", [BatchFinished(123, "stored")])
        status = await eventually(lambda: _status_if(handle, lambda s: s.lane == LANE), "the first task")
        assert (status.in_flight, status.in_flight_addresses, status.free_slots) == (1, 20, slots - 1)
        assert status.paused and status.pause_reason == "held by test"
        await handle.terminate("next case")

        handle = await start(SchedulerState(storing={"7": 10}, **held), "batch_finished", [BatchFinished(7, "stored")])
        status = await eventually(lambda: _status_if(handle, lambda s: s.lane == LANE), "the first task")
        assert status.storing == 0
        await handle.terminate("next case")

        handle = await start(SchedulerState(in_flight={"125": 10}), "pause", [LanePause("maintenance")])
        status = await eventually(lambda: _status_if(handle, lambda s: s.lane == LANE), "the first task")
        assert status.paused and status.pause_reason == "maintenance" and status.in_flight == 1
        await handle.terminate("next case")

        handle = await start(SchedulerState(in_flight={"126": 10}, **held), "resume", [])
        status = await eventually(lambda: _status_if(handle, lambda s: s.lane == LANE and not s.paused), "resumed")
        assert status.in_flight == 1 and status.pause_reason == ""
        resumed = await eventually(
            lambda: p.sql("select data->>'reason' from events where kind = 'lane.resumed'"), "lane.resumed")
        assert resumed == [("held by test",)]
        await handle.terminate("test over")
        await assert_replays(env.client, p)


async def test_a_pause_delivered_with_a_user_batchs_first_task_pauses_it_once_prepared(
    skipping_env, db_url, sandbox, tmp_path
):
    """An update handled before `run` began (the worker busy when the user paused right after
    submitting) found the list still `preparing`: the database ignored the pause, the update
    answered as if done, and prepare queued the whole list. It now waits for prepare."""
    env = skipping_env
    settings = make_settings(db_url, sandbox)
    p = Pipeline(env.client, settings)
    handle = await p.submit_file(write_list(tmp_path / "early.csv", emails("early", 40)), "eve")  # no worker yet
    pausing = asyncio.create_task(handle.execute_update(UserBatchWorkflow.pause))
    await asyncio.sleep(1.0)  # the update waits at the server for the workflow's first task
    async with running_pipeline(env.client, settings) as p:
        progress: Progress = await asyncio.wait_for(pausing, timeout=30)
        assert progress.state == "paused"
        ub = ub_id(handle)
        assert p.sql("select state from user_batches where id = %s", (ub,)) == [("paused",)]
        history = await handle.fetch_history()
        first_task = [e.event_type for e in history.events[:8]]
        assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED in first_task  # it did ride the first task
        await asyncio.sleep(1.0)
        assert sandbox_stats(sandbox)["addresses_received"] == 0
        assert p.sql("select count(*) from bouncer_batches") == [(0,)]

        assert (await handle.execute_update(UserBatchWorkflow.resume)).state == "queued"
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 40}
        assert sandbox_stats(sandbox)["addresses_received"] == 40
        await assert_replays(env.client, p)


async def test_batches_done_at_the_api_free_their_slot_but_at_most_one_slots_worth_waits_to_be_stored(
    skipping_env, db_url, sandbox
):
    """A batch done at the API frees its API slot, but while its results are stored it still
    counts against a second allowance of MAX_CONCURRENT_BATCHES: stores that fall behind the API
    hold dispatch back instead of letting downloaded-but-unstored batches pile up."""
    env = skipping_env
    settings = make_settings(db_url, sandbox, max_concurrent_batches=3)
    async with running_pipeline(env.client, settings) as p:
        inp = scheduler_input(p.settings, LANE)
        inp.state = SchedulerState(in_flight={"1": 10, "2": 10, "3": 10}, storing={"7": 10, "8": 10, "9": 10},
                                   paused=True, pause_reason="held by test")
        handle = await env.client.start_workflow(
            GreedySchedulerWorkflow.run, inp, id=scheduler_id(LANE), task_queue=p.settings.task_queue
        )
        status = await handle.query(GreedySchedulerWorkflow.status)
        assert (status.in_flight, status.storing, status.free_slots) == (3, 3, 0)

        # Done at the API: the API slot is free, but three batches are already being stored.
        await handle.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(1, DONE_AT_API))
        status = await eventually(lambda: _status_if(handle, lambda s: s.in_flight == 2), "batch 1 done at the API")
        assert (status.storing, status.free_slots) == (4, 0)
        # A repeat (the callback receiver and the batch workflow both send it) changes nothing.
        await handle.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(1, DONE_AT_API))
        # Stored: it leaves the store allowance, and a slot opens.
        await handle.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(7, "stored"))
        status = await eventually(lambda: _status_if(handle, lambda s: s.storing == 3), "batch 7 stored")
        assert (status.in_flight, status.free_slots) == (2, 1)
        # A batch that ends without its results (e.g. create failed) leaves both at once.
        await handle.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(2, "failed"))
        status = await eventually(lambda: _status_if(handle, lambda s: s.in_flight == 1), "batch 2 failed")
        assert (status.storing, status.free_slots) == (3, 2)
        await handle.terminate("test over")


async def _status_is(handle: WorkflowHandle, status: WorkflowExecutionStatus) -> bool:
    return (await handle.describe()).status == status


async def _status_if(handle: WorkflowHandle, pred) -> SchedulerStatus | None:
    s = await handle.query(GreedySchedulerWorkflow.status)
    return s if pred(s) else None


async def _idle_with(client: Client, pred) -> list | None:
    evs = await events(client, scheduler_id(LANE))
    return evs if pred(evs) and settled(evs) else None


# ---- 6b. standby batches ------------------------------------------------------------------------
# Packed ahead while every slot is busy, each following one in-flight batch. The sandbox below
# keeps a 100-address batch ~0.5 s at the API, so the slots stay full and standby batches wait.
# Time skipping stays disabled: a waiting standby activity holds the clock anyway.


@pytest.fixture
def paced_sandbox():
    """A sandbox of its own that processes a 100-address batch in ~0.5 s of real time."""
    with running_sandbox(SANDBOX_KEY, "--time-scale", "100", "--speed", "2") as sb:
        yield sb


@pytest.fixture
def slow_paced_sandbox():
    """A sandbox of its own that keeps a 100-address batch ~1.5 s at the API (a test acts meanwhile)."""
    with running_sandbox(SANDBOX_KEY, "--time-scale", "100", "--speed", "0.67") as sb:
        yield sb


def standby_rows(p: Pipeline) -> list[tuple]:
    return p.sql("select id, after_id, state, size from bouncer_batches where after_id is not null order by id")


def sandbox_batches(sandbox) -> dict[str, dict]:
    return {b["batchId"]: b for b in httpx.get(f"{sandbox.url}/_sandbox/batches").json()}


@pytest.mark.parametrize("callbacks_on", [False, True], ids=["polling", "callbacks"])
async def test_standby_batches_are_created_only_after_the_batch_they_follow_left_the_api(
    skipping_env, db_url, paced_sandbox, tmp_path, callbacks_on
):
    """Two slots, 100 per batch, 1,000 addresses: the batches packed ahead wait for the one they
    follow, so the API never holds more than two of ours, and every address goes once."""
    env, sandbox = skipping_env, paced_sandbox
    # Stores at once (no quiet to wait for): a lagging store holds packing ahead back, as it does packing.
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=2, express_slots=0,
                             poll_interval_s=0.2, store_quiet_s=0)
    async with running_pipeline(env.client, settings, callbacks_on=callbacks_on) as p:
        handle = await p.submit_file(write_list(tmp_path / "sb.csv", emails("sb", 1000)), "sol")
        with env.auto_time_skipping_disabled():
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 1000}

        standby = standby_rows(p)
        assert len(standby) >= 4, standby  # 10 batches, 2 at a time: most of them waited as standby
        at_api = sandbox_batches(sandbox)
        provider = dict(p.sql("select id, provider_batch_id from bouncer_batches"))
        for bb, after, state, size in standby:
            assert (state, size) == ("stored", 100)
            mine, followed = at_api[provider[bb]], at_api[provider[after]]
            assert mine["created"] >= followed["completed"], (bb, mine, after, followed)
        # At no moment did the API hold more than the lane's two slots of our batches.
        edges = sorted([(b["created"], 1) for b in at_api.values()] + [(b["completed"], -1) for b in at_api.values()],
                       key=lambda e: (e[0], e[1]))
        open_now = peak = 0
        for _at, step in edges:
            open_now += step
            peak = max(peak, open_now)
        assert peak <= 2
        stats = sandbox_stats(sandbox)
        assert (stats["batches_created"], stats["addresses_received"], stats["addresses_sent_twice"]) == (10, 1000, 0)
        status = await scheduler_status(env.client)
        assert (status.in_flight, status.standby) == (0, 0)
        await assert_replays(env.client, p)


async def test_a_paused_lane_holds_its_standby_batches_until_resumed(skipping_env, db_url, slow_paced_sandbox,
                                                                     tmp_path):
    env, sandbox = skipping_env, slow_paced_sandbox
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=1, express_slots=0,
                             poll_interval_s=0.2)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "lh.csv", emails("lh", 300)), "liv")
        with env.auto_time_skipping_disabled():
            await eventually(lambda: [r for r in standby_rows(p) if r[2] == "packed"], "a standby batch")
            # The standby batch can be packed before batch 1 reaches the API: wait for it there.
            await eventually(lambda: sandbox_stats(sandbox)["batches_created"] == 1, "batch 1 created at the API")
            await env.client.get_workflow_handle(scheduler_id(LANE)).signal(
                GreedySchedulerWorkflow.pause, LanePause("held by test"))
            await eventually(lambda: p.sql("select reason from lane_holds where lane = %s", (LANE,)), "the hold")
            created = sandbox_stats(sandbox)["batches_created"]
            # The batch at the API finishes; the one waiting behind it must stay unsent.
            await eventually(lambda: p.sql("select count(*) from bouncer_batches where state = 'stored'")
                             == [(created,)], "the batches at the API stored")
            await asyncio.sleep(1.5)  # beyond the standby's recheck interval
            assert sandbox_stats(sandbox)["batches_created"] == created
            waiting = [r for r in standby_rows(p) if r[2] == "packed"]
            assert len(waiting) == 1
            assert (await scheduler_status(env.client)).paused

            await env.client.get_workflow_handle(scheduler_id(LANE)).signal(GreedySchedulerWorkflow.resume)
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=30)
        assert summary.state == "completed" and summary.by_state == {"verified": 300}
        assert p.sql("select count(*) from lane_holds") == [(0,)]
        stats = sandbox_stats(sandbox)
        assert (stats["batches_created"], stats["addresses_received"], stats["addresses_sent_twice"]) == (3, 300, 0)
        await assert_replays(env.client, p)


async def test_pausing_a_list_takes_its_addresses_out_of_standby_batches(skipping_env, db_url, slow_paced_sandbox,
                                                                         tmp_path):
    """One slot: batch 1 at the API, batch 2 packed ahead behind it. Pausing the list withdraws
    batch 2's addresses (they are not in flight); batch 2 then ends empty, never sent."""
    env, sandbox = skipping_env, slow_paced_sandbox
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=1, express_slots=0,
                             poll_interval_s=0.2)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "wd.csv", emails("wd", 500)), "wes")
        ub = ub_id(handle)
        with env.auto_time_skipping_disabled():
            (standby,) = await eventually(lambda: standby_rows(p), "a standby batch")
            # The standby batch can be packed before batch 1 reaches the API: wait for it there.
            await eventually(lambda: sandbox_stats(sandbox)["batches_created"] == 1, "batch 1 created at the API")
            progress: Progress = await handle.execute_update(UserBatchWorkflow.pause)
            assert (progress.state, progress.remaining) == ("paused", 100)  # only batch 1, at the API
            # Emptied; its activity may already have seen that (then it ends `submitted` with nothing sent).
            [(bb, after, state, size)] = standby_rows(p)
            assert (bb, after, size) == (standby[0], standby[1], 0) and state in ("packed", "submitted")
            assert p.sql("select count(*) from bouncer_batch_parts where bouncer_batch_id = %s", (standby[0],)) == [(0,)]
            assert p.sql("select count(*) from queue where user_batch_id = %s", (ub,)) == [(100,)]

            scheduler = env.client.get_workflow_handle(scheduler_id(LANE))
            await eventually(lambda: _status_if(scheduler, lambda s: s.in_flight == 0 and s.standby == 0),
                             "batch 1 done and batch 2 ended", timeout=30)
            await eventually(lambda: p.sql("select state from bouncer_batches where id = %s", (standby[1],))
                             == [("stored",)], "batch 1 stored")
            assert p.sql("select sent, provider_batch_id from bouncer_batches where id = %s", (standby[0],)) == [
                (0, None)]
            stats = sandbox_stats(sandbox)
            assert stats["batches_created"] == 1 and stats["addresses_received"] == 100

            progress = await handle.execute_update(UserBatchWorkflow.resume)
            assert progress.remaining == 400
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 500}
        stats = sandbox_stats(sandbox)
        assert (stats["addresses_received"], stats["unique_addresses_received"], stats["addresses_sent_twice"]) == (
            500, 500, 0)
        await assert_replays(env.client, p)


async def test_a_list_submitted_behind_standby_batches_takes_their_places(skipping_env, db_url, slow_paced_sandbox,
                                                                          tmp_path):
    """Three slots, three of ann's batches standing by behind them. Ben's list arrives: fair share
    owes him their places, so they are emptied (never sent) and his first batch is the next one
    created, not the fourth. Nothing is lost or sent twice."""
    env, sandbox = skipping_env, slow_paced_sandbox
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=3, express_slots=0,
                             poll_interval_s=0.2, store_quiet_s=0)
    async with running_pipeline(env.client, settings) as p:
        ann = await p.submit_file(write_list(tmp_path / "ann.csv", emails("ann", 1200)), "ann")
        with env.auto_time_skipping_disabled():
            await eventually(lambda: len([r for r in standby_rows(p) if r[2] == "packed" and r[3]]) == 3,
                             "three standby batches")
            # Standby batches can be packed before the three they follow reach the API: wait for those.
            await eventually(lambda: sandbox_stats(sandbox)["batches_created"] >= 3, "ann's first three batches")
            ben = await p.submit_file(write_list(tmp_path / "ben.csv", emails("ben", 300)), "ben")
            await prepared(ben)
            sent_before = p.sql("select count(*) from bouncer_batches where provider_batch_id is not null")[0][0]
            summaries = await asyncio.wait_for(asyncio.gather(ann.result(), ben.result()), timeout=90)
        assert [s.by_state for s in summaries] == [{"verified": 1200}, {"verified": 300}]

        emptied = p.sql("select size, sent, provider_batch_id, state from bouncer_batches"
                        " where after_id is not null and size = 0")
        assert len(emptied) >= 3 and set(emptied) == {(0, 0, None, "stored")}
        at_api = sandbox_batches(sandbox)
        created = sorted(
            (at_api[provider]["created"], user)
            for provider, user in p.sql(
                "select distinct bb.provider_batch_id, b.user_id from bouncer_batches bb"
                " join bouncer_batch_parts pt on pt.bouncer_batch_id = bb.id join user_batches b on b.id = pt.user_batch_id"
                " where bb.provider_batch_id is not null"))
        ann_before_ben = [user for _at, user in created].index("ben")
        # At most one of ann's standby batches was already on its way when ben's list arrived.
        assert ann_before_ben <= sent_before + 1, (sent_before, created)
        stats = sandbox_stats(sandbox)
        assert (stats["addresses_received"], stats["unique_addresses_received"], stats["addresses_sent_twice"]) == (
            1500, 1500, 0)
        status = await scheduler_status(env.client)
        assert (status.in_flight, status.standby) == (0, 0)
        await assert_replays(env.client, p)


# ---- 7. replay --------------------------------------------------------------------------------------


@workflow.defn(name="UserBatchWorkflow", sandboxed=False)
class ReorderedUserBatchWorkflow:
    """A careless change to UserBatchWorkflow: a timer before the prepare activity."""

    @workflow.run
    async def run(self, inp: UserBatchInput) -> Summary:
        await workflow.sleep(timedelta(seconds=1))
        return Summary(inp.user_batch_id, "completed", 0)


async def test_recorded_histories_replay_without_nondeterminism(skipping_env, db_url, sandbox, tmp_path):
    """Two user batches sharing addresses, callbacks and polling both on, one paused and resumed:
    every history replays against the current workflow code, and a reordering change is caught."""
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100)
    x_rows = emails("x", 180) + ["bad-row"]
    y_rows = x_rows[100:160] + emails("y", 90) + [x_rows[0]]
    async with running_pipeline(env.client, settings, callbacks_on=True) as p:
        x = await p.submit_file(write_list(tmp_path / "x.csv", x_rows), "xia", priority="high")
        y = await p.submit_file(write_list(tmp_path / "y.csv", y_rows), "yan", priority="low")
        await prepared(y)
        await y.execute_update(UserBatchWorkflow.pause)
        await y.execute_update(UserBatchWorkflow.resume)
        summaries = await asyncio.wait_for(asyncio.gather(x.result(), y.result()), timeout=30)
        assert [s.state for s in summaries] == ["completed", "completed"]
        assert sum(summaries[0].by_state.values()) == len(x_rows)
        assert sum(summaries[1].by_state.values()) == len(y_rows)
        assert sandbox_stats(sandbox)["addresses_sent_twice"] == 0

    histories = await assert_replays(env.client, p)
    kinds = Counter(h.workflow_id.rsplit("-", 1)[0] for h in histories)
    assert kinds["user-batch"] == 2
    assert kinds[f"bouncer-batch-{LANE}"] >= 3
    assert kinds["scheduler"] == 1

    # The guard is live: the same user batch histories fail against a changed workflow.
    replayer = Replayer(workflows=[ReorderedUserBatchWorkflow])
    for history in (h for h in histories if h.workflow_id.startswith("user-batch-")):
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert isinstance(result.replay_failure, workflow.NondeterminismError), result.replay_failure

"""Events to subscribers, end to end: a real pipeline, the dispatcher workflow, and a real local
HTTP receiver (Starlette under uvicorn on a free port) that checks what arrives."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio import activity
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Replayer, Worker
from typer.testing import CliRunner

import db
import starter
from activities.events import (
    DISPATCHER_ID, EventActivities, ensure_dispatcher, record_event, requeue_failed, topic_matches, verify_signature,
)
from activities.user_batches import scheduler_input
from devstack import free_port
from helpers import eventually, make_settings, running_pipeline, write_list
from worker import WORKFLOWS
from workflows.events import EventDispatcherWorkflow
from workflows.models import DeliveryBatch, DeliveryFailure, DeliveryRef, DispatcherInput, FetchRequest, LaneEvent, LanePause, SourceSpec, UserBatchInput, scheduler_id
from workflows.scheduler import GreedySchedulerWorkflow
from workflows.user_batch import UserBatchWorkflow

SECRET = "s3cret-for-the-test-receiver"
LEAKED_TRACE = "receiver-internal-trace-7731"


@dataclass
class Receiver:
    """Records every POST per path; `/flaky` fails each delivery twice, `/down` while `down` is set,
    `/slow` answers after `slow_s`, `/leaky-*` always answers 500 with a body that names its path."""

    url: str = ""
    got: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    tries: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    down: bool = True
    slow_s: float = 1.0

    async def handle(self, request: Request) -> JSONResponse:
        path = request.path_params["path"]
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.tries[f"{path}:{headers.get('x-bouncer-delivery')}"] += 1
        if path == "flaky" and self.tries[f"{path}:{headers.get('x-bouncer-delivery')}"] <= 2:
            return JSONResponse({"error": "try again"}, status_code=500)
        if path == "down" and self.down:
            return JSONResponse({"error": "down"}, status_code=503)
        if path.startswith("leaky"):
            return JSONResponse({"error": f"token {path} refused", "trace": LEAKED_TRACE}, status_code=500)
        if path == "slow":
            await asyncio.sleep(self.slow_s)
        self.got[path].append({"headers": headers, "body": body, "doc": json.loads(body)})
        return JSONResponse({"ok": True})

    def topics(self, path: str) -> list[str]:
        return [r["doc"]["topic"] for r in self.got[path]]


@contextlib.asynccontextmanager
async def receiving():
    rx = Receiver()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        Starlette(routes=[Route("/{path}", rx.handle, methods=["POST"])]), host="127.0.0.1", port=port,
        log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    rx.url = f"http://127.0.0.1:{port}"
    try:
        yield rx
    finally:
        server.should_exit = True
        await task


def cli(db_url: str, *args: str):
    env = {k: None for k in os.environ if k.startswith(("TEMPORAL_", "BOUNCER_"))}
    return CliRunner(env={**env, "DATABASE_URL": db_url, "COLUMNS": "200"}).invoke(starter.app, list(args))


def test_topic_patterns():
    assert topic_matches("*", "user_batch.completed")
    assert topic_matches("alert.*", "alert.queue_depth") and not topic_matches("alert.*", "lane.paused")
    assert topic_matches("lane.paused", "lane.paused") and not topic_matches("lane.paused", "lane.paused2")


async def test_events_reach_subscribers_signed_in_order_with_retries_and_dead_letters(
    dev_env, db_url, sandbox, tmp_path
):
    settings = make_settings(db_url, sandbox, batch_size=100, max_concurrent_batches=2)
    async with receiving() as rx, running_pipeline(dev_env.client, settings) as p:
        subscribe = [
            ("*", f"{rx.url}/all", None),
            ("user_batch.completed", f"{rx.url}/flaky", "ann"),  # ann's only; fails twice per delivery
            ("user_batch.completed", f"{rx.url}/down", None),  # fails until it is brought up
        ]
        for topic, url, user in subscribe:
            run = cli(db_url, "events", "subscribe", "--topic", topic, "--url", url, "--secret", SECRET,
                      *(["--user", user] if user else []))
            assert run.exit_code == 0, run.output
        assert cli(db_url, "events", "subscribe", "--topic", "nope", "--url", rx.url, "--secret", SECRET
                   ).exit_code == 2
        await ensure_dispatcher(dev_env.client, settings)

        ann = await p.submit_file(write_list(tmp_path / "ann.csv", [f"ann.{i}@co{i % 7}.example" for i in range(700)]),
                                  "ann")
        bob = await p.submit_file(write_list(tmp_path / "bob.csv", [f"bob.{i}@co{i % 5}.example" for i in range(40)]),
                                  "bob")
        ann_summary, bob_summary = await asyncio.wait_for(asyncio.gather(ann.result(), bob.result()), timeout=60)
        ann_id, bob_id = ann_summary.user_batch_id, bob_summary.user_batch_id

        # A failed batch (its list cannot be read), a paused lane, a cancelled batch, and an
        # alert written with plain SQL by some other component (no NOTIFY): all delivered.
        failed = await dev_env.client.start_workflow(
            UserBatchWorkflow.run, UserBatchInput(source=SourceSpec(uri=str(tmp_path / "absent.csv"), user_id="cid")),
            id="user-batch-absent", task_queue=settings.task_queue)
        with pytest.raises(WorkflowFailureError):
            await failed.result()
        await dev_env.client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(settings, "deliverability"), id=scheduler_id("deliverability"),
            task_queue=settings.task_queue, start_signal="pause", start_signal_args=[LanePause("maintenance")])
        dan = await p.submit_file(write_list(tmp_path / "dan.csv", ["dan.1@co1.example"]), "dan")
        await eventually(lambda: p.sql("select state from user_batches where workflow_id = %s", (dan.id,))
                         == [("queued",)], what="dan queued")
        await dan.cancel()
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("insert into events (kind, data) values ('alert.queue_depth', '{\"queued\": 5}')")

        await eventually(lambda: {"user_batch.failed", "lane.paused", "user_batch.cancelled", "alert.queue_depth"}
                         <= set(rx.topics("all")), what="every topic at /all")
        await eventually(lambda: len(rx.got["flaky"]) == 1, what="the flaky receiver's third try")
        await eventually(lambda: p.sql("select count(*) from deliveries where state = 'failed'") == [(2,)],
                         what="two dead letters at /down")

        # Every delivery verifies with the secret; a forged body does not.
        for r in rx.got["all"] + rx.got["flaky"]:
            assert verify_signature(SECRET, r["headers"], r["body"])
        forged = rx.got["all"][0]
        assert not verify_signature(SECRET, forged["headers"], forged["body"] + b" ")
        assert not verify_signature("another-secret-entirely", forged["headers"], forged["body"])

        # Per user batch, events arrive in the order they were recorded, progress before completion.
        ann_docs = [r["doc"] for r in rx.got["all"] if r["doc"]["user_batch_id"] == ann_id]
        assert [d["event_id"] for d in ann_docs] == sorted(d["event_id"] for d in ann_docs)
        assert [d["topic"] for d in ann_docs][-1] == "user_batch.completed"
        progress = [d["data"]["percent"] for d in ann_docs if d["topic"] == "user_batch.progress"]
        assert progress and progress == sorted(progress) and all(0 < pct < 100 for pct in progress)
        done = next(d for d in ann_docs if d["topic"] == "user_batch.completed")
        assert done["data"]["rows"] == 700 and done["data"]["by_state"] == {"verified": 700}
        assert done["user_id"] == "ann"
        paused = next(r["doc"] for r in rx.got["all"] if r["doc"]["topic"] == "lane.paused")
        assert paused["data"] == {"lane": "deliverability", "reason": "maintenance"}

        # Retried until it succeeded (3 tries, recorded); bob's completion was not for this subscriber.
        assert [d["doc"]["user_batch_id"] for d in rx.got["flaky"]] == [ann_id]
        assert p.sql("select d.state, d.attempts from deliveries d join subscriptions s on s.id = d.subscription_id"
                     " where s.url like '%%/flaky'") == [("delivered", 3)]
        # The permanently failing one: failed (dead letter) after EVENT_MAX_ATTEMPTS, with the reason.
        dead = p.sql("select d.attempts, d.last_status, d.last_error from deliveries d join subscriptions s"
                     " on s.id = d.subscription_id where s.url like '%%/down' order by d.id")
        assert [(a, st) for a, st, _e in dead] == [(4, 503), (4, 503)]
        assert all("HTTP 503" in e for *_x, e in dead)
        listing = cli(db_url, "events", "list", "--state", "failed", "--json")
        assert [d["topic"] for d in json.loads(listing.stdout)["deliveries"]] == ["user_batch.completed"] * 2

        # Dead letters are retryable: bring the receiver up and send them again.
        rx.down = False
        retry = cli(db_url, "events", "retry", "--failed")
        assert retry.exit_code == 0 and "2 deliveries queued again" in retry.stdout
        await eventually(lambda: len(rx.got["down"]) == 2, what="the retried dead letters")
        assert sorted(r["doc"]["user_batch_id"] for r in rx.got["down"]) == sorted([ann_id, bob_id])
        await eventually(lambda: p.sql("select count(*) from deliveries where state <> 'delivered'") == [(0,)],
                         what="everything delivered")
        assert p.sql("select count(*) from events where not fanned_out") == [(0,)]

        # Temporal carried delivery ids only: no address in the dispatcher's history.
        history = await dev_env.client.get_workflow_handle(DISPATCHER_ID).fetch_history()
        raw = b"".join(e.SerializeToString() for e in history.events)
        assert b"@co1.example" not in raw and SECRET.encode() not in raw

        # The new code paths (dispatcher, lane.paused, user_batch.failed) replay deterministically.
        replayer = Replayer(workflows=WORKFLOWS)
        for wid in (DISPATCHER_ID, scheduler_id("deliverability"), failed.id):
            await replayer.replay_workflow(await dev_env.client.get_workflow_handle(wid).fetch_history())


async def test_record_event_works_on_sync_and_async_connections(db_url):
    with psycopg.connect(db_url) as conn:
        assert record_event(conn, "alert.sync", None, "ann", {"n": 1}) is None
    async with await psycopg.AsyncConnection.connect(db_url) as aconn:
        await record_event(aconn, "alert.async", 7, None, {"n": 2})
        await aconn.commit()
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("select kind, user_batch_id, user_id, data from events order by id").fetchall()
    assert rows == [("alert.sync", None, "ann", {"n": 1}), ("alert.async", 7, None, {"n": 2})]


async def test_a_lane_event_recorded_again_by_a_retry_is_stored_once(db_url, sandbox):
    """The activity's retry after its commit (a lost completion) finds its row: subscribers hear
    of a pause once. Another pause (another activity execution) is another event."""
    acts = EventActivities(make_settings(db_url, sandbox), db.open_pool(db_url, 2))
    await acts.pool.open()
    try:
        for activity_id in ("7", "7", "9"):
            env = ActivityEnvironment()
            env.info = dataclasses.replace(env.info, activity_id=activity_id, workflow_run_id="scheduler-run-1")
            await env.run(acts.record_lane_paused, LaneEvent("deliverability", "maintenance"))
            await env.run(acts.record_credits_exhausted, LaneEvent("deliverability", "out of credits"))
            await env.run(acts.record_lane_resumed, LaneEvent("deliverability", "maintenance"))
    finally:
        await acts.pool.close()
    with psycopg.connect(db_url) as conn:
        got = conn.execute("select kind, count(*) from events group by 1 order by 1").fetchall()
    assert got == [("credits.exhausted", 2), ("lane.paused", 2), ("lane.resumed", 2)]


async def test_a_dead_subscriber_does_not_hold_up_the_others_across_continue_as_new(dev_env, db_url, sandbox):
    """The dispatcher continues-as-new without waiting for a dead subscriber's retries: the next
    run fetches that subscriber's deliveries again, in order, while the live subscriber's events
    go out at once. Before, continue-as-new waited for every chain, and with it every subscriber
    (at the defaults a dead one held all events for about half an hour, about once an hour)."""
    settings = make_settings(db_url, sandbox)
    async with receiving() as rx, running_pipeline(dev_env.client, settings):
        for path in ("down", "all"):
            run = cli(db_url, "events", "subscribe", "--topic", "alert.*", "--url", f"{rx.url}/{path}",
                      "--secret", SECRET)
            assert run.exit_code == 0, run.output
        # Each /down delivery is retried for minutes; a run continues-as-new every few seconds.
        handle = await dev_env.client.start_workflow(
            EventDispatcherWorkflow.run,
            DispatcherInput(fetch_wait_s=0.5, max_attempts=1000, retry_initial_s=0.5, retry_max_s=1.0,
                            timeout_s=2.0, max_history_events=60),
            id=DISPATCHER_ID, task_queue=settings.task_queue)

        def record(n: int) -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                record_event(conn, "alert.test", None, None, {"n": n})

        def numbers(path: str) -> list[int]:
            return [r["doc"]["data"]["n"] for r in rx.got[path]]

        record(1)
        record(2)
        await eventually(lambda: numbers("all") == [1, 2], what="events 1 and 2 at /all")
        runs = set()

        async def run_ids() -> int:
            runs.add((await handle.describe()).run_id)
            return len(runs)

        await eventually(lambda: _at_least(run_ids(), 3), what="two continue-as-new while /down fails", timeout=60)
        assert rx.tries and not rx.got["down"]
        record(3)
        await eventually(lambda: numbers("all") == [1, 2, 3], what="event 3 at /all while /down fails",
                         timeout=10)

        rx.down = False  # /down gets each of its deliveries once, in order
        await eventually(lambda: numbers("down") == [1, 2, 3], what="/down's deliveries")
        await eventually(lambda: _has_settled(db_url), what="every delivery delivered")
        ids = [r["headers"]["x-bouncer-delivery"] for path in ("down", "all") for r in rx.got[path]]
        assert len(ids) == len(set(ids)) == 6
        history = await handle.fetch_history()
        await Replayer(workflows=WORKFLOWS).replay_workflow(history)
        if os.environ.get("RECORD_HISTORIES"):  # runs that handed chains over (test_replay_recorded.py)
            out = Path(os.environ["RECORD_HISTORIES"])
            out.mkdir(parents=True, exist_ok=True)
            for run_id in runs:
                h = await dev_env.client.get_workflow_handle(DISPATCHER_ID, run_id=run_id).fetch_history()
                (out / f"{h.workflow_id}-{h.run_id[:8]}.json").write_text(h.to_json())


async def _at_least(count, n: int) -> bool:
    return await count >= n


def _has_settled(db_url: str) -> bool:
    with psycopg.connect(db_url) as conn:
        return conn.execute("select count(*) from deliveries where state <> 'delivered'").fetchone()[0] == 0


async def test_a_delivery_under_way_is_not_posted_again_by_another_attempt(db_url, sandbox):
    """Two attempts at one delivery (one from a dispatcher run that continued-as-new while it
    posted, one from the next run): the second waits for the first's lease and finds it delivered."""
    settings = make_settings(db_url, sandbox)
    acts = EventActivities(settings, db.open_pool(db_url, 4))
    await acts.pool.open()
    try:
        async with receiving() as rx:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("insert into subscriptions (topic, url, secret) values ('alert.*', %s, %s)",
                             (f"{rx.url}/slow", SECRET))
                record_event(conn, "alert.test", None, None, {"n": 1})
            batch = await ActivityEnvironment().run(acts.fetch_deliveries, FetchRequest(0, 0))
            [ref] = batch.deliveries

            async def attempt(delay: float) -> int:
                await asyncio.sleep(delay)
                return await ActivityEnvironment().run(acts.deliver, ref.delivery_id)

            first, second = await asyncio.gather(attempt(0), attempt(0.3))
        assert (first, second) == (200, 0)
        assert len(rx.got["slow"]) == 1
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select state, attempts, sending_until from deliveries").fetchall() == [
                ("delivered", 1, None)]
    finally:
        await acts.pool.close()


async def test_a_retried_delivery_that_commits_after_a_newer_one_was_fetched_is_still_fetched(db_url, sandbox):
    """`events retry` in an open transaction while the dispatcher fans out and fetches a new event:
    once the retry commits, the next fetch returns the retried delivery. Before, the retry took its
    `ready_seq` in its UPDATE; the fetch read the newer delivery's higher number, the cursor moved
    past the retried one's, and after the commit no fetch read it (pending forever)."""
    acts = EventActivities(make_settings(db_url, sandbox), db.open_pool(db_url, 2))
    await acts.pool.open()

    async def fetch(cursor: int):
        return await ActivityEnvironment().run(acts.fetch_deliveries, FetchRequest(cursor, 0))

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("insert into subscriptions (topic, url, secret) values ('alert.*', 'http://127.0.0.1:9/x', %s)",
                         (SECRET,))
            record_event(conn, "alert.test", None, None, {"n": 1})
        first = await fetch(0)
        [retried] = [ref.delivery_id for ref in first.deliveries]
        await ActivityEnvironment().run(acts.fail_delivery, DeliveryFailure(retried, "gave up"))

        with psycopg.connect(db_url) as retry:  # the CLI's transaction, not yet committed
            assert requeue_failed(retry, [retried], False) == 1
            with psycopg.connect(db_url, autocommit=True) as conn:
                record_event(conn, "alert.test", None, None, {"n": 2})
            during = await fetch(first.cursor)
            retry.commit()
        after = await fetch(during.cursor)

        assert [ref.delivery_id for ref in during.deliveries] == [retried + 1]
        assert [ref.delivery_id for ref in after.deliveries] == [retried]
        assert after.deliveries[0].ready_seq > during.cursor
    finally:
        await acts.pool.close()


async def test_a_failing_subscriber_url_and_its_answer_stay_out_of_temporal_and_logs(dev_env, db_url, sandbox, caplog):
    """A subscriber URL with credentials (userinfo, a token in the path and query) answers 500 with
    a body: Temporal's history and the worker's log name the delivery, its subscription, the URL's
    scheme and host, and the status only; Postgres keeps the receiver's answer. Before, the
    activity's failure message held the whole URL and the first 200 characters of the body."""
    caplog.set_level(logging.WARNING, logger="temporalio")
    settings = make_settings(db_url, sandbox)  # 4 attempts, 0.1 s apart
    async with receiving() as rx, running_pipeline(dev_env.client, settings) as p:
        origin = rx.url  # http://127.0.0.1:<port>
        url = f"http://hook-user:hook-pass-5150@{origin.removeprefix('http://')}/leaky-tok-9f8e7d?key=q-secret-42"
        with psycopg.connect(db_url, autocommit=True) as conn:
            (sub_id,) = conn.execute("insert into subscriptions (topic, url, secret) values ('alert.*', %s, %s)"
                                     " returning id", (url, SECRET)).fetchone()
            record_event(conn, "alert.test", None, None, {"n": 1})
        await ensure_dispatcher(dev_env.client, settings)
        await eventually(lambda: p.sql("select state from deliveries") == [("failed",)], what="a dead letter")
        [(delivery_id, attempts, status, last_error)] = p.sql(
            "select id, attempts, last_status, last_error from deliveries")
        assert (attempts, status) == (4, 500)
        assert "HTTP 500" in last_error and LEAKED_TRACE in last_error  # the operator's `events list` explains it

        history = (await dev_env.client.get_workflow_handle(DISPATCHER_ID).fetch_history()).to_json()
        logged = caplog.text
    assert rx.tries  # it was posted to, with its credentials
    for leak in ("hook-user", "hook-pass-5150", "leaky-tok-9f8e7d", "q-secret-42", LEAKED_TRACE, "refused"):
        assert leak not in history, leak
        assert leak not in logged, leak
    told = f"delivery {delivery_id} (subscription {sub_id}) of alert.test to {origin}: HTTP 500"
    assert told in history and told in logged


class _RetriedWhileFailing:
    """Stand-ins for the dispatcher's activities, scripted: delivery 7 fails for good; while its
    `fail_delivery` runs, `events retry` makes it pending again and a fetch hands it out anew
    (ready_seq 2). Its second turn is still under way when the run continues-as-new."""

    def __init__(self) -> None:
        self.fetches: list[tuple[str, int]] = []  # (run id, cursor asked for)
        self.refetched = asyncio.Event()

    @activity.defn(name="fetch_deliveries")
    async def fetch_deliveries(self, request: FetchRequest) -> DeliveryBatch:
        self.fetches.append((activity.info().workflow_run_id, request.cursor))
        if len(self.fetches) == 1:
            return DeliveryBatch([DeliveryRef(7, "1:-", 1)], 1)
        if len(self.fetches) == 2:
            await asyncio.sleep(0.5)  # after the first attempt failed
            self.refetched.set()
            return DeliveryBatch([DeliveryRef(7, "1:-", 2)], 2)
        await asyncio.sleep(0.05)
        return DeliveryBatch([], request.cursor)

    @activity.defn(name="deliver")
    async def deliver(self, delivery_id: int) -> int:
        if not self.refetched.is_set():
            raise ApplicationError("subscriber answered 500", non_retryable=True)
        await asyncio.sleep(60)  # the second turn: under way across continue-as-new
        return 200

    @activity.defn(name="fail_delivery")
    async def fail_delivery(self, request: DeliveryFailure) -> None:
        await self.refetched.wait()  # the retry and the fetch land while this one commits


async def test_a_delivery_retried_while_its_failure_is_recorded_is_still_handed_over_at_continue_as_new(dev_env):
    """The first turn's end must not count the second turn (same delivery id) as settled: the next
    run's cursor starts before it, so it is fetched again if the old run's attempt does not finish.
    Before, the next run started at cursor 2, past it: the delivery stayed pending for good."""
    fakes, queue = _RetriedWhileFailing(), f"events-race-{uuid.uuid4().hex[:8]}"
    async with Worker(dev_env.client, task_queue=queue, workflows=[EventDispatcherWorkflow],
                      activities=[fakes.fetch_deliveries, fakes.deliver, fakes.fail_delivery]):
        handle = await dev_env.client.start_workflow(
            EventDispatcherWorkflow.run, DispatcherInput(fetch_wait_s=0.1, max_attempts=1, max_history_events=40),
            id=f"dispatcher-{queue}", task_queue=queue)
        try:
            await eventually(lambda: len({run for run, _ in fakes.fetches}) >= 2, what="a continue-as-new",
                             timeout=30)
            first_run = fakes.fetches[0][0]
            next_cursor = next(cursor for run, cursor in fakes.fetches if run != first_run)
            assert next_cursor == 1
        finally:
            await handle.terminate("test done")

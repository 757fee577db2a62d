"""Events to subscribers: record an event (any process), fan it out, deliver signed webhooks.

Anything may write a row into `events` (`record_event` here, or plain SQL: every row whose
`kind` — its topic — matches a subscription is delivered). The `EventDispatcherWorkflow`
fans new rows out into `deliveries` (one per matching subscription) and sends each with the
`deliver` activity under a Temporal RetryPolicy; a delivery that exhausts its attempts is
marked `failed` (the dead letter) and can be retried from the CLI.

A delivery is a POST of a JSON body (ids and counts, never addresses) with headers
  X-Bouncer-Event: <topic>            X-Bouncer-Delivery: <delivery id> (stable across retries)
  X-Bouncer-Timestamp: <unix seconds> X-Bouncer-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
Receivers recompute the HMAC over the raw body and compare in constant time (`verify_signature`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from settings import Settings
from workflows.models import (
    DeliveryBatch,
    DeliveryFailure,
    DeliveryRef,
    DispatcherInput,
    FetchRequest,
    LaneEvent,
    UserBatchFailure,
)

TOPICS = (
    "user_batch.completed", "user_batch.failed", "user_batch.cancelled", "user_batch.progress",
    "lane.paused", "lane.resumed", "credits.exhausted", "dead_letters.retried", "alert.*",
)
DISPATCHER_ID = "events-dispatcher"
CHANNEL = "events"  # NOTIFY channel: wakes the dispatcher's fetch at once
# Held by the fetch's transaction while it numbers deliveries (`ready_seq`) and reads them: numbers
# are then taken in commit order, and a cursor never passes a number that commits later.
READY_SEQ_LOCK = 74_211_002
PROGRESS_STEP_PCT = 10
PROGRESS_EVERY_S = 30

# `on conflict do nothing`: the one unique index on events (migration 011) makes a lane event's
# subject, naming the activity execution that records it, a once-only key.
_INSERT = (
    "with e as (insert into events (kind, subject, data, user_batch_id, user_id) values (%s, %s, %s, %s, %s)"
    f" on conflict do nothing returning id) select pg_notify('{CHANNEL}', id::text) from e"
)


def record_event(conn: Any, topic: str, user_batch_id: int | None, user_id: str | None, payload: dict,
                 subject: str | None = None) -> Any:
    """Record one event for delivery to its subscribers, inside the caller's transaction.

    `conn` is a psycopg connection or cursor, sync or async: with an async one, await the
    result. The payload holds ids and counts only (it is sent to webhooks as `data`).
    Delivery starts when the transaction commits (NOTIFY is transactional). `subject`
    defaults to the user batch's id.
    """
    if subject is None:
        subject = str(user_batch_id) if user_batch_id is not None else ""
    params = (topic, subject, Jsonb(payload), user_batch_id, user_id)
    result = conn.execute(_INSERT, params)
    return result if inspect.isawaitable(result) else None


def requeue_failed(conn: psycopg.Connection, delivery_ids: list[int], all_failed: bool) -> int:
    """Make these failed deliveries (or every failed one) pending again, in the caller's
    transaction; returns how many. A delivery whose subscription was removed stays failed.

    The row is left without a `ready_seq`: the dispatcher's fetch numbers it (under
    `READY_SEQ_LOCK`), so the number is past every cursor when the row becomes visible.
    """
    n = conn.execute(
        "update deliveries d set state = 'pending', ready_seq = null"
        " where d.state = 'failed' and (%(all)s or d.id = any(%(ids)s))"
        " and exists (select 1 from subscriptions s where s.id = d.subscription_id)",
        {"all": all_failed, "ids": delivery_ids},
    ).rowcount
    conn.execute(f"select pg_notify('{CHANNEL}', '')")  # wakes the dispatcher's fetch at the commit
    return n


def url_origin(url: str) -> str:
    """`scheme://host[:port]` of a subscriber URL: all of it that may be named in Temporal or a log
    (userinfo, path and query often carry the subscriber's credentials)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "(unparsable url)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def topic_matches(pattern: str, topic: str) -> bool:
    """`*` matches every topic, `alert.*` every topic under `alert.`, anything else itself."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return topic.startswith(pattern[:-1])
    return pattern == topic


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps (replays)."""
    try:
        timestamp = int(headers["x-bouncer-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), headers.get("x-bouncer-signature", ""))


async def record_progress(cur: psycopg.AsyncCursor, user_batch_ids: list[int]) -> None:
    """`user_batch.progress` for these user batches, throttled: at each further 10% settled, or
    30 s after the last one if anything moved. Set-based; runs in the caller's transaction and
    never waits on a user batch row (SKIP LOCKED): a skipped one is reported at the next store."""
    if not user_batch_ids:
        return
    await cur.execute(
        f"""
        with mine as (  -- a row another transaction holds (pause, cancel, another store) is skipped this time
            select id from user_batches where id = any(%(ids)s) and state = 'queued' for update skip locked),
        p as (
            select l.user_batch_id, sum(l.unique_addresses) as total, sum(l.unique_addresses - l.remaining) as done
            from user_batch_lanes l join mine on mine.id = l.user_batch_id group by 1),
        due as (
            update user_batches b
            set progress_event_pct = (100 * p.done / p.total) / {PROGRESS_STEP_PCT} * {PROGRESS_STEP_PCT},
                progress_event_at = now(), progress_event_done = p.done
            from p
            where b.id = p.user_batch_id and b.state = 'queued' and p.total > 0 and p.done < p.total
              and ((100 * p.done / p.total) >= b.progress_event_pct + {PROGRESS_STEP_PCT}
                   or (p.done <> b.progress_event_done
                       and coalesce(b.progress_event_at, b.created_at) < now() - interval '{PROGRESS_EVERY_S} s'))
            returning b.id, b.user_id, p.done, p.total),
        e as (
            insert into events (kind, subject, data, user_batch_id, user_id)
            select 'user_batch.progress', id::text,
                   jsonb_build_object('user_batch_id', id, 'settled', done, 'unique_addresses', total,
                                      'percent', (100 * done / total)), id, user_id
            from due order by due.id
            returning id)
        select pg_notify('{CHANNEL}', max(id)::text) from e having count(*) > 0
        """,
        {"ids": user_batch_ids},
    )


async def ensure_dispatcher(client: Client, settings: Settings) -> None:
    """Start the dispatcher if it is not running (worker start, subscribe, retry)."""
    from workflows.events import EventDispatcherWorkflow

    await client.start_workflow(
        EventDispatcherWorkflow.run,
        dispatcher_input(settings),
        id=DISPATCHER_ID,
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


def dispatcher_input(settings: Settings) -> DispatcherInput:
    return DispatcherInput(
        fetch_wait_s=settings.event_fetch_wait_s,
        max_attempts=settings.event_max_attempts,
        retry_initial_s=settings.event_retry_initial_s,
        retry_max_s=settings.event_retry_max_s,
        timeout_s=settings.event_timeout_s,
    )


# ---- activities ---------------------------------------------------------------------------


@dataclass
class _Delivery:
    id: int
    topic: str
    event_id: int
    created_at: str
    user_batch_id: int | None
    user_id: str | None
    data: dict
    subscription_id: int
    url: str
    secret: str


# A delivery's lease outlives its POST (cut at `event_timeout_s`) by this much: the time to record
# the attempt, and a worker's pause. The dispatcher gives `deliver` room to wait one out and post.
DELIVERY_LEASE_GRACE_S = 20.0


class EventActivities:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool

    @activity.defn
    async def fetch_deliveries(self, request: FetchRequest) -> DeliveryBatch:
        """Fan new events out into deliveries; return pending deliveries past the cursor.

        When there are none, waits up to `wait_s` for a NOTIFY (events recorded with plain SQL
        and no NOTIFY are found at the next fetch). Idempotent: fan-out marks events done in
        the same transaction, and a re-fetch returns the same pending rows. Only this numbers
        deliveries, under `READY_SEQ_LOCK`: every pending delivery is read once past the cursor.
        """
        async with self.pool.connection() as conn:
            refs = await self._fan_out_and_read(conn, request.cursor)
            if not refs and request.wait_s > 0:
                await conn.execute(f"listen {CHANNEL}")
                try:
                    async for _note in conn.notifies(timeout=request.wait_s, stop_after=1):
                        pass
                finally:
                    await conn.execute(f"unlisten {CHANNEL}")
                refs = await self._fan_out_and_read(conn, request.cursor)
        cursor = max([seq for _i, _k, seq in refs], default=request.cursor)
        return DeliveryBatch([DeliveryRef(i, k, s) for i, k, s in refs], cursor)

    async def _fan_out_and_read(self, conn: psycopg.AsyncConnection, cursor: int) -> list[tuple[int, str, int]]:
        async with conn.transaction(), conn.cursor() as cur:
            # Its own statement: the next ones' snapshots see what the previous holder committed.
            await cur.execute("select pg_advisory_xact_lock(%s)", (READY_SEQ_LOCK,))
            await cur.execute(
                """
                with fresh as (
                    select id, kind, user_id from events where not fanned_out order by id limit 5000
                    for update skip locked),
                made as (
                    insert into deliveries (event_id, subscription_id)
                    select f.id, s.id from fresh f join subscriptions s
                      on (s.topic = f.kind or s.topic = '*'
                          or (s.topic like '%.*' and f.kind like left(s.topic, -1) || '%'))
                     and (s.user_id is null or s.user_id = f.user_id)
                    order by f.id, s.id
                    on conflict do nothing),
                requeued as (  -- `events retry` leaves them unnumbered: numbered here, in id order
                    update deliveries d set ready_seq = q.seq
                    from (select id, nextval('delivery_ready_seq') as seq from (
                            select id from deliveries where state = 'pending' and ready_seq is null order by id) o
                         ) q
                    where d.id = q.id and d.ready_seq is null)
                update events e set fanned_out = true from fresh f where e.id = f.id
                """
            )
            await cur.execute(
                """
                select d.id, d.subscription_id || ':' || coalesce(e.user_batch_id::text, '-'), d.ready_seq
                from deliveries d join events e on e.id = d.event_id
                where d.state = 'pending' and d.ready_seq > %s order by d.ready_seq limit 1000
                """,
                (cursor,),
            )
            return [(int(i), k, int(seq)) for i, k, seq in await cur.fetchall()]

    async def _load(self, delivery_id: int) -> _Delivery:
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    """
                    select d.id, e.kind, e.id, e.created_at, e.user_batch_id, e.user_id, e.data, s.id, s.url, s.secret
                    from deliveries d join events e on e.id = d.event_id join subscriptions s on s.id = d.subscription_id
                    where d.id = %s
                    """,
                    (delivery_id,),
                )
            ).fetchone()
        if row is None:
            raise ApplicationError(f"delivery {delivery_id} or its subscription is gone", type="Gone",
                                   non_retryable=True)
        return _Delivery(row[0], row[1], row[2], row[3].isoformat(), *row[4:])

    @activity.defn
    async def deliver(self, delivery_id: int) -> int:
        """POST one event to its subscriber, signed; every attempt is recorded on the row.

        A 2xx marks it delivered; anything else raises a retryable error (the RetryPolicy
        backs off) naming the delivery, its subscription, the URL's scheme and host, and the HTTP
        status or error type; the whole error (the receiver's answer) is kept in `last_error`.
        Returns the HTTP status. Already delivered or failed: returns 0. The row is leased while
        the POST runs: an attempt of an earlier dispatcher run that is still under way is waited
        for (then this one posts only if that one failed).
        """
        if not await self._lease(delivery_id):
            return 0
        d = await self._load(delivery_id)
        body = orjson.dumps({
            "delivery_id": d.id, "event_id": d.event_id, "topic": d.topic, "created_at": d.created_at,
            "user_batch_id": d.user_batch_id, "user_id": d.user_id, "data": d.data,
        })
        now = int(time.time())
        headers = {
            "content-type": "application/json",
            "x-bouncer-event": d.topic,
            "x-bouncer-delivery": str(d.id),
            "x-bouncer-timestamp": str(now),
            "x-bouncer-signature": sign(d.secret, now, body),
        }
        import httpx  # here: every CLI process imports this module (`record_event`), few deliver

        # `error` (the receiver's body, httpx's message) stays in Postgres; `told` goes to Temporal and
        # its logs, which must not hold the URL's credentials nor whatever the receiver echoes.
        status, error, told, limit = 0, "", "", self.settings.event_timeout_s
        try:
            async with asyncio.timeout(limit), httpx.AsyncClient(timeout=limit) as http:
                response = await http.post(d.url, content=body, headers=headers)
            status = response.status_code
            if not 200 <= status < 300:
                error, told = f"HTTP {status}: {response.text[:200]}", f"HTTP {status}"
        except httpx.HTTPError as exc:
            error, told = f"{type(exc).__name__}: {exc}"[:300], type(exc).__name__
        except TimeoutError:
            error = told = f"no answer within {limit:g} s"
        async with self.pool.connection() as conn:
            await conn.execute(
                "update deliveries set attempts = attempts + 1, last_status = %s, last_error = %s,"
                " state = case when %s then 'delivered' else state end, sending_until = null,"
                " delivered_at = case when %s then now() else delivered_at end where id = %s and state = 'pending'",
                (status or None, error or None, not error, not error, delivery_id),
            )
        if error:
            raise ApplicationError(f"delivery {delivery_id} (subscription {d.subscription_id}) of {d.topic}"
                                   f" to {url_origin(d.url)}: {told}", type="DeliveryFailed")
        return status

    async def _lease(self, delivery_id: int) -> bool:
        """Lease the pending row to this attempt, waiting out another attempt's lease (at most
        one POST's time plus `DELIVERY_LEASE_GRACE_S`); False: it is no longer pending."""
        lease_s = self.settings.event_timeout_s + DELIVERY_LEASE_GRACE_S
        while True:
            async with self.pool.connection() as conn:
                if await (await conn.execute(
                    "update deliveries set sending_until = now() + make_interval(secs => %s)"
                    " where id = %s and state = 'pending' and (sending_until is null or sending_until < now())"
                    " returning id",
                    (lease_s, delivery_id),
                )).fetchone():
                    return True
                row = await (await conn.execute(
                    "select state, extract(epoch from sending_until - now()) from deliveries where id = %s",
                    (delivery_id,),
                )).fetchone()
            if row is None:
                raise ApplicationError(f"delivery {delivery_id} is gone", type="Gone", non_retryable=True)
            if row[0] != "pending":
                return False
            await asyncio.sleep(min(max(float(row[1] or 0), 0.05), 0.5))

    @activity.defn
    async def fail_delivery(self, request: DeliveryFailure) -> None:
        """The dead letter: attempts exhausted; `starter.py events retry` makes it pending again."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "update deliveries set state = 'failed', last_error = coalesce(last_error, %s)"
                " where id = %s and state = 'pending'",
                (request.reason[:500], request.delivery_id),
            )

    @activity.defn
    async def record_lane_paused(self, request: LaneEvent) -> None:
        """`lane.paused` (sent by the lane's scheduler when it becomes paused)."""
        await self._record_lane_event("lane.paused", request)

    @activity.defn
    async def record_lane_resumed(self, request: LaneEvent) -> None:
        """`lane.resumed` (sent by the lane's scheduler when a pause ends: by an operator, or by a
        credit check that found credits); `reason` is what it had been paused for."""
        await self._record_lane_event("lane.resumed", request)

    @activity.defn
    async def record_credits_exhausted(self, request: LaneEvent) -> None:
        """`credits.exhausted` (sent by the lane's scheduler when a 402 pauses it; once per episode)."""
        await self._record_lane_event("credits.exhausted", request)

    async def _record_lane_event(self, topic: str, request: LaneEvent) -> None:
        """Once per activity execution: a retry after the commit finds its row (migration 011)."""
        info = activity.info()
        async with self.pool.connection() as conn:
            await record_event(conn, topic, None, None, {"lane": request.lane, "reason": request.reason},
                               subject=f"{request.lane} {info.workflow_run_id} {info.activity_id}")

    @activity.defn
    async def fail_user_batch(self, request: UserBatchFailure) -> None:
        """A user batch workflow failed: the row ends `failed`, so do its rows still `pending` (with the
        reason: every row ends terminal, e.g. the committed part of a list whose source failed midway),
        and `user_batch.failed` is sent (once). Idempotent: a retry fails the rows a timed-out attempt left."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "update user_batches set state = 'failed', finished_at = now() where id = %s"
                " and state not in ('completed', 'cancelled', 'failed') returning user_id",
                (request.user_batch_id,),
            )
            row = await cur.fetchone()
            if row is not None:
                await record_event(cur, "user_batch.failed", request.user_batch_id, row[0],
                                   {"user_batch_id": request.user_batch_id, "reason": request.reason[:500]})
            await cur.execute(
                "update items set state = 'failed', reason = %s where user_batch_id = %s and state = 'pending'"
                " and exists (select 1 from user_batches where id = %s and state = 'failed')",
                (f"the list failed: {request.reason}"[:500], request.user_batch_id, request.user_batch_id),
            )

"""Activities that call the Bouncer API: submit, poll, finish early, download + store, abandon, credits.

They run on their own task queues, where the worker sets `max_task_queue_activities_per_second`
so the Temporal server holds the API budgets across every worker process. Every client error
maps to one Temporal behaviour here, in `_as_temporal_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.service import RPCError, RPCStatusCode

from activities.catchall import NEXT_LANE, hand_off
from activities.dispatch_gate import DISPATCH
from activities.events import record_progress
from activities.heartbeat import heartbeats
from activities.user_batches import UserBatchActivities, hand_to_heirs, index_probes
from bouncer.client import MAX_RETRY_AFTER_S, BouncerClient
from bouncer.errors import (
    BadRequest,
    BouncerError,
    NotFound,
    OutOfCredits,
    RateLimited,
    Transient,
    Unauthorized,
)
from db import SLOTS_CHANNEL, fresh_result, lock_lanes
from ops.metrics import ADDRESSES_VERIFIED
from settings import Settings
from workflows.models import LanePause, StoreOutcome, StoreRequest, SubmitOutcome, scheduler_id

# Failure types the workflows branch on.
OUT_OF_CREDITS = "OutOfCredits"
UNAUTHORIZED = "Unauthorized"
BAD_REQUEST = "BadRequest"
NOT_FOUND = "NotFound"
NOT_READY = "NotReady"
UNEXPECTED_STATUS = "UnexpectedStatus"
CREATE_UNANSWERED = "CreateUnanswered"
KEY_REFUSED = "KeyRefused"  # 401/403 for a batch already at the API: retried until the key works
KEY_REFUSED_PAUSE = "the API refused the key"  # the lane's pause reason

SLOT_RECHECK_S = 1.0  # a standby batch looks at its predecessor this often without a NOTIFY
# A request may already have gone out without an answer: the API may hold a copy.
_MARK_SUBMITTING = (
    "update bouncer_batches set state = 'submitting', create_attempts = create_attempts + 1,"
    " ambiguous_creates = ambiguous_creates + (state = 'submitting')::int where id = %s"
)


# A batch seen completed at the API (by poll, or by a verified callback): the standby batch that
# follows it, if any, is woken to take its slot.
LEFT_THE_API = (
    f"with b as (update bouncer_batches set completed_at = coalesce(completed_at, now()) where id = %s returning id)"
    f" select pg_notify('{SLOTS_CHANNEL}', id::text) from b"
)


@dataclasses.dataclass
class _Prepared:
    """A batch's create request, built and not yet sent."""
    lane: str
    token: str
    count: int
    body: str
    heard: bool  # the lane's latest completion came by callback
    size: int  # the row's size then (withdrawn parts change it)


async def store_incoming(cur: psycopg.AsyncCursor, p: dict, records: int, folded: bool = False) -> None:
    """Write the `incoming` temp table's `records` records to `results` (`folded`: the case-fold
    copies; the caller has counted them already).

    A plain insert for addresses without a result, then an update for those that had one (re-
    verified past the TTL), run only when the insert left some out: in the common case every
    address is new, and the update's probe of `results` for each of 10,000 records found none
    (29 s of statement time over the 200 stores of a 2M run). Not ON CONFLICT: its speculative
    insertion measured ~30% slower for new rows. No other store can write the same address
    meanwhile (an address is in one queue row per lane).
    """
    q = {**p, "folded": folded}
    async with index_probes(cur):
        await cur.execute(
            """
            insert into results (address_id, lane, status, reason, score, accept_all, record, verified_at)
            select distinct on (address_id) address_id, %(lane)s, status, reason, score, accept_all, record, now()
            from incoming i
            where folded = %(folded)s
              and not exists (select 1 from results r where r.address_id = i.address_id and r.lane = %(lane)s)
            order by address_id
            """,
            q,
        )
        if max(cur.rowcount, 0) < records:  # (a record repeated in a download also runs it, harmlessly)
            await cur.execute(
                """
                update results r set status = i.status, reason = i.reason, score = i.score,
                    accept_all = i.accept_all, record = i.record, verified_at = now()
                from (select distinct on (address_id) * from incoming where folded = %(folded)s order by address_id) i
                where r.address_id = i.address_id and r.lane = %(lane)s
                  and r.xmin <> pg_current_xact_id()::xid  -- not the rows inserted just above
                """,
                q,
            )


async def resolve(cur: psycopg.AsyncCursor, p: dict) -> None:
    """Move the batch's queue rows that now have a fresh result into the `resolved` temp table.

    Fresh for its list (`max_result_age_s`): an address the download left out, whose result is
    older than its list's cap, stays queued to be sent again. (`parts` is materialized so that
    each part's list is looked up once, not once per queue row.)"""
    await cur.execute(
        f"""
        with parts as materialized (
            select bp.user_batch_id, bp.seq_from, bp.seq_to, b.max_result_age_s as cap
            from bouncer_batch_parts bp join user_batches b on b.id = bp.user_batch_id
            where bp.bouncer_batch_id = %(bb)s),
        d as (
            delete from queue q using parts p
            where q.user_batch_id = p.user_batch_id and q.lane = %(lane)s
              and q.seq >= p.seq_from and q.seq < p.seq_to
              and exists (select 1 from results r where r.address_id = q.address_id and r.lane = %(lane)s
                          and {fresh_result("r", cap="p.cap")})
            returning q.user_batch_id, q.address_id)
        insert into resolved select * from d
        """,
        p,
    )


async def case_folded(cur: psycopg.AsyncCursor, p: dict) -> int:
    """Give the batch's addresses still without a result the record of an address that differs
    only in case (the API answered both with one record). Adds them to `incoming` as `folded`."""
    await cur.execute(
        """
        insert into incoming (address_id, status, reason, score, accept_all, record, folded)
        with missing as (
            select q.address_id, lower(a.email) as key
            from bouncer_batch_parts bp
            join queue q on q.user_batch_id = bp.user_batch_id and q.lane = %(lane)s
                        and q.seq >= bp.seq_from and q.seq < bp.seq_to
            join addresses a on a.id = q.address_id
            where bp.bouncer_batch_id = %(bb)s),
        got as (
            select distinct on (lower(a.email)) lower(a.email) as key, i.*
            from incoming i join addresses a on a.id = i.address_id
            where lower(a.email) in (select key from missing)
            order by lower(a.email))
        select m.address_id, g.status, g.reason, g.score, g.accept_all, g.record, true
        from missing m join got g on g.key = m.key
        """,
        p,
    )
    return max(cur.rowcount, 0)


# A stored batch's outcome as its store committed it (`_stored_outcome`).
_STORED_OUTCOME = "touched, results_stored, requeued, dead_lettered, handed_off"


def _stored_outcome(lane: str, row: tuple) -> StoreOutcome:
    """The `StoreOutcome` of a store from its `_STORED_OUTCOME` columns: the same for the attempt
    that committed it and for any retry that finds the batch stored. (Batches stored before the
    outcome was kept read as all zeros.)"""
    stored, requeued, dead, handed_off = (v or 0 for v in row[1:])
    return StoreOutcome(stored=int(stored), requeued=int(requeued), dead_lettered=int(dead),
                        touched_workflow_ids=list(row[0] or []), handed_off=int(handed_off),
                        handoff_lane=NEXT_LANE.get(lane, "") if handed_off else "")


def _retry_after_s(exc: RateLimited | Transient) -> float | None:
    """The error's Retry-After if a positive finite number (the client parses it so), at most
    MAX_RETRY_AFTER_S: timedelta() cannot hold 1e300 seconds (an OverflowError in this mapper)."""
    seconds = exc.retry_after
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(float(seconds), MAX_RETRY_AFTER_S)


def _as_temporal_error(exc: BouncerError, what: str) -> ApplicationError:
    msg = f"{what}: {exc}"
    if isinstance(exc, RateLimited):
        delay = timedelta(seconds=max(_retry_after_s(exc) or 1.0, 0.05))
        return ApplicationError(msg, type="RateLimited", next_retry_delay=delay, category=ApplicationErrorCategory.BENIGN)
    if isinstance(exc, Transient):  # a 503's Retry-After is honoured as a 429's
        seconds = _retry_after_s(exc)
        delay = timedelta(seconds=seconds) if seconds else None
        return ApplicationError(msg, type="Transient", next_retry_delay=delay)
    if isinstance(exc, OutOfCredits):
        return ApplicationError(msg, type=OUT_OF_CREDITS, non_retryable=True)
    if isinstance(exc, Unauthorized):
        return ApplicationError(msg, type=UNAUTHORIZED, non_retryable=True)
    if isinstance(exc, NotFound):
        return ApplicationError(msg, type=NOT_FOUND, non_retryable=True)
    if isinstance(exc, BadRequest):
        return ApplicationError(msg, type=BAD_REQUEST, non_retryable=True)
    return ApplicationError(msg, type="Transient")


class BouncerApiActivities:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool, bouncer: BouncerClient,
                 client: Client | None = None) -> None:
        self.settings = settings
        self.pool = pool
        self.bouncer = bouncer
        self.client = client  # for `StoreRequest.notify`
        self._user_batches = UserBatchActivities(settings, pool, client)  # finalizes small lists
        # Completions come in bursts (batches created together finish together). Stores beyond
        # these wait, so the packs and creations that refill the freed slots get the CPU first.
        self._storing = asyncio.Semaphore(settings.store_concurrency)

    async def _notify(self, request: StoreRequest, workflow_ids: list[str]) -> None:
        """Signal `progressed` to the user batches a store touched, right after its commit (a
        workflow task sooner than through the Bouncer batch workflow). At least once: a retry
        that finds the batch stored signals again; a finished user batch ignores it. Any other
        failure fails the activity, whose retry signals again (the list would otherwise hear of
        the store only at its next slow recheck)."""
        if not request.notify or self.client is None:
            return

        async def one(workflow_id: str) -> None:
            try:
                await self.client.get_workflow_handle(workflow_id).signal("progressed")
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise
                activity.logger.info("user batch %s not signalled (finished or cancelled): %s", workflow_id, exc)

        await asyncio.gather(*(one(w) for w in workflow_ids))

    @contextlib.asynccontextmanager
    async def _store_turn(self) -> AsyncIterator[None]:
        """Once this process's dispatch is quiet (`DispatchGate`), one of STORE_CONCURRENCY turns;
        or neither after STORE_TURN_WAIT_S in all, or when more than MAX_CONCURRENT_BATCHES
        stores wait: stores yield to a burst of refills, but never fall behind the API for longer
        than that (with a hard cap, a fast API's completions outran the stores and the lane's
        dispatch stalled on them)."""
        deadline = time.monotonic() + self.settings.store_turn_wait_s
        if await DISPATCH.quiet(self.settings.store_quiet_s, deadline, backlog=self.settings.max_concurrent_batches):
            yield  # a backlog of stores: no turn to wait for either
            return
        try:
            await asyncio.wait_for(self._storing.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            yield
            return
        try:
            yield
        finally:
            self._storing.release()

    @activity.defn
    @heartbeats
    async def submit_batch(self, bouncer_batch_id: int) -> SubmitOutcome:
        """Create the batch at the API with its addresses; idempotent once the API answered.

        Addresses that got a fresh result since packing are not sent (pay once). A retry after a
        request that got no answer is an ambiguous create: it is counted on the batch row.
        """
        with DISPATCH.dispatching():
            return await self._submit(bouncer_batch_id)

    async def _submit(self, bouncer_batch_id: int) -> SubmitOutcome:
        # The creation's turn first, then the body: a list cancelled or paused while this waited
        # for its turn is left out, not sent (and charged) from a body built before.
        async with self.bouncer.create_gate:
            prepared = await self._prepare(bouncer_batch_id, mark_submitting=True)
            if isinstance(prepared, SubmitOutcome):
                return prepared
            return await self._send(bouncer_batch_id, prepared)

    @activity.defn
    @heartbeats
    async def submit_standby_batch(self, bouncer_batch_id: int) -> SubmitOutcome:
        """Create a standby batch (packed ahead while every slot of its lane was busy) the moment
        the batch it follows (`after_id`) has left the API, unless its lane is held (paused).

        Its request body is built first, while it waits: the refill of a freed slot is one NOTIFY
        and one request, not a scheduler workflow task, a pack, a workflow start, an activity
        dispatch and a body. Built ahead, the body can only go stale by a list paused or cancelled
        meanwhile, whose parts leave the batch (then it is built again): an address is queued once
        per lane, so no other batch of the lane can have verified it since.
        """
        prepared = await self._prepare(bouncer_batch_id, mark_submitting=False)
        if isinstance(prepared, SubmitOutcome):
            return prepared
        await self._await_slot(bouncer_batch_id)
        with DISPATCH.dispatching():
            async with self.bouncer.create_gate:  # its turn, then the look at its parts (as `_submit`)
                ready = await self._mark_submitting(bouncer_batch_id, prepared.size)
                if isinstance(ready, SubmitOutcome):
                    return ready
                if not ready:  # a list was paused or cancelled while it waited: leave its addresses out
                    prepared = await self._prepare(bouncer_batch_id, mark_submitting=True)
                    if isinstance(prepared, SubmitOutcome):
                        return prepared
                return await self._send(bouncer_batch_id, prepared)

    async def _await_slot(self, bouncer_batch_id: int) -> None:
        """Return once the batch this one follows has left the API (completion seen by callback or
        poll, or its end) and the lane has no hold, or once this one was emptied. LISTEN comes
        before each look, so a NOTIFY in between waits in the connection's backlog; a lost one
        costs at most SLOT_RECHECK_S."""
        async with await psycopg.AsyncConnection.connect(self.settings.database_url, autocommit=True) as conn:
            await conn.execute(f"listen {SLOTS_CHANNEL}")
            while True:
                row = await (await conn.execute(
                    """
                    select y.size = 0  -- emptied while it waited (`refresh_standby`, `release_unclaimed`)
                           or ((x.id is null or x.completed_at is not null or x.state in ('stored', 'failed'))
                               and not exists (select 1 from lane_holds h where h.lane = y.lane))
                    from bouncer_batches y left join bouncer_batches x on x.id = y.after_id
                    where y.id = %s
                    """,
                    (bouncer_batch_id,),
                )).fetchone()
                if row is None or row[0]:
                    return
                async for _note in conn.notifies(timeout=SLOT_RECHECK_S, stop_after=1):
                    pass

    async def _mark_submitting(self, bouncer_batch_id: int, size: int) -> SubmitOutcome | bool:
        """A standby batch prepared at `size` is about to be sent: True once marked `submitting`;
        False if a list of its parts was paused or cancelled meanwhile (`release_unclaimed` took its
        parts out: the body is to be built again); an outcome if it was sent or ended meanwhile
        (another attempt)."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "select state, provider_batch_id, sent, size, ambiguous_creates from bouncer_batches"
                " where id = %s for update",
                (bouncer_batch_id,),
            )
            state, provider_id, sent, now_size, unanswered = await cur.fetchone()
            if provider_id is not None or state in ("stored", "failed"):
                return SubmitOutcome(sent=sent or 0, submitted=provider_id is not None)
            if now_size != size:
                return False
            self._send_again_or_stop(bouncer_batch_id, state, unanswered)
            await cur.execute(_MARK_SUBMITTING, (bouncer_batch_id,))
            return True

    async def _prepare(self, bouncer_batch_id: int, mark_submitting: bool) -> _Prepared | SubmitOutcome:
        """The request body of a batch, built by Postgres; with `mark_submitting`, the row is marked
        `submitting` in the same transaction. An outcome instead when there is nothing to send."""
        async with self.pool.connection() as conn:
            async with conn.transaction(), conn.cursor() as cur:
                await cur.execute(
                    "select lane, state, provider_batch_id, sent, callback_token, size, ambiguous_creates"
                    " from bouncer_batches where id = %s for update",
                    (bouncer_batch_id,),
                )
                row = await cur.fetchone()
                if row is None:
                    raise ApplicationError(f"Bouncer batch {bouncer_batch_id} does not exist", non_retryable=True)
                lane, state, provider_id, sent, token, size, unanswered = row
                if provider_id is not None or state in ("stored", "failed"):
                    return SubmitOutcome(sent=sent or 0, submitted=provider_id is not None)
                if mark_submitting:
                    self._send_again_or_stop(bouncer_batch_id, state, unanswered)
                # Postgres writes the request body (C, in its own process): the worker's event
                # loop, shared with workflow tasks and other stores, does no per-address work.
                # Per 10,000 addresses: 14 ms, against 26 ms (11 ms of worker CPU) for rows
                # encoded in Python, and 21 ms for json_agg(json_build_object(...)).
                # `name` carries our address id; the body is byte-identical to orjson's.
                await cur.execute(
                    f"""
                    select count(*), '[' || string_agg('{{"email":' || to_json(a.email)::text
                                                      || ',"name":"' || q.address_id || '"}}', ','
                                                      order by p.seq_from, q.seq) || ']'
                    from bouncer_batch_parts p
                    join queue q on q.user_batch_id = p.user_batch_id and q.lane = %(lane)s
                                and q.seq >= p.seq_from and q.seq < p.seq_to
                    join addresses a on a.id = q.address_id
                    join user_batches b on b.id = q.user_batch_id
                    where p.bouncer_batch_id = %(bb)s
                      and not exists (select 1 from results r where r.address_id = q.address_id and r.lane = %(lane)s
                                      and {fresh_result("r", cap="b.max_result_age_s")})
                      -- cancelled after packing and nobody else needs it: do not spend a credit
                      and not (b.state = 'cancelled' and not exists (
                               select 1 from waits w where w.lane = %(lane)s and w.address_id = q.address_id))
                    """,
                    {"bb": bouncer_batch_id, "lane": lane, **self.settings.freshness()},
                )
                count, body = await cur.fetchone()
                if not count:
                    await cur.execute(
                        "update bouncer_batches set state = 'submitted', sent = 0, submitted_at = now() where id = %s",
                        (bouncer_batch_id,),
                    )
                    return SubmitOutcome(sent=0, submitted=False)
                heard = False
                if self.settings.callback_base_url:
                    # Did the lane's latest known completion come by callback? (A backward scan
                    # of the primary key that stops at the first completed batch: the in-flight
                    # ones, at most a lane's slots, are skipped.)
                    await cur.execute(
                        "select callback_at is not null from bouncer_batches where lane = %s and id < %s"
                        " and (callback_at is not null or completed_at is not null) order by id desc limit 1",
                        (lane, bouncer_batch_id),
                    )
                    heard = bool((await cur.fetchone() or (False,))[0])
                if mark_submitting:
                    await cur.execute(_MARK_SUBMITTING, (bouncer_batch_id,))
        return _Prepared(lane, token, count, body, heard, size)

    def _send_again_or_stop(self, bouncer_batch_id: int, state: str, unanswered: int) -> None:
        """Still `submitting`: the last request got no answer (or a 5xx other than 503, which may
        come after the work), and the API may hold (and have charged) a batch for it. Past
        MAX_UNANSWERED_CREATES such requests the batch is not sent again (each copy costs its size
        in credits): the workflow dead-letters it and pauses the lane."""
        sends = unanswered + (state == "submitting")
        if state == "submitting" and sends >= self.settings.max_unanswered_creates:
            raise ApplicationError(
                f"Bouncer batch {bouncer_batch_id} was sent {sends} times without an answer (dropped connections, "
                "timeouts or 5xx errors other than 503); each may have made and charged a batch at the API, so it "
                "is not sent again. Check the Bouncer dashboard for those batches, then `starter.py resume --lane` "
                "and `starter.py dlq retry`",
                type=CREATE_UNANSWERED, non_retryable=True,
            )

    async def _send(self, bouncer_batch_id: int, prepared: _Prepared) -> SubmitOutcome:
        """The create request of a batch marked `submitting`, and its answer recorded."""
        callback = None
        if self.settings.callback_base_url:
            callback = f"{self.settings.callback_base_url}/callbacks/bouncer/{bouncer_batch_id}?token={prepared.token}"
        try:
            created = await self.bouncer.create_batch_body(prepared.body.encode(), callback_url=callback,
                                                           gate_held=True)
        except BouncerError as exc:
            if not (isinstance(exc, Transient) and exc.ambiguous):
                # A clear answer (a refusal, a 503): nothing was created, so a retry is not ambiguous.
                async with self.pool.connection() as conn:
                    await conn.execute(
                        "update bouncer_batches set state = 'packed', last_error = %s where id = %s",
                        (str(exc)[:500], bouncer_batch_id),
                    )
            raise _as_temporal_error(exc, f"creating Bouncer batch {bouncer_batch_id}") from None
        async with self.pool.connection() as conn:  # none is held during the request
            await conn.execute(
                "update bouncer_batches set state = 'submitted', provider_batch_id = %s, sent = %s,"
                " submitted_at = now() where id = %s",
                (created.batch_id, prepared.count, bouncer_batch_id),
            )
        return SubmitOutcome(sent=prepared.count, submitted=True, callback=callback is not None,
                             callbacks_heard=prepared.heard)

    async def _provider_id(self, bouncer_batch_id: int) -> tuple[str, str]:
        """The batch's id at the API, and its lane."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute("select provider_batch_id, lane from bouncer_batches where id = %s",
                                   (bouncer_batch_id,))
            ).fetchone()
        if row is None or row[0] is None:
            raise ApplicationError(f"Bouncer batch {bouncer_batch_id} was never created at the API", non_retryable=True)
        return row[0], row[1]

    async def _api_error(self, exc: BouncerError, what: str, lane: str) -> ApplicationError:
        """The Temporal error for a failed request about a batch already at the API (paid for).
        A refused key (401/403) pauses the lane, so nothing new is created with it, and is retried
        by the activity's policy: the batch keeps its place and its results are fetched once the
        key works again, not dead-lettered (and paid for again by `dlq retry`)."""
        if not isinstance(exc, Unauthorized):
            return _as_temporal_error(exc, what)
        with contextlib.suppress(Exception):  # no scheduler running (or no client in a test): logged below
            await activity.client().get_workflow_handle(scheduler_id(lane)).signal("pause", LanePause(KEY_REFUSED_PAUSE))
        activity.logger.warning("%s: the API refused the key; lane %s paused, retrying until it works", what, lane)
        return ApplicationError(f"{what}: {exc} (lane {lane} paused; fix BOUNCER_API_KEY, restart the workers, "
                                "then `starter.py resume --lane`)", type=KEY_REFUSED)

    @activity.defn
    async def await_batch_completion(self, bouncer_batch_id: int) -> int:
        """One status poll. Returns the processed count once completed; otherwise raises a
        retryable `NotReady` so the activity's RetryPolicy (fixed interval) is the poller."""
        provider_id, lane = await self._provider_id(bouncer_batch_id)
        try:
            status = await self.bouncer.get_status(provider_id, with_stats=True)
        except BouncerError as exc:
            raise await self._api_error(exc, f"status of Bouncer batch {bouncer_batch_id}", lane) from None
        if status.status in ("queued", "processing"):
            raise ApplicationError(f"Bouncer batch {bouncer_batch_id} is {status.status}", type=NOT_READY,
                                   category=ApplicationErrorCategory.BENIGN)
        if status.status != "completed":
            # Not a status the API documents: still polled (the batch is paid for), but as a failure
            # the Web UI and the worker's log show, not the benign not-ready.
            raise ApplicationError(
                f"Bouncer batch {bouncer_batch_id} is {status.status!r} at the API, not a status it documents:"
                " polled until it completes or its deadline passes (then finished early or deleted)",
                type=UNEXPECTED_STATUS,
            )
        DISPATCH.heard()
        async with self.pool.connection() as conn:
            await conn.execute(LEFT_THE_API, (bouncer_batch_id,))
        return status.processed or status.quantity

    @activity.defn
    async def finish_batch(self, bouncer_batch_id: int) -> bool:
        """Ask the API to finish a batch stuck past its deadline (`POST .../finish`): what it has
        verified comes back with the download, the rest as `unknown`/`unknown`. False when the
        API no longer has the batch."""
        provider_id, lane = await self._provider_id(bouncer_batch_id)
        try:
            await self.bouncer.finish(provider_id)
        except NotFound:
            return False
        except BouncerError as exc:
            raise await self._api_error(exc, f"finishing Bouncer batch {bouncer_batch_id}", lane) from None
        return True

    @activity.defn
    async def abandon_batch(self, bouncer_batch_id: int) -> None:
        """Delete a batch stuck at the API (its addresses are then re-queued by store_results)."""
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute("select provider_batch_id, lane from bouncer_batches where id = %s",
                                   (bouncer_batch_id,))
            ).fetchone()
        if row is None or row[0] is None:
            return
        try:
            await self.bouncer.delete(row[0])
        except NotFound:
            return
        except BouncerError as exc:
            raise await self._api_error(exc, f"deleting Bouncer batch {bouncer_batch_id}", row[1]) from None

    @activity.defn
    async def read_credits(self) -> int:
        try:
            return await self.bouncer.credits()
        except BouncerError as exc:
            raise _as_temporal_error(exc, "reading credits") from None

    @activity.defn
    @heartbeats
    async def store_results(self, request: StoreRequest) -> StoreOutcome:
        """Download the results and store them; resolve, re-queue or dead-letter every address.

        In one transaction: results are upserted (COPY), queue and waits rows of resolved
        addresses are deleted and each user batch's `remaining` decremented; addresses of the
        batch left without a result are re-queued (attempts + 1) or dead-lettered past the
        limit. Returns the workflow ids of the user batches to notify. Idempotent. After its commit
        it finalizes the small lists it settled (`_finalize_small`).
        """
        bb, lane = request.bouncer_batch_id, request.lane
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(f"select state, provider_batch_id, express, {_STORED_OUTCOME} from bouncer_batches"
                                   " where id = %s", (bb,))
            ).fetchone()
        if row is None:
            raise ApplicationError(f"Bouncer batch {bb} does not exist", non_retryable=True)
        if row[0] in ("stored", "failed"):  # a retry of a store that committed (then its signals failed, ...)
            outcome = _stored_outcome(lane, row[3:])
            await self._notify(request, outcome.touched_workflow_ids)
            return outcome
        # An express batch (one small list, a few hundred rows) is stored at once: its user is waiting.
        async with contextlib.nullcontext() if row[2] else self._store_turn():
            body = b""
            if request.download and row[1] is not None:
                try:
                    body = await self.bouncer.download_raw(row[1])
                except BadRequest as exc:
                    # "Not completed": the completion signal was early (e.g. a stale callback). Retry by
                    # policy until it is; a non-retryable failure here would strand the batch's addresses.
                    raise ApplicationError(f"downloading Bouncer batch {bb}: {exc}", type=NOT_READY) from None
                except BouncerError as exc:
                    raise await self._api_error(exc, f"downloading Bouncer batch {bb}", lane) from None
                if body.lstrip()[:1] != b"[":
                    raise ApplicationError(f"downloading Bouncer batch {bb}: the answer is not a JSON array",
                                           type="Transient")
            activity.heartbeat("downloaded")

            p = {"bb": bb, "lane": lane, **self.settings.freshness(), "max": self.settings.max_address_attempts,
                 "reason": request.failure_reason or "no result after the maximum number of attempts"}
            async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.execute(f"select state, {_STORED_OUTCOME} from bouncer_batches where id = %s for update",
                                  (bb,))
                again = await cur.fetchone()
                if again[0] in ("stored", "failed"):  # stored meanwhile (a retry overtook this attempt)
                    outcome, by_status, settled = _stored_outcome(lane, again[1:]), {}, []
                else:
                    outcome, by_status, settled = await self._store_locked(cur, request, body, p)
        for status, n in by_status.items():  # counted once committed: a retry that finds it stored adds nothing
            ADDRESSES_VERIFIED.labels(lane, status).inc(n)
        await self._finalize_small(settled)
        await self._notify(request, outcome.touched_workflow_ids)
        return outcome

    @staticmethod
    async def _hand_stopped_leftovers(cur: psycopg.AsyncCursor, lane: str) -> int:
        """Leftovers (not dead) of a list cancelled or paused while they were in flight go to a queued
        list waiting on them, as at pause and cancel (`release_unclaimed`): on their own list's queue
        nothing packs them while it is stopped, and the waiting list hung on them. Returns how many;
        they leave `leftover`. A paused owner counts them as withdrawn (it waits on them on resume)."""
        await cur.execute("drop table if exists released")
        await cur.execute(
            """
            create temp table released on commit drop as
            select t.user_batch_id, t.address_id, t.attempts
            from leftover t join user_batches b on b.id = t.user_batch_id and b.state <> 'queued'
            where not t.dead
            """
        )
        if not cur.rowcount or not (handed := await hand_to_heirs(cur, lane)):
            return 0
        await cur.execute(
            """
            with d as (delete from leftover t using heirs h where t.address_id = h.address_id and not t.dead
                       returning t.user_batch_id)
            update user_batch_lanes l set remaining = l.remaining - c.n, withdrawn = l.withdrawn + c.n
            from (select user_batch_id, count(*) as n from d group by 1) c
            join user_batches b on b.id = c.user_batch_id and b.state = 'paused'
            where l.user_batch_id = c.user_batch_id and l.lane = %(lane)s
            """,
            {"lane": lane},
        )
        return handed

    async def _finalize_small(self, user_batch_ids: list[int]) -> None:
        """Finalize the small lists this store settled, before their workflows hear of it: the list
        reads `completed` a workflow task and an activity sooner (`bench fairness`: 100 addresses
        behind a 1M import). Their workflows' next `advance_user_batch` returns the summary. Big
        lists, whose summary takes longer, are left to their workflow, as is any this fails for."""
        for user_batch_id in user_batch_ids:
            try:
                await self._user_batches.finalize_user_batch(user_batch_id)
            except (psycopg.Error, ApplicationError) as exc:
                activity.logger.warning("user batch %s left to its workflow to finalize: %s", user_batch_id, exc)

    async def _store_locked(
        self, cur: psycopg.AsyncCursor, request: StoreRequest, body: bytes, p: dict
    ) -> tuple[StoreOutcome, dict[str, int], list[int]]:
        """`store_results`' transaction, once it holds the batch row: results, queue, waits, counts.
        Also returns the small lists (≤ EXPRESS_MAX_ADDRESSES rows) it left with nothing outstanding."""
        bb, lane = request.bouncer_batch_id, request.lane
        # The results insert sorts the download with its records (~8 MB): at the default 4 MB
        # it spilled to disk (1 GB of temp writes per 2M addresses).
        await cur.execute("set local work_mem = '64MB'")
        await cur.execute(
            "create temp table incoming (address_id bigint, status text, reason text, score smallint,"
            " accept_all text, record jsonb, folded bool not null default false) on commit drop"
        )
        if body:
            # Postgres parses the download (C, in its own process): the worker's event loop,
            # shared with workflow tasks and other stores, does no per-record work. Records
            # whose `name` is not one of our address ids are not ours: skipped.
            try:
                await cur.execute(
                    """
                    insert into incoming (address_id, status, reason, score, accept_all, record)
                    select (e->>'name')::bigint, coalesce(e->>'status', 'unknown'), e->>'reason',
                           case when jsonb_typeof(e->'score') = 'number' then round((e->>'score')::numeric)::smallint end, e->'domain'->>'acceptAll', e
                    from jsonb_array_elements(%s::jsonb) e
                    where e->>'name' ~ '^[0-9]{1,18}$'
                    """,
                    (body.decode("utf-8", "replace"),),
                )
            except (psycopg.errors.InvalidTextRepresentation, psycopg.errors.NumericValueOutOfRange,
                    psycopg.errors.InvalidParameterValue) as exc:
                raise ApplicationError(f"downloading Bouncer batch {bb}: the answer is not valid: {exc}",
                                       type="Transient") from None
        if request.finished_early:
            # The API finished the batch before verifying these: no verdict, so not stored; they
            # are re-queued below like the rest of an unanswered batch (bounded attempts).
            await cur.execute("delete from incoming where status = 'unknown' and reason = 'unknown'")
        await cur.execute("select status, count(*) from incoming group by 1")
        by_status = {status: int(n) for status, n in await cur.fetchall()}
        stored = sum(by_status.values())
        await store_incoming(cur, p, stored)
        await cur.execute("create temp table resolved (user_batch_id bigint, address_id bigint) on commit drop")
        await resolve(cur, p)
        # The API folds case: two of our addresses that differ only in the local part's case
        # come back as one record (charged once). Both get it; else the other looks unanswered
        # and is sent and paid again (found by tests/test_bad_input.py). Only addresses left
        # without a record are looked at, so the common case costs one empty probe.
        if stored and (copies := await case_folded(cur, p)):
            await store_incoming(cur, p, copies, folded=True)
            await resolve(cur, p)
        # The rest: sent but no result came back (or the batch failed/was abandoned).
        await cur.execute(
            """
            create temp table leftover on commit drop as
            with d as (
                delete from queue q using bouncer_batch_parts bp
                where bp.bouncer_batch_id = %(bb)s and q.user_batch_id = bp.user_batch_id and q.lane = %(lane)s
                  and q.seq >= bp.seq_from and q.seq < bp.seq_to
                returning q.user_batch_id, q.address_id, q.attempts + %(inc)s as attempts)
            select d.*, false as dead,
                   (b.state = 'cancelled' and not exists (
                        select 1 from waits w where w.lane = %(lane)s and w.address_id = d.address_id)) as withdrawn
            from d join user_batches b on b.id = d.user_batch_id
            """,
            {**p, "inc": int(request.count_attempt)},
        )
        leftovers = cur.rowcount  # 0 in the common case (all answered): the steps below that need rows are skipped
        # Withdrawn rows (their user batch was cancelled, nobody else waits) just leave the queue.
        await cur.execute("delete from leftover where withdrawn")
        await cur.execute(
            "update leftover set dead = true where %(reason_given)s or attempts >= %(max)s",
            {**p, "reason_given": bool(request.failure_reason)},
        )
        await cur.execute(
            """
            insert into dead_letters (lane, address_id, bouncer_batch_id, reason, attempts)
            select %(lane)s, address_id, %(bb)s, %(reason)s, attempts from leftover where dead
            """,
            p,
        )
        handed = await self._hand_stopped_leftovers(cur, lane) if leftovers else 0
        if leftovers:
            await cur.execute(
                lock_lanes("select distinct user_batch_id, %(lane)s::text from leftover where not dead"), p)
        await cur.execute(
            """
            insert into queue (user_batch_id, lane, seq, address_id, attempts)
            select t.user_batch_id, %(lane)s, l.next_seq + row_number() over (partition by t.user_batch_id
                   order by t.address_id) - 1, t.address_id, t.attempts
            from leftover t join user_batch_lanes l on l.user_batch_id = t.user_batch_id and l.lane = %(lane)s
            where not t.dead
            """,
            p,
        )
        await cur.execute(
            """
            update user_batch_lanes l set next_seq = l.next_seq + c.n
            from (select user_batch_id, count(*) as n from leftover where not dead group by 1) c
            where l.user_batch_id = c.user_batch_id and l.lane = %(lane)s
            """,
            p,
        )
        # Everyone waiting on a resolved or dead address: owners (queue rows) and waiters.
        await cur.execute(
            """
            create temp table settled on commit drop as
            select user_batch_id, address_id, false as dead from resolved
            union all select user_batch_id, address_id, true from leftover where dead
            """
        )
        await cur.execute(
            """
            insert into settled
            select w.user_batch_id, w.address_id, s.dead from waits w
            join (select distinct address_id, dead from settled) s on s.address_id = w.address_id
            where w.lane = %(lane)s
            """,
            p,
        )
        await cur.execute(
            "delete from waits w using settled s where w.lane = %(lane)s and w.address_id = s.address_id", p
        )
        await cur.execute(
            """
            update user_batch_lanes l set remaining = l.remaining - c.n, failed = l.failed + c.dead
            from (select user_batch_id, count(*) as n, count(*) filter (where dead) as dead
                  from settled group by 1) c
            where l.user_batch_id = c.user_batch_id and l.lane = %(lane)s
            """,
            p,
        )
        handed_off = await hand_off(cur, lane, self.settings.freshness())  # accept-all addresses -> the catchall lane
        await cur.execute(
            """
            select array_agg(b.workflow_id order by b.id) from user_batches b
            where b.workflow_id is not null and b.id in (
                select user_batch_id from settled union select user_batch_id from leftover
                union select user_batch_id from bouncer_batch_parts where bouncer_batch_id = %(bb)s)
            """,
            p,
        )
        touched = list((await cur.fetchone())[0] or [])
        await cur.execute(
            "select array_agg(distinct user_batch_id) from (select user_batch_id from settled"
            " union select user_batch_id from leftover) t"
        )
        progressed = list((await cur.fetchone())[0] or [])
        await record_progress(cur, progressed)  # throttled user_batch.progress
        await cur.execute(
            "select coalesce(array_agg(b.id order by b.id), '{}') from user_batches b"
            " where b.id = any(%s) and b.state = 'queued' and b.rows_total <= %s"
            " and not exists (select 1 from user_batch_lanes l where l.user_batch_id = b.id and l.remaining > 0)",
            (progressed, self.settings.express_max_addresses),
        )
        settled = list((await cur.fetchone())[0])
        await cur.execute(
            "select count(*) filter (where not dead), count(*) filter (where dead) from leftover"
        )
        requeued, dead = await cur.fetchone()
        requeued += handed
        await cur.execute(
            "update bouncer_batches set state = %s, touched = %s, stored_at = now(),"
            " last_error = coalesce(nullif(%s, ''), last_error),"
            " results_stored = %s, requeued = %s, dead_lettered = %s, handed_off = %s where id = %s",
            ("failed" if request.failure_reason else "stored", touched, request.failure_reason,
             stored, requeued, dead, handed_off, bb),
        )
        outcome = _stored_outcome(lane, (touched, stored, requeued, dead, handed_off))
        return outcome, by_status, settled

"""Database activities of a user batch: prepare, progress, pause/resume, cancel, finalize.

Each is idempotent: re-running it after a crash or retry gives the same database state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import AsyncIterator

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from activities.catchall import CANDIDATES
from activities.events import record_event
from activities.heartbeat import heartbeats
from activities.ingest import list_name
from activities.inputs import source_problems
from db import fresh_result, lock_lanes
from settings import CATCHALL, DELIVERABILITY, LANES, Settings
from workflows.models import (
    FINISHED_STATES,
    PRIORITIES,
    LaneProgress,
    PauseRequest,
    Progress,
    RegisterRequest,
    SchedulerInput,
    Summary,
    scheduler_id,
    scheduler_summary,
)

ANALYZE_ABOVE_ROWS = 10_000
STARTING = ("scheduled", "receiving", "preparing")  # user batch states prepare acts on
PREPARE_ATTEMPTS = 5  # in-process re-runs after losing a race with a concurrent prepare
_FRESH = fresh_result("r")
_LOCK_OWN_LANE = lock_lanes("values (%(ub)s::bigint, %(lane)s::text)")
# A resume re-queues its list's addresses ON CONFLICT: an insert that meets an in-flight row a
# store is deleting waits for that store, while holding the list's lane row, which the same store
# locks later (its leftovers, the paused owner's counts): a deadlock, one side aborted and retried
# (tests/test_lock_order.py). So a resume first takes the rows that store takes first, those of
# its list's open Bouncer batches (id order): it waits for a store under way, or holds it off,
# before it touches a lane row. The store path is unchanged. The stores it may still wait on
# (other lists' batches holding the same addresses) need nothing of a paused list: it has no
# waits (pause dropped them), inherits nothing and gets no hand-offs (both need `queued`).
_WAIT_FOR_STORES = """
    select 1 from bouncer_batches b
    where b.state in ('packed', 'submitting', 'submitted')
      and exists (select 1 from bouncer_batch_parts p where p.bouncer_batch_id = b.id and p.user_batch_id = %(ub)s)
    order by b.id for update of b
"""


@contextlib.asynccontextmanager
async def index_probes(cur: psycopg.AsyncCursor) -> AsyncIterator[None]:
    """Anti-joins of one list against a lane's whole backlog (or every address ever seen) probe
    the unique index per row: a hash join would read the whole big table on every prepare."""
    await cur.execute("set local enable_hashjoin = off; set local enable_mergejoin = off")
    yield  # on an error the transaction is rolled back, and these settings with it
    await cur.execute("set local enable_hashjoin = on; set local enable_mergejoin = on")


async def enqueue_lane(cur: psycopg.AsyncCursor, user_batch_id: int, lane: str, ttl: dict) -> None:
    """Put this batch's unresolved unique addresses on its own queue, or wait on another's.

    An address is resolved by a fresh result (reused, no credit spent) or by a dead letter
    written after the batch was created. An address already queued by another user batch
    becomes a `waits` row (paid once). Re-runnable: used by prepare and by resume.
    """
    p = {"ub": user_batch_id, "lane": lane, **ttl}
    await cur.execute("drop table if exists ub_addr")
    await cur.execute(
        f"""
        create temp table ub_addr on commit drop as
        select a.id as address_id, min(i.row_no) as row_no,
               bool_or(exists (select 1 from results r where r.address_id = a.id and r.lane = %(lane)s and {_FRESH})) as fresh,
               false as new
        from items i join addresses a on a.email = i.email
        where i.user_batch_id = %(ub)s and i.state = 'pending' {CANDIDATES if lane == CATCHALL else ""}
        group by a.id
        """,
        p,
    )
    await enqueue_listed(cur, user_batch_id, lane, ttl)


async def enqueue_listed(
    cur: psycopg.AsyncCursor, user_batch_id: int, lane: str, ttl: dict, first_time: bool = False
) -> None:
    """`enqueue_lane` once the `ub_addr` temp table lists the batch's addresses (address id,
    first line, fresh result or not, new: registered by this transaction).

    A new address cannot be queued, waited on or dead-lettered by anyone else (its id did not
    exist before this transaction), so only known addresses are looked up in those indexes:
    at 2M the probes for a list of new addresses cost seconds and found nothing.

    `first_time` (prepare of the deliverability lane): none of the batch's addresses can be in
    flight, so an anti-join skips addresses already queued. Otherwise (resume, the catchall lane) ON
    CONFLICT: a store deleting one of this batch's in-flight rows makes the insert wait for that
    store's commit, so the counts below see it. With the anti-join a resume racing a store
    counted the store's rows as still queued and its batch never finished (found by the replay
    test, 1 run in ~15).
    """
    p = {"ub": user_batch_id, "lane": lane, **ttl}
    await cur.execute("analyze ub_addr")
    await cur.execute(
        """
        select count(*), count(*) filter (where fresh),
               count(*) filter (where not fresh and not new and exists (
                   select 1 from dead_letters d join user_batches b on b.id = %(ub)s
                   where d.lane = %(lane)s and d.address_id = ub_addr.address_id and d.created_at >= b.created_at))
        from ub_addr
        """,
        p,
    )
    unique_addresses, cached, failed = await cur.fetchone()
    # Dead-lettered since the batch began: resolved as failed, not sent again on resume.
    await cur.execute(
        """
        delete from ub_addr t using dead_letters d, user_batches b
        where b.id = %(ub)s and d.lane = %(lane)s and d.address_id = t.address_id
          and d.created_at >= b.created_at and not t.fresh and not t.new
        """,
        p,
    )
    await cur.execute(_LOCK_OWN_LANE, p)  # a store may be numbering re-queued rows of this lane
    async with index_probes(cur):
        await cur.execute(
            f"""
        insert into queue (user_batch_id, lane, seq, address_id)
        select %(ub)s, %(lane)s, l.next_seq + row_number() over (order by t.row_no) - 1, t.address_id
        from ub_addr t join user_batch_lanes l on l.user_batch_id = %(ub)s and l.lane = %(lane)s
        where not t.fresh {"and (t.new or not exists (select 1 from queue q where q.lane = %(lane)s"
                            " and q.address_id = t.address_id))" if first_time else ""}
        order by t.row_no
        {"" if first_time else "on conflict do nothing"}
        """,
            p,
        )
    async with index_probes(cur):  # a hash join read the lane's whole queue: 1 s per 100k-row list at 2M
        await cur.execute(
            """
            insert into waits (lane, address_id, user_batch_id)
            select %(lane)s, t.address_id, %(ub)s from ub_addr t
            join queue q on q.lane = %(lane)s and q.address_id = t.address_id and q.user_batch_id <> %(ub)s
            where not t.fresh and not t.new
            on conflict do nothing
            """,
            p,
        )
    await cur.execute(
        """
        update user_batch_lanes l set
            unique_addresses = %(unique)s,
            cached = %(cached)s,
            -- Never below what was numbered before: rows of it may be in flight (seq < cursor), and
            -- the store re-queues their leftovers at next_seq, which must be >= cursor to be packed.
            next_seq = greatest(l.next_seq, coalesce(
                (select max(seq) + 1 from queue where user_batch_id = %(ub)s and lane = %(lane)s), 0)),
            enqueued = (select count(*) from queue where user_batch_id = %(ub)s and lane = %(lane)s),
            shared = (select count(*) from waits where user_batch_id = %(ub)s and lane = %(lane)s),
            failed = %(failed)s,
            holes = not %(dense)s  -- dense: numbered by row_number() with nothing skipped
        where user_batch_id = %(ub)s and lane = %(lane)s
        """,
        {**p, "unique": unique_addresses, "cached": cached, "failed": failed, "dense": first_time},
    )
    await cur.execute(
        "update user_batch_lanes set remaining = enqueued + shared, withdrawn = 0"
        " where user_batch_id = %(ub)s and lane = %(lane)s",
        p,
    )


async def release_unclaimed(cur: psycopg.AsyncCursor, user_batch_id: int, lane: str) -> int:
    """Withdraw this batch's unclaimed queue rows (and those in standby batches not yet being
    sent); hand shared ones to a batch still waiting.

    Returns how many addresses moved to another user batch's queue (so its lane has new work).
    In-flight (claimed) addresses finish: they are already paid for.
    """
    p = {"ub": user_batch_id, "lane": lane}
    # Its parts of standby batches (packed ahead, not yet being sent: they may wait minutes for a
    # slot) are unclaimed too. A standby batch whose size changed builds its request again.
    await cur.execute("drop table if exists withdrawn")
    await cur.execute(
        """
        create temp table withdrawn on commit drop as
        with s as (select id from bouncer_batches where lane = %(lane)s and state = 'packed' and after_id is not null
                   for update),
             d as (delete from bouncer_batch_parts p using s where p.bouncer_batch_id = s.id and p.user_batch_id = %(ub)s
                   returning p.bouncer_batch_id, p.seq_from, p.seq_to, p.addresses)
        select * from d
        """,
        p,
    )
    await cur.execute(
        "update bouncer_batches b set size = b.size - w.n"
        " from (select bouncer_batch_id, sum(addresses) as n from withdrawn group by 1) w where b.id = w.bouncer_batch_id"
    )
    await cur.execute(
        "update user_batch_lanes set dispatched = dispatched - (select coalesce(sum(addresses), 0) from withdrawn)"
        " where user_batch_id = %(ub)s and lane = %(lane)s",
        p,
    )
    await cur.execute("drop table if exists released")
    await cur.execute(
        """
        create temp table released on commit drop as
        with d as (
            delete from queue q using user_batch_lanes l
            where q.user_batch_id = %(ub)s and q.lane = %(lane)s
              and l.user_batch_id = q.user_batch_id and l.lane = q.lane and q.seq >= l.cursor
            returning q.user_batch_id, q.address_id, q.attempts),
        w as (
            delete from queue q using withdrawn w
            where q.user_batch_id = %(ub)s and q.lane = %(lane)s and q.seq >= w.seq_from and q.seq < w.seq_to
            returning q.user_batch_id, q.address_id, q.attempts)
        select * from d union all select * from w
        """,
        p,
    )
    await cur.execute("update user_batch_lanes set holes = true where user_batch_id = %(ub)s and lane = %(lane)s", p)
    moved = await hand_to_heirs(cur, lane)
    await cur.execute("delete from waits where user_batch_id = %(ub)s and lane = %(lane)s", p)
    return moved


async def hand_to_heirs(cur: psycopg.AsyncCursor, lane: str) -> int:
    """Queue each address of the `released` temp table (user_batch_id: the list letting it go,
    address_id, attempts) on a queued list waiting on it (its heir), attempts kept; the heir's
    wait becomes its own queue row. Fills the `heirs` temp table (address_id, attempts,
    user_batch_id: the heir) and returns how many addresses found one. Used by pause and cancel
    (`release_unclaimed`) and by the store, for the leftovers of a list stopped while they were in
    flight."""
    p = {"lane": lane}
    await cur.execute("drop table if exists heirs")
    await cur.execute(
        """
        create temp table heirs on commit drop as
        select distinct on (r.address_id) r.address_id, r.attempts, w.user_batch_id
        from released r
        join waits w on w.lane = %(lane)s and w.address_id = r.address_id and w.user_batch_id <> r.user_batch_id
        join user_batches b on b.id = w.user_batch_id and b.state = 'queued'
        order by r.address_id, w.user_batch_id
        """,
        p,
    )
    if not cur.rowcount:
        return 0
    await cur.execute(lock_lanes("select distinct user_batch_id, %(lane)s::text from heirs"), p)
    await cur.execute(
        """
        insert into queue (user_batch_id, lane, seq, address_id, attempts)
        select h.user_batch_id, %(lane)s,
               l.next_seq + row_number() over (partition by h.user_batch_id order by h.address_id) - 1,
               h.address_id, h.attempts
        from heirs h join user_batch_lanes l on l.user_batch_id = h.user_batch_id and l.lane = %(lane)s
        """,
        p,
    )
    moved = cur.rowcount
    await cur.execute(
        """
        update user_batch_lanes l set next_seq = l.next_seq + c.n, enqueued = l.enqueued + c.n, shared = l.shared - c.n
        from (select user_batch_id, count(*) as n from heirs group by 1) c
        where l.user_batch_id = c.user_batch_id and l.lane = %(lane)s
        """,
        p,
    )
    await cur.execute(
        "delete from waits w using heirs h where w.lane = %(lane)s and w.address_id = h.address_id"
        " and w.user_batch_id = h.user_batch_id",
        p,
    )
    return moved


async def announce(cur: psycopg.AsyncCursor, topic: str, summary: Summary) -> None:
    """A user batch's end, to subscribers: its counts (in the same transaction as the state change)."""
    await cur.execute("select user_id from user_batches where id = %s", (summary.user_batch_id,))
    (user_id,) = await cur.fetchone()
    await record_event(cur, topic, summary.user_batch_id, user_id, {
        "user_batch_id": summary.user_batch_id, "state": summary.state, "rows": summary.rows,
        "by_state": summary.by_state, "by_status": summary.by_status,
        "by_catchall_status": summary.by_catchall_status,
    })


def _stored(summary: Summary) -> Jsonb:
    """`user_batches.summary` of a finished batch: its rows by state and by Bouncer status."""
    return Jsonb({"by_state": summary.by_state, "by_status": summary.by_status})


def lane_problem(lanes: list[str], settings: Settings) -> str:
    """Why this lane list cannot be served ('' if it can); shared by the CLI, HTTP and SDK submissions."""
    if twice := sorted({lane for lane in lanes if lanes.count(lane) > 1}):
        return f"lane {', '.join(twice)} named more than once"
    if CATCHALL in lanes and DELIVERABILITY not in lanes:
        return "the catchall lane re-verifies what the deliverability lane found accept-all: ask for both"
    if CATCHALL in lanes and CATCHALL not in settings.lanes_enabled():
        return "the catchall lane is not configured here: set CATCHALL_BASE_URL and CATCHALL_API_KEY"
    return ""


def in_lane_order(lanes: list[str]) -> list[str]:
    """The lanes asked for, in the pipeline's order whatever order they were named in: the first
    is the one whose verdict a row shows (deliverability; catchall only re-verifies its accept-all)."""
    return [lane for lane in LANES if lane in lanes]


async def settle_stranded_waits(cur: psycopg.AsyncCursor, user_batch_id: int, lane: str, ttl: dict) -> int:
    """Repair `waits` rows that no Bouncer batch will ever settle; returns how many were re-queued.

    A prepare that commits after a concurrent store resolved an address it waits on leaves a
    wait no store will see (the chaos run stranded a user batch on 21 of them). A wait is
    stranded when no queue row of its lane holds the address. Then: a fresh result settles it,
    a dead letter written since the batch began settles it as failed, and otherwise the batch
    queues the address itself. Checked only once the batch has no queue rows of its own left.
    """
    p = {"ub": user_batch_id, "lane": lane, **ttl}
    await cur.execute(
        """
        select exists (select 1 from waits where user_batch_id = %(ub)s and lane = %(lane)s)
           and not exists (select 1 from queue where user_batch_id = %(ub)s and lane = %(lane)s)
        """,
        p,
    )
    if not (await cur.fetchone())[0]:
        return 0
    await cur.execute("drop table if exists stranded")
    await cur.execute(
        f"""
        create temp table stranded on commit drop as
        select w.address_id,
               exists (select 1 from results r where r.address_id = w.address_id and r.lane = %(lane)s
                       and {_FRESH}) as fresh,
               exists (select 1 from dead_letters d join user_batches b on b.id = %(ub)s
                       where d.lane = %(lane)s and d.address_id = w.address_id and d.created_at >= b.created_at) as dead
        from waits w
        where w.user_batch_id = %(ub)s and w.lane = %(lane)s
          and not exists (select 1 from queue q where q.lane = %(lane)s and q.address_id = w.address_id)
        """,
        p,
    )
    await cur.execute(_LOCK_OWN_LANE, p)
    await cur.execute(
        """
        with q as (
            insert into queue (user_batch_id, lane, seq, address_id)
            select %(ub)s, %(lane)s, l.next_seq + row_number() over (order by s.address_id) - 1, s.address_id
            from stranded s join user_batch_lanes l on l.user_batch_id = %(ub)s and l.lane = %(lane)s
            where not s.fresh and not s.dead
            on conflict do nothing
            returning address_id)
        update stranded s set fresh = null where s.address_id in (select address_id from q)
        """,
        p,
    )
    # fresh: true = resolved, false = still open (someone queued it meanwhile: keep waiting), null = ours now.
    await cur.execute(
        """
        delete from waits w using stranded s
        where w.user_batch_id = %(ub)s and w.lane = %(lane)s and w.address_id = s.address_id
          and (s.fresh is null or s.fresh or s.dead)
        """,
        p,
    )
    await cur.execute(
        """
        update user_batch_lanes l set
            remaining = l.remaining - c.settled,
            failed = l.failed + c.dead,
            shared = l.shared - c.settled - c.requeued,
            enqueued = l.enqueued + c.requeued,
            holes = l.holes or c.requeued > 0,  -- its insert skips conflicts
            next_seq = greatest(l.next_seq, coalesce(
                (select max(seq) + 1 from queue where user_batch_id = %(ub)s and lane = %(lane)s), 0))
        from (select count(*) filter (where fresh or dead) as settled, count(*) filter (where dead and not fresh) as dead,
                     count(*) filter (where fresh is null) as requeued from stranded) c
        where l.user_batch_id = %(ub)s and l.lane = %(lane)s
        """,
        p,
    )
    await cur.execute("select count(*) filter (where fresh is null) from stranded")
    return int((await cur.fetchone())[0])


def scheduler_input(settings: Settings, lane: str) -> SchedulerInput:
    """The lane scheduler's configuration, from settings (used when signal-with-starting it)."""
    api = settings.lane_api(lane)  # each lane has its own slots and API task queues (budgets)
    return SchedulerInput(
        lane=lane,
        batch_size=api.batch_size,
        max_concurrent_batches=api.max_concurrent_batches,
        poll_interval_s=settings.poll_interval_s,
        deadline_s=settings.batch_deadline_s,
        api_create_task_queue=api.create_task_queue,
        api_task_queue=api.api_task_queue,
        credit_check_s=settings.credit_check_s,
        pack_linger_s=settings.pack_linger_s,
        fair_share=settings.fair_share,
        # The catchall lane gets trickles of hand-offs: no express batches, its slots are all it has.
        express_slots=settings.express_slots if lane == DELIVERABILITY else 0,
        express_max_addresses=settings.express_max_addresses,
        standby_batches=min(settings.standby_batches, api.max_concurrent_batches),
    )


class UserBatchActivities:
    def __init__(self, settings: Settings, pool: AsyncConnectionPool, client: Client) -> None:
        self.settings = settings
        self.pool = pool
        self.client = client

    async def _lanes_and_state(self, cur: psycopg.AsyncCursor, user_batch_id: int) -> tuple[list[str], str, dict]:
        """The batch's lanes and state (its row locked), and `Settings.freshness()` capped by its
        `max_result_age_s` (a recurring run's, or `--max-age`)."""
        await cur.execute("select lanes, state, max_result_age_s from user_batches where id = %s for update",
                          (user_batch_id,))
        row = await cur.fetchone()
        if row is None:
            raise ApplicationError(f"user batch {user_batch_id} does not exist", non_retryable=True)
        return list(row[0]), row[1], self.settings.freshness(row[2])

    @activity.defn
    async def register_user_batch(self, request: RegisterRequest) -> int:
        """Create the user batch row of an SDK submission; idempotent by workflow id.

        Inputs are checked here, so a bad one fails the workflow at once with a clear reason.
        """
        src = request.source
        problems = source_problems(src) or lane_problem(src.lanes, self.settings)
        if problems:
            raise ApplicationError("invalid user batch source: " + problems, type="InvalidInput", non_retryable=True)
        if re.fullmatch(r"user-batch-\d+", request.workflow_id):
            # starter.py, the HTTP API and recurring runs name their lists' workflows so, by row id.
            raise ApplicationError(
                f"workflow id {request.workflow_id!r} is of the form user-batch-<n>, which the CLI and the HTTP"
                " API give their lists: start this list under another workflow id",
                type="InvalidInput", non_retryable=True)
        async with self.pool.connection() as conn:
            row = await (
                await conn.execute(
                    """
                    insert into user_batches (user_id, name, priority, lanes, source, workflow_id, max_result_age_s)
                    values (%s, %s, %s, %s, %s, %s, %s)
                    on conflict (workflow_id) do update set workflow_id = excluded.workflow_id
                    returning id, user_id, source, state
                    """,
                    (src.user_id, src.name or list_name(src.uri), PRIORITIES.index(src.priority),
                     in_lane_order(src.lanes), src.uri, request.workflow_id, src.max_result_age_s),
                )
            ).fetchone()
        ub, user_id, uri, state = row
        # The row is keyed by workflow id so that a retry of this activity finds the row its first
        # attempt made. A later run under the same id (Temporal allows one once the first has closed,
        # or was terminated) must not take that row over: its list would be read from the old list's
        # last line on, into the old list (another user's, perhaps), and a finished one not at all.
        if state in FINISHED_STATES:
            raise ApplicationError(
                f"workflow id {request.workflow_id!r} already ran as user batch {ub}, which is {state}: a"
                " workflow id names one list; start this list under a new workflow id",
                type="WorkflowIdReused", non_retryable=True)
        if (user_id, uri) != (src.user_id, src.uri):
            raise ApplicationError(
                f"workflow id {request.workflow_id!r} is user batch {ub}, another list (another source or"
                f" user), still {state}: start this list under a new workflow id",
                type="WorkflowIdReused", non_retryable=True)
        return int(ub)

    @activity.defn
    @heartbeats
    async def prepare_user_batch(self, user_batch_id: int) -> Progress:
        """Mark in-batch duplicates, register addresses, reuse fresh results, enqueue the rest;
        then wake the lanes' schedulers."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "select rows_total, state, (select reltuples from pg_class where oid = 'items'::regclass)"
                " from user_batches where id = %s", (user_batch_id,))).fetchone()
            if (row is not None and row[0] >= ANALYZE_ABOVE_ROWS and row[1] in STARTING
                    and row[2] < row[0]):
                # Freshly COPYed rows have no statistics until autovacuum gets to them. While the
                # statistics describe a table smaller than this list (none at all: -1), the
                # planner's guesses chose nested loops that took minutes on a 100k-row list.
                # Beyond that a new list's id is estimated at about the mean list size and
                # autovacuum keeps them current: analyzing before every prepare cost 14 s of
                # Postgres time per 2M addresses (20 lists: 74.7, 78.9, 76.1 s end to end
                # without it, 78.1 s with it, same hour).
                # Outside the transaction: ANALYZE's lock would otherwise serialize all prepares.
                await conn.execute("analyze items")
        for attempt in range(1, PREPARE_ATTEMPTS + 1):
            try:
                lanes = await self._prepare(user_batch_id)
                break
            except psycopg.errors.UniqueViolation:
                if attempt == PREPARE_ATTEMPTS:
                    raise
                activity.logger.info("user batch %s: a concurrent prepare added the same addresses; again",
                                     user_batch_id)
        # The lanes' schedulers hear of the new work from here, not from one more activity.
        if self.client is not None:  # None: prepared outside a worker (the packing tests)
            await asyncio.gather(*(self.nudge_scheduler(lane) for lane in lanes))
        return await self.read_progress(user_batch_id)

    async def _prepare(self, user_batch_id: int) -> list[str]:
        """One attempt in one transaction; returns the batch's lanes."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            lanes, state, ttl = await self._lanes_and_state(cur, user_batch_id)
            if state in STARTING:
                # Sorts of a 100k-row list spill to disk at the default 4 MB.
                await cur.execute("set local work_mem = '64MB'")
                p = {"ub": user_batch_id}
                # One pass over the list: its distinct addresses, the first line of each, and
                # how often each occurs (duplicates, the new addresses and the queue all follow).
                await cur.execute(
                    """
                    create temp table ub_emails on commit drop as
                    select email, min(row_no) as first, count(*) as n
                    from items where user_batch_id = %(ub)s and state = 'pending' group by email
                    """,
                    p,
                )
                await cur.execute("analyze ub_emails")
                await cur.execute("select exists (select 1 from ub_emails where n > 1)")
                if (await cur.fetchone())[0]:
                    # A hash join over the list: a loop would scan the list once per repeated address.
                    await cur.execute("set local enable_nestloop = off")
                    await cur.execute(
                        """
                        update items i set state = 'duplicate', reason = 'duplicate of line ' || e.first
                        from ub_emails e
                        where e.n > 1 and i.user_batch_id = %(ub)s and i.state = 'pending'
                          and i.email = e.email and i.row_no <> e.first
                        """,
                        p,
                    )
                    await cur.execute("set local enable_nestloop = on")
                async with index_probes(cur):
                    # Not ON CONFLICT: its speculative insertion measured ~30% slower for new rows.
                    # Two prepares adding the same new address: one gets a unique violation and
                    # runs again (below). The new ids come back from the insert itself.
                    await cur.execute(
                        """
                        create temp table ub_new on commit drop as
                        with n as (
                            insert into addresses (email)
                            select email from ub_emails e
                            where not exists (select 1 from addresses a where a.email = e.email)
                            order by email  -- in index order: measured 2x faster than hash order
                            returning id, email)
                        select * from n
                        """,
                        p,
                    )
                await cur.execute("analyze ub_new")
                for lane in lanes:
                    await cur.execute(
                        "insert into user_batch_lanes (user_batch_id, lane) values (%s, %s) on conflict do nothing",
                        (user_batch_id, lane),
                    )
                    if lane == CATCHALL:  # only addresses with an accept-all result: the general path
                        await enqueue_lane(cur, user_batch_id, lane, ttl)
                        continue
                    # New addresses have no result to reuse: only the known ones are looked up.
                    await cur.execute("drop table if exists ub_addr")
                    await cur.execute(
                        f"""
                        create temp table ub_addr on commit drop as
                        select n.id as address_id, e.first as row_no, false as fresh, true as new
                        from ub_new n join ub_emails e on e.email = n.email
                        union all
                        select a.id, e.first,
                               exists (select 1 from results r where r.address_id = a.id and r.lane = %(lane)s
                                       and {_FRESH}),
                               false
                        from ub_emails e join addresses a on a.email = e.email
                        where not exists (select 1 from ub_new n where n.email = e.email)
                        """,
                        {**p, "lane": lane, **ttl},
                    )
                    await enqueue_listed(cur, user_batch_id, lane, ttl, first_time=True)
                await cur.execute(
                    """
                    update user_batches b set state = 'queued', rows_total = c.n, invalid = c.invalid,
                        duplicates = c.duplicates
                    from (select count(*) as n, count(*) filter (where state = 'invalid') as invalid,
                                 count(*) filter (where state = 'duplicate') as duplicates
                          from items where user_batch_id = %(ub)s) c
                    where b.id = %(ub)s
                    """,
                    p,
                )
        return lanes

    @activity.defn
    async def read_progress(self, user_batch_id: int) -> Progress:
        """Counts of a user batch from the database (the source of truth), after settling any
        stranded waits (`settle_stranded_waits`; a no-op unless the batch's own queue is empty)."""
        requeued_lanes = []
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "select l.lane, b.max_result_age_s from user_batch_lanes l join user_batches b on b.id = l.user_batch_id"
                " where l.user_batch_id = %s and l.remaining > 0 and b.state = 'queued'",
                (user_batch_id,),
            )
            for lane, max_age_s in await cur.fetchall():
                if await settle_stranded_waits(cur, user_batch_id, lane, self.settings.freshness(max_age_s)):
                    requeued_lanes.append(lane)
        for lane in requeued_lanes:
            activity.logger.warning("user batch %s: stranded waits re-queued on lane %s", user_batch_id, lane)
            await self.nudge_scheduler(lane)
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "select state, rows_total, invalid, duplicates, user_id, priority from user_batches where id = %s",
                (user_batch_id,),
            )
            ub = await cur.fetchone()
            if ub is None:
                raise ApplicationError(f"user batch {user_batch_id} does not exist", non_retryable=True)
            await cur.execute(
                "select lane, unique_addresses, cached, shared, enqueued, remaining, failed"
                " from user_batch_lanes where user_batch_id = %s order by lane",
                (user_batch_id,),
            )
            lanes = [LaneProgress(**row) for row in await cur.fetchall()]
            # Open batches are few (slots per lane): the partial index, then the parts' primary key.
            await cur.execute(
                "select count(*) as n from bouncer_batches b where b.state in ('packed', 'submitting', 'submitted')"
                " and exists (select 1 from bouncer_batch_parts p where p.bouncer_batch_id = b.id"
                " and p.user_batch_id = %s)",
                (user_batch_id,),
            )
            in_flight = (await cur.fetchone())["n"]
        return Progress(
            user_batch_id=user_batch_id,
            state=ub["state"],
            rows=ub["rows_total"],
            invalid=ub["invalid"],
            duplicates=ub["duplicates"],
            lanes=lanes,
            user_id=ub["user_id"],
            priority=PRIORITIES[ub["priority"]],
            in_flight_batches=int(in_flight),
        )

    @activity.defn
    @heartbeats
    async def advance_user_batch(self, user_batch_id: int) -> Progress:
        """`read_progress`, and once every address is settled, `finalize_user_batch` in the same
        activity: a workflow task and an activity round trip less at the end of every list."""
        progress = await self.read_progress(user_batch_id)
        # `completed` already: a store finalized this small list (`BouncerApiActivities._finalize_small`).
        if (progress.state == "queued" and progress.remaining == 0) or progress.state == "completed":
            summary = await self.finalize_user_batch(user_batch_id)
            progress = dataclasses.replace(progress, state=summary.state, summary=summary)
        return progress

    @activity.defn
    @heartbeats
    async def set_paused(self, request: PauseRequest) -> Progress:
        """Pause: withdraw unclaimed addresses (in-flight ones finish). Resume: enqueue again."""
        ub = request.user_batch_id
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            lanes, state, ttl = await self._lanes_and_state(cur, ub)
            if request.paused and state == "queued":
                await cur.execute("update user_batches set state = 'paused' where id = %s", (ub,))
                for lane in lanes:
                    await release_unclaimed(cur, ub, lane)
                    # Only the in-flight addresses are still outstanding until resume; the rest
                    # are counted as withdrawn (not settled).
                    await cur.execute(
                        "update user_batch_lanes set remaining = c.n, withdrawn = greatest(remaining - c.n, 0)"
                        " from (select count(*) as n from queue where user_batch_id = %(ub)s and lane = %(lane)s) c"
                        " where user_batch_id = %(ub)s and lane = %(lane)s",
                        {"ub": ub, "lane": lane},
                    )
            elif not request.paused and state == "paused":
                await cur.execute("update user_batches set state = 'queued' where id = %s", (ub,))
                await cur.execute(_WAIT_FOR_STORES, {"ub": ub})
                for lane in lanes:
                    await enqueue_lane(cur, ub, lane, ttl)
        return await self.read_progress(ub)

    @activity.defn
    @heartbeats
    async def cancel_user_batch(self, user_batch_id: int) -> Summary:
        """Withdraw queued addresses, mark unresolved rows cancelled, end the batch `cancelled`."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            lanes, state, _ttl = await self._lanes_and_state(cur, user_batch_id)
            if state not in FINISHED_STATES:
                for lane in lanes:
                    await release_unclaimed(cur, user_batch_id, lane)
                await cur.execute(
                    """
                    update items i set state = 'cancelled', reason = 'user batch cancelled'
                    where i.user_batch_id = %(ub)s and i.state = 'pending'
                      and not exists (select 1 from addresses a join results r on r.address_id = a.id
                                      where a.email = i.email and r.lane = %(lane)s)
                    """,
                    {"ub": user_batch_id, "lane": lanes[0]},
                )
                await cur.execute(
                    "update user_batches set state = 'cancelled', finished_at = now() where id = %s",
                    (user_batch_id,),
                )
                summary = await self._summarize(user_batch_id, cur=cur)
                await cur.execute("update user_batches set summary = %s where id = %s",
                                  (_stored(summary), user_batch_id))
                await announce(cur, "user_batch.cancelled", summary)
                return summary
        return await self._summarize(user_batch_id)

    @activity.defn
    @heartbeats
    async def finalize_user_batch(self, user_batch_id: int) -> Summary:
        """Rows whose address was dead-lettered become `failed`; the batch ends `completed`."""
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            lanes, state, _ttl = await self._lanes_and_state(cur, user_batch_id)
            if state not in FINISHED_STATES:
                summary = await self._summarize(user_batch_id, cur=cur, state="completed")
                if summary.by_state.get("pending"):  # rows left without a result: dead-lettered
                    await self._fail_unresolved(cur, user_batch_id, lanes[0])
                    summary = await self._summarize(user_batch_id, cur=cur, state="completed")
                await cur.execute(
                    "update user_batches set state = 'completed', finished_at = now(), summary = %s where id = %s",
                    (_stored(summary), user_batch_id),
                )
                await announce(cur, "user_batch.completed", summary)
                return summary
        return await self._summarize(user_batch_id)

    @staticmethod
    async def _fail_unresolved(cur: psycopg.AsyncCursor, user_batch_id: int, lane: str) -> None:
        """Pending rows whose address has no result become `failed`, with the dead letter's reason."""
        await cur.execute(
            """
            update items i set state = 'failed',
                reason = coalesce((select d.reason from dead_letters d where d.address_id = a.id
                                   and d.lane = %(lane)s order by d.id desc limit 1), 'no result')
            from addresses a
            where i.user_batch_id = %(ub)s and i.state = 'pending' and a.email = i.email
              and not exists (select 1 from results r where r.address_id = a.id and r.lane = %(lane)s)
            """,
            {"ub": user_batch_id, "lane": lane},
        )

    async def _summarize(
        self, user_batch_id: int, cur: psycopg.AsyncCursor | None = None, state: str | None = None
    ) -> Summary:
        async def run(c: psycopg.AsyncCursor) -> Summary:
            await c.execute("select lanes, state, rows_total, (select max(id) from addresses) from user_batches"
                            " where id = %s", (user_batch_id,))
            lanes, current, list_rows, addresses = await c.fetchone()
            # `item_outcomes`, without its catchall join when the batch has no catchall lane (the
            # view joins and then filters: 100k-row list against 2M results, 600 ms vs 850 ms;
            # moving the lane test into a lateral subquery of the view measured no faster).
            catchall = CATCHALL in lanes
            # Left alone, the planner hashes the list and reads every address ever registered: a
            # 100k-row list against 2M addresses took 0.75 s (in three processes), index probes
            # 0.40 s. Reading the table wins once the list is more than about a seventh of it.
            big_table = (addresses or 0) >= 8 * list_rows
            async with index_probes(c) if big_table else contextlib.nullcontext():
                await c.execute(
                    f"""
                    select case when i.state = 'pending' and r.status is not null then 'verified' else i.state end,
                           r.status, {"c.status" if catchall else "null"}, count(*)
                    from items i
                    left join addresses a on a.email = i.email and i.state in ('pending', 'duplicate', 'cancelled')
                    left join results r on r.address_id = a.id and r.lane = %(lane)s
                    {"left join results c on c.address_id = a.id and c.lane = %(catchall)s" if catchall else ""}
                    where i.user_batch_id = %(ub)s
                    group by 1, 2, 3
                    """,
                    {"ub": user_batch_id, "lane": lanes[0], "catchall": CATCHALL},
                )
                counts = await c.fetchall()
            by_state: dict[str, int] = {}
            by_status: dict[str, int] = {}
            by_catchall: dict[str, int] = {}
            rows = 0
            for st, status, catchall_status, n in counts:
                rows += n
                by_state[st] = by_state.get(st, 0) + n
                if status is not None:
                    by_status[status] = by_status.get(status, 0) + n
                if catchall_status is not None:
                    by_catchall[catchall_status] = by_catchall.get(catchall_status, 0) + n
            return Summary(user_batch_id, state or current, rows, by_state, by_status, by_catchall)

        if cur is not None:
            return await run(cur)
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as c:  # for `set local`
            return await run(c)

    @activity.defn
    async def nudge_scheduler(self, lane: str) -> None:
        """Signal-with-start the lane's scheduler: there is new work."""
        from workflows.scheduler import GreedySchedulerWorkflow

        await self.client.start_workflow(
            GreedySchedulerWorkflow.run,
            scheduler_input(self.settings, lane),
            id=scheduler_id(lane),
            task_queue=self.settings.task_queue,
            start_signal="work_available",
            static_summary=scheduler_summary(lane),
        )

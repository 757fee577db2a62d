"""Dead letters: list, retry through the normal path, purge (`starter.py dlq ...`, and a user
batch's own through the HTTP API).

A dead letter is one address of one lane that got no result: refused by the API (400/401/403,
with the reason) or still without a result after MAX_ADDRESS_ATTEMPTS sends. The user batches
that named it ended those rows `failed` (or will, at finalize).

Retry puts the address back on a queue with a fresh attempt budget, exactly as prepare would:
one queue row per (lane, address), owned by one affected user batch, the others `waits`. Its
rows go back to `pending` and the user batch's `remaining` grows again, so the batch waits for
them. A user batch that has the address in play again (it queued it itself, or waits on it)
already counts it and is left alone; a paused one counts it `withdrawn` and queues it on resume.
A user batch that had already *completed* is reopened (state `queued`, summary cleared): the
caller starts its workflow again under the same id, which finds the rows prepared, waits
for the retried addresses and finalizes a second time with a fresh summary. Cancelled user
batches are never reopened. The retried dead letters are deleted (the event `dead_letters.retried`
keeps the count); a second failure writes a new one.

Scoped to a user batch or a user (`--user-batch`, `--user`, the HTTP API), only the dead letters
that concern its rows are listed, retried or purged: written since the batch began (and before it
finished) for an address whose row they left failed. The same address dead-lettered for another
tenant is not theirs. A dead letter is one row for every batch it failed: a scoped retry or purge
keeps it while a user batch outside the scope still needs it (its owner can still see and retry it).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from db import lock_lanes
from settings import Settings
from workflows.models import UserBatchInput, scheduler_id

_REOPENABLE = ("queued", "paused", "completed")


@dataclass
class Selection:
    user_batch_id: int | None = None
    lane: str | None = None
    user: str | None = None  # only addresses of this user's batches (the --user scope)

    @property
    def params(self) -> dict:
        return {"ub": self.user_batch_id, "lane": self.lane, "user": self.user}

    @property
    def sql(self) -> str:
        """The selected dead letters (a query over `dead_letters` d, with the address's email)."""
        return _IN_SCOPE_ONLY if self.user_batch_id is not None or self.user is not None else _ALL


@dataclass
class ReopenedBatch:
    user_batch_id: int
    workflow_id: str | None
    was_completed: bool
    addresses: int


def _failed_row(dl: str) -> str:
    """SQL: the dead letter `dl` (lane, address_id, created_at) concerns user batch `b`'s row `i`.

    It was written while the batch was open for that lane (at or after its `created_at`, as
    `enqueue_lane` counts "dead-lettered since the batch began", and not after it finished) and
    the row is what it left: `failed` (the first lane), or pending (or cancelled) with the address
    neither in play again for the batch (queued or waited on) nor verified since. (A verified row
    is `pending` in `items`: `verified` is derived.) For the catchall lane, the row's deliverability verdict is also one that lane re-verifies (risky,
    accept-all) and settled for the batch (not queued or waited on again): a row still asking the
    first lane, or whose verdict is not accept-all, never had the address on the catchall lane,
    and another user's catchall dead letter of it was listed as its own. Another user's dead
    letter of the same address is none of these.
    """
    first_lane_led_here = f"""({dl}.lane = b.lanes[1] or (
                      exists (select 1 from results f where f.address_id = {dl}.address_id and f.lane = b.lanes[1]
                              and f.status = 'risky' and f.accept_all = 'yes')
                      and not exists (select 1 from queue q where q.lane = b.lanes[1]
                                      and q.address_id = {dl}.address_id and q.user_batch_id = b.id)
                      and not exists (select 1 from waits w where w.lane = b.lanes[1]
                                      and w.address_id = {dl}.address_id and w.user_batch_id = b.id)))"""
    return f"""{dl}.lane = any(b.lanes) and {dl}.created_at >= b.created_at
        and {dl}.created_at <= coalesce(b.finished_at, 'infinity')
        and case when i.state = 'failed' then {dl}.lane = b.lanes[1]
                 when i.state in ('pending', 'cancelled') then {first_lane_led_here} and not exists (
                      select 1 from results r where r.address_id = {dl}.address_id and r.lane = {dl}.lane
                      and r.verified_at >= {dl}.created_at)
                  and not exists (select 1 from queue q where q.lane = {dl}.lane and q.address_id = {dl}.address_id
                                  and q.user_batch_id = b.id)
                  and not exists (select 1 from waits w where w.lane = {dl}.lane and w.address_id = {dl}.address_id
                                  and w.user_batch_id = b.id)
                 else false end"""


# The selection's user batches (all when neither `ub` nor `user` is given), on `b`.
_IN_SCOPE = "(%(ub)s::bigint is null or b.id = %(ub)s) and (%(user)s::text is null or b.user_id = %(user)s)"


def _failed_in(dl: str, email: str, batches: str) -> str:
    """SQL: some user batch matching `batches` (on `b`) has a row the dead letter `dl` concerns."""
    # The outer reference in WHERE, not in the join's ON: only then is EXISTS planned as a join.
    return f"""exists (select 1 from user_batches b join items i on i.user_batch_id = b.id
                       where i.email = {email} and {batches} and {_failed_row(dl)})"""


# A user batch's (or a user's) dead letters are those that concern its rows: the same address
# dead-lettered for someone else is theirs (its batch id, time and reason are not this tenant's).
# The scope's test is a plain AND (not `unscoped OR exists`), so the planner joins the items once
# instead of scanning them per dead letter (1M items, 500 dead letters: 0.18 s against 95 s).
_ALL = """
    select d.id, d.lane, d.address_id, a.email, d.bouncer_batch_id, d.reason, d.attempts, d.created_at
    from dead_letters d join addresses a on a.id = d.address_id
    where (%(lane)s::text is null or d.lane = %(lane)s)
"""
_IN_SCOPE_ONLY = f"{_ALL}  and {_failed_in('d', 'a.email', _IN_SCOPE)}\n"

# A scoped purge or retry leaves a dead letter a user batch outside the scope still needs.
# (a cancelled or failed one is never retried: it needs none).
_NEEDED_ELSEWHERE = _failed_in(
    "s", "s.email", f"not ({_IN_SCOPE}) and b.state not in ('cancelled', 'failed')")  # unscoped: none


def list_dead_letters(conn: psycopg.Connection, sel: Selection, limit: int = 1000) -> list[dict]:
    """The selected dead letters, oldest first, each with the user batches whose rows it failed."""
    rows = conn.execute(
        f"""
        with s as materialized ({sel.sql} order by d.id limit %(limit)s),
             u as (select s.id, array_agg(distinct b.id order by b.id) as ids
                   from s join items i on i.email = s.email join user_batches b on b.id = i.user_batch_id
                   where (%(user)s::text is null or b.user_id = %(user)s) and {_failed_row("s")}
                   group by s.id)
        select s.*, coalesce(u.ids, '{{}}') as user_batches from s left join u on u.id = s.id order by s.id
        """,
        {**sel.params, "limit": limit},
    ).fetchall()
    cols = ("id", "lane", "address_id", "email", "bouncer_batch_id", "reason", "attempts", "created_at", "user_batches")
    return [dict(zip(cols, r)) for r in rows]


def count_dead_letters(conn: psycopg.Connection, sel: Selection) -> int:
    return int(conn.execute(f"select count(*) from ({sel.sql}) s", sel.params).fetchone()[0])


def purge_dead_letters(conn: psycopg.Connection, sel: Selection) -> int:
    """Delete the selected dead letters (their rows stay `failed`); returns how many.

    Scoped to a user batch or a user, one that a user batch outside the scope still needs stays
    for it (it is one row for everyone whose rows it failed)."""
    with conn.transaction():
        n = conn.execute(
            f"delete from dead_letters where id in (select id from ({sel.sql}) s where not {_NEEDED_ELSEWHERE})",
            sel.params,
        ).rowcount
        conn.execute(
            "insert into events (kind, subject, data) values ('dead_letters.purged', %s, %s)",
            (sel.lane or "", Jsonb({"count": n, "user_batch_id": sel.user_batch_id or 0})),
        )
    return n


def requeue_dead_letters(conn: psycopg.Connection, sel: Selection) -> tuple[int, list[ReopenedBatch], list[str]]:
    """Re-queue the selected dead letters for the user batches that need them (one transaction).

    Returns how many dead letters were retried, the user batches touched and the lanes that
    got work; the caller then runs `wake_after_retry`.
    Dead letters that no open or completed user batch needs are left alone, and so is a user
    batch that has the address in play again (queued or waited on: counted in its `remaining`).
    Every count comes from rows read after the locks and rows this transaction inserted, so a
    concurrent retry of the same dead letters finds them gone and counts nothing.
    """
    p = {**sel.params, "reopenable": list(_REOPENABLE)}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"create temp table dl_sel on commit drop as {sel.sql}", p)
        # Lock, then keep only what is still there: a retry that held the locks has deleted them.
        cur.execute("select 1 from dead_letters where id in (select id from dl_sel) order by id for update")
        cur.execute("delete from dl_sel s where not exists (select 1 from dead_letters d where d.id = s.id)")
        # Retried for the scope, but kept for a user batch outside it whose rows it failed.
        cur.execute(f"create temp table dl_kept on commit drop as select s.id, s.lane, s.address_id from dl_sel s"
                    f" where {_NEEDED_ELSEWHERE}", p)
        cur.execute(
            """
            create temp table dl_hits on commit drop as
            select distinct s.lane, s.address_id, s.email, i.user_batch_id
            from dl_sel s
            join items i on i.email = s.email and i.state in ('pending', 'failed')
            join user_batches b on b.id = i.user_batch_id
            where b.state = any(%(reopenable)s) and s.lane = any(b.lanes)
              and (%(ub)s::bigint is null or i.user_batch_id = %(ub)s)
              and (%(user)s::text is null or b.user_id = %(user)s)
            """,
            p,
        )
        # The lock finalize, pause and cancel take: their rows and counts are read after it.
        cur.execute("select 1 from user_batches where id in (select user_batch_id from dl_hits) order by id for update")
        # What each user batch counts the address as: failed only if no queue or waits row of its
        # own holds it (else it is in its `remaining`), and it ended failed (a completed batch's
        # rows say so for its first lane) or was dead-lettered since the batch began (older dead
        # letters it queued itself, as `enqueue_lane` does). An address verified meanwhile is
        # queued too: the submit skips it (fresh result) and the store settles it.
        cur.execute(
            """
            create temp table dl_need on commit drop as
            select h.lane, h.address_id, h.email, h.user_batch_id, b.state
            from dl_hits h join user_batches b on b.id = h.user_batch_id
            where b.state = any(%(reopenable)s)
              and not exists (select 1 from queue q where q.lane = h.lane and q.address_id = h.address_id
                              and q.user_batch_id = h.user_batch_id)
              and not exists (select 1 from waits w where w.lane = h.lane and w.address_id = h.address_id
                              and w.user_batch_id = h.user_batch_id)
              and case when b.state = 'completed' and h.lane = b.lanes[1]
                       then exists (select 1 from items i where i.user_batch_id = h.user_batch_id
                                    and i.email = h.email and i.state = 'failed')
                       else exists (select 1 from dead_letters d where d.lane = h.lane and d.address_id = h.address_id
                                    and d.created_at >= b.created_at) end
              -- A kept dead letter would make a paused batch's resume count the address failed again.
              and not (b.state = 'paused' and exists (select 1 from dl_kept k where k.lane = h.lane
                                                      and k.address_id = h.address_id))
            """,
            p,
        )
        # Back in play: one owner per (lane, address) unless someone already queued it; a paused
        # batch owns nothing (its queue is not packed) and queues it on resume, like its other
        # withdrawn addresses.
        cur.execute(
            """
            create temp table dl_owner on commit drop as
            select distinct on (n.lane, n.address_id) n.lane, n.address_id, n.user_batch_id
            from dl_need n
            where n.state <> 'paused'
              and not exists (select 1 from queue q where q.lane = n.lane and q.address_id = n.address_id)
            order by n.lane, n.address_id, n.user_batch_id
            """
        )
        cur.execute("create temp table dl_put (lane text, address_id bigint, user_batch_id bigint) on commit drop")
        cur.execute(lock_lanes("select distinct user_batch_id, lane from dl_owner"))  # stores number there too
        cur.execute(
            """
            with q as (
                insert into queue (user_batch_id, lane, seq, address_id, attempts)
                select o.user_batch_id, o.lane,
                       l.next_seq + row_number() over (partition by o.user_batch_id, o.lane order by o.address_id) - 1,
                       o.address_id, 0
                from dl_owner o join user_batch_lanes l on l.user_batch_id = o.user_batch_id and l.lane = o.lane
                on conflict (lane, address_id) do nothing  -- queued meanwhile: waited on below
                returning lane, address_id, user_batch_id)
            insert into dl_put select * from q
            """
        )
        cur.execute(
            """
            update user_batch_lanes l set next_seq = l.next_seq + c.n, holes = l.holes or c.n > c.put
            from (select o.user_batch_id, o.lane, count(*) as n,
                         count(*) filter (where exists (select 1 from dl_put t where t.lane = o.lane
                                          and t.address_id = o.address_id and t.user_batch_id = o.user_batch_id)) as put
                  from dl_owner o group by 1, 2) c
            where l.user_batch_id = c.user_batch_id and l.lane = c.lane
            """
        )
        cur.execute(
            """
            with w as (
                insert into waits (lane, address_id, user_batch_id)
                select n.lane, n.address_id, n.user_batch_id from dl_need n
                where n.state <> 'paused'
                  and not exists (select 1 from queue q where q.lane = n.lane and q.address_id = n.address_id
                                  and q.user_batch_id = n.user_batch_id)
                on conflict do nothing
                returning lane, address_id, user_batch_id)
            insert into dl_put select * from w
            """
        )
        # No longer failed: back in play, or (paused) withdrawn until resume queues it.
        cur.execute(
            """
            create temp table dl_done on commit drop as
            select n.lane, n.address_id, n.email, n.user_batch_id, p.user_batch_id is not null as put
            from dl_need n
            left join dl_put p on p.lane = n.lane and p.address_id = n.address_id and p.user_batch_id = n.user_batch_id
            where p.user_batch_id is not null or n.state = 'paused'
            """
        )
        cur.execute(
            """
            update items i set state = 'pending', reason = null
            from dl_done d where i.user_batch_id = d.user_batch_id and i.email = d.email and i.state = 'failed'
            """
        )
        cur.execute(
            """
            update user_batch_lanes l set remaining = l.remaining + c.put, withdrawn = l.withdrawn + c.withdrawn,
                                          failed = greatest(l.failed - c.n, 0)
            from (select user_batch_id, lane, count(*) as n, count(*) filter (where put) as put,
                         count(*) filter (where not put) as withdrawn
                  from dl_done group by 1, 2) c
            where l.user_batch_id = c.user_batch_id and l.lane = c.lane
            """
        )
        cur.execute(
            """
            select b.id, b.workflow_id, b.state = 'completed', c.n
            from user_batches b join (select user_batch_id, count(*) as n from dl_done group by 1) c
                 on c.user_batch_id = b.id
            order by b.id
            """
        )
        touched = [ReopenedBatch(int(i), w, bool(done), int(n)) for i, w, done, n in cur.fetchall()]
        cur.execute(
            "update user_batches set state = 'queued', finished_at = null, summary = null"
            " where id in (select user_batch_id from dl_done) and state = 'completed'"
        )
        cur.execute("select coalesce(array_agg(distinct lane order by lane), '{}') from dl_put")
        lanes = list(cur.fetchone()[0])
        cur.execute(
            "select count(*) from dl_sel s"
            " where exists (select 1 from dl_done t where t.lane = s.lane and t.address_id = s.address_id)"
        )
        retried = int(cur.fetchone()[0])
        cur.execute(
            "delete from dead_letters d using dl_sel s where d.id = s.id"
            " and exists (select 1 from dl_done t where t.lane = s.lane and t.address_id = s.address_id)"
            " and not exists (select 1 from dl_kept k where k.id = s.id)"
        )
        cur.execute(
            "insert into events (kind, subject, data) values ('dead_letters.retried', %s, %s)",
            (sel.lane or "", Jsonb({"count": retried, "user_batches": [t.user_batch_id for t in touched]})),
        )
    return retried, touched, lanes


# How long a reopened list's last run may take to close before a new run replaces it, seconds.
REOPEN_WAIT_S = 10.0


async def wake_after_retry(client: Client, settings: Settings, touched: list[ReopenedBatch], lanes: list[str]) -> None:
    """After `requeue_dead_letters`: start each reopened user batch's workflow again under its id
    (its last run may still be returning: after REOPEN_WAIT_S the new run replaces it), tell the
    open ones, and wake the lanes' schedulers."""
    from activities.user_batches import scheduler_input
    from workflows.scheduler import GreedySchedulerWorkflow
    from workflows.user_batch import UserBatchWorkflow

    for t in touched:
        if t.workflow_id is None:
            continue
        if not t.was_completed:
            await client.get_workflow_handle(t.workflow_id).signal("progressed")
            continue
        start = functools.partial(client.start_workflow, UserBatchWorkflow.run, UserBatchInput(t.user_batch_id),
                                  id=t.workflow_id, task_queue=settings.task_queue)
        deadline = asyncio.get_running_loop().time() + REOPEN_WAIT_S
        while True:
            try:
                await start()
                break
            except WorkflowAlreadyStartedError:
                if asyncio.get_running_loop().time() >= deadline:
                    # Its last run is still open (no worker finished it): it holds the old summary,
                    # and the list, now queued again, would wait for a workflow forever. The new run
                    # replaces it (prepare finds the rows prepared).
                    await start(id_conflict_policy=WorkflowIDConflictPolicy.TERMINATE_EXISTING)
                    break
                await asyncio.sleep(0.2)
    for lane in lanes:
        await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(settings, lane), id=scheduler_id(lane),
            task_queue=settings.task_queue, start_signal="work_available",
        )

"""Dead letters: list, retry through the normal path, purge (`starter.py dlq ...`, and a user
batch's own through the HTTP API).

A dead letter is one address of one lane that got no result: refused by the API (400/401/403,
with the reason) or still without a result after MAX_ADDRESS_ATTEMPTS sends. The user batches
that named it ended those rows `failed` (or will, at finalize).

Retry puts the address back on a queue with a fresh attempt budget, exactly as prepare would:
one queue row per (lane, address), owned by one affected user batch, the others `waits`. Its
rows go back to `pending` and the user batch's `remaining` grows again, so the batch waits for
them. A user batch that had already *completed* is reopened (state `queued`, summary cleared):
the caller starts its workflow again under the same id, which finds the rows prepared, waits
for the retried addresses and finalizes a second time with a fresh summary. Cancelled user
batches are never reopened. The retried dead letters are deleted (the event `dead_letters.retried`
keeps the count); a second failure writes a new one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb
from temporalio.client import Client
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


@dataclass
class ReopenedBatch:
    user_batch_id: int
    workflow_id: str | None
    was_completed: bool
    addresses: int


_SELECT = """
    select d.id, d.lane, d.address_id, a.email, d.bouncer_batch_id, d.reason, d.attempts, d.created_at
    from dead_letters d join addresses a on a.id = d.address_id
    where (%(lane)s::text is null or d.lane = %(lane)s)
      and (%(ub)s::bigint is null or exists (
           select 1 from items i where i.user_batch_id = %(ub)s and i.email = a.email))
      and (%(user)s::text is null or exists (
           select 1 from items i join user_batches b on b.id = i.user_batch_id
           where b.user_id = %(user)s and i.email = a.email))
"""


def list_dead_letters(conn: psycopg.Connection, sel: Selection, limit: int = 1000) -> list[dict]:
    """The selected dead letters, oldest first, each with the user batches whose rows it failed."""
    rows = conn.execute(
        f"""
        select s.*, coalesce((select array_agg(distinct i.user_batch_id order by i.user_batch_id)
                              from items i join user_batches b on b.id = i.user_batch_id
                              where i.email = s.email and i.state in ('pending', 'failed')
                                and (%(user)s::text is null or b.user_id = %(user)s)), '{{}}') as user_batches
        from ({_SELECT} order by d.id limit %(limit)s) s
        """,
        {**sel.params, "limit": limit},
    ).fetchall()
    cols = ("id", "lane", "address_id", "email", "bouncer_batch_id", "reason", "attempts", "created_at", "user_batches")
    return [dict(zip(cols, r)) for r in rows]


def count_dead_letters(conn: psycopg.Connection, sel: Selection) -> int:
    return int(conn.execute(f"select count(*) from ({_SELECT}) s", sel.params).fetchone()[0])


def purge_dead_letters(conn: psycopg.Connection, sel: Selection) -> int:
    """Delete the selected dead letters (their rows stay `failed`); returns how many."""
    with conn.transaction():
        n = conn.execute(f"delete from dead_letters where id in (select id from ({_SELECT}) s)", sel.params).rowcount
        conn.execute(
            "insert into events (kind, subject, data) values ('dead_letters.purged', %s, %s)",
            (sel.lane or "", Jsonb({"count": n, "user_batch_id": sel.user_batch_id or 0})),
        )
    return n


def requeue_dead_letters(conn: psycopg.Connection, sel: Selection) -> tuple[int, list[ReopenedBatch], list[str]]:
    """Re-queue the selected dead letters for the user batches that need them (one transaction).

    Returns how many dead letters were retried, the user batches touched and the lanes they
    went back to; the caller then runs `wake_after_retry`. Dead letters that no open or
    completed user batch needs are left alone.
    """
    p = sel.params
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"create temp table dl_sel on commit drop as {_SELECT}", p)
        # Which user batches need each address again: rows still failed (or pending) on it.
        cur.execute(
            """
            create temp table dl_hits on commit drop as
            select distinct s.id, s.lane, s.address_id, s.email, i.user_batch_id
            from dl_sel s
            join items i on i.email = s.email and i.state in ('pending', 'failed')
            join user_batches b on b.id = i.user_batch_id
            where b.state = any(%(reopenable)s) and s.lane = any(b.lanes)
              and (%(ub)s::bigint is null or i.user_batch_id = %(ub)s)
              and (%(user)s::text is null or b.user_id = %(user)s)
            """,
            {**p, "reopenable": list(_REOPENABLE)},
        )
        cur.execute("select id from dead_letters where id in (select id from dl_hits) for update")
        # One owner per (lane, address) unless someone already queued it again.
        cur.execute(
            """
            create temp table dl_owner on commit drop as
            select distinct on (h.lane, h.address_id) h.lane, h.address_id, h.user_batch_id
            from dl_hits h
            where not exists (select 1 from queue q where q.lane = h.lane and q.address_id = h.address_id)
            order by h.lane, h.address_id, h.user_batch_id
            """
        )
        cur.execute(lock_lanes("select distinct user_batch_id, lane from dl_owner"))  # stores number there too
        cur.execute(
            """
            insert into queue (user_batch_id, lane, seq, address_id, attempts)
            select o.user_batch_id, o.lane,
                   l.next_seq + row_number() over (partition by o.user_batch_id, o.lane order by o.address_id) - 1,
                   o.address_id, 0
            from dl_owner o join user_batch_lanes l on l.user_batch_id = o.user_batch_id and l.lane = o.lane
            """
        )
        cur.execute(
            """
            update user_batch_lanes l set next_seq = l.next_seq + c.n
            from (select user_batch_id, lane, count(*) as n from dl_owner group by 1, 2) c
            where l.user_batch_id = c.user_batch_id and l.lane = c.lane
            """
        )
        cur.execute(
            """
            insert into waits (lane, address_id, user_batch_id)
            select h.lane, h.address_id, h.user_batch_id from dl_hits h
            where not exists (select 1 from queue q where q.lane = h.lane and q.address_id = h.address_id
                              and q.user_batch_id = h.user_batch_id)
            on conflict do nothing
            """
        )
        cur.execute(
            """
            update items i set state = 'pending', reason = null
            from dl_hits h where i.user_batch_id = h.user_batch_id and i.email = h.email and i.state = 'failed'
            """
        )
        cur.execute(
            """
            update user_batch_lanes l set remaining = l.remaining + c.n, failed = greatest(l.failed - c.n, 0)
            from (select user_batch_id, lane, count(distinct address_id) as n from dl_hits group by 1, 2) c
            where l.user_batch_id = c.user_batch_id and l.lane = c.lane
            """
        )
        cur.execute(
            """
            select b.id, b.workflow_id, b.state = 'completed', c.n
            from user_batches b join (select user_batch_id, count(distinct (lane, address_id)) as n
                                      from dl_hits group by 1) c on c.user_batch_id = b.id
            order by b.id
            """
        )
        touched = [ReopenedBatch(int(i), w, bool(done), int(n)) for i, w, done, n in cur.fetchall()]
        cur.execute(
            "update user_batches set state = 'queued', finished_at = null, summary = null"
            " where id in (select user_batch_id from dl_hits) and state = 'completed'"
        )
        cur.execute("select coalesce(array_agg(distinct lane order by lane), '{}') from dl_hits")
        lanes = list(cur.fetchone()[0])
        cur.execute("delete from dead_letters where id in (select id from dl_hits)")
        retried = cur.rowcount
        cur.execute(
            "insert into events (kind, subject, data) values ('dead_letters.retried', %s, %s)",
            (sel.lane or "", Jsonb({"count": retried, "user_batches": [t.user_batch_id for t in touched]})),
        )
    return retried, touched, lanes


async def wake_after_retry(client: Client, settings: Settings, touched: list[ReopenedBatch], lanes: list[str]) -> None:
    """After `requeue_dead_letters`: start each reopened user batch's workflow again under its id
    (its last run may still be returning), tell the open ones, and wake the lanes' schedulers."""
    from activities.user_batches import scheduler_input
    from workflows.scheduler import GreedySchedulerWorkflow
    from workflows.user_batch import UserBatchWorkflow

    for t in touched:
        if t.workflow_id is None:
            continue
        if not t.was_completed:
            await client.get_workflow_handle(t.workflow_id).signal("progressed")
            continue
        for _ in range(50):
            try:
                await client.start_workflow(UserBatchWorkflow.run, UserBatchInput(t.user_batch_id), id=t.workflow_id,
                                            task_queue=settings.task_queue)
                break
            except WorkflowAlreadyStartedError:
                await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"user batch {t.user_batch_id} was reopened but its workflow {t.workflow_id} "
                               "is still running; retry in a moment")
    for lane in lanes:
        await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(settings, lane), id=scheduler_id(lane),
            task_queue=settings.task_queue, start_signal="work_available",
        )

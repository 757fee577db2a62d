"""Cleanup: delete what is past retention, one bounded chunk per activity call (short transactions).

What is safe to delete (the rule, also in the README):
- A user batch's items, lanes and row: only when it ended (completed, cancelled, failed) before
  the cutoff, it is not the latest run of a recurring list (the next run copies its items), and
  no Bouncer batch holding its addresses is still open (a cancelled batch's in-flight addresses
  are stored when they come back). A running or paused batch is never touched.
- A result: only when verified before the cutoff, before the cache TTL (a fresh result is
  reused instead of paying again), not while its address is queued (its store may be rewriting
  it), and before every retained user batch's creation minus the TTL.
  A retained batch only shows results verified during its run or reused fresh at its start,
  so none of its rows loses its verdict. Except a paused batch created before the cutoff: it does
  not hold results back past the retention, or one list paused and never resumed would stop
  results cleanup for everyone. Its rows verified before the cutoff lose their verdict while it
  stays paused; a resume queues them again (no longer fresh, they would be anyway). A running or
  finished batch holds them however old (a finished one may be reopened by `dlq retry`, whose
  finalize fails the rows left without a result).
- Events (with their deliveries): by age, once fanned out to subscribers and none of their
  deliveries is still pending. Finished Bouncer batches (with their parts) and pack timings: by age.
Completed workflow histories are not ours to delete: the namespace's retention period does it.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.models import ChunkOutcome, CleanupChunk, ResultsCutoffRequest

FINISHED = "('completed', 'cancelled', 'failed')"

# The oldest user batch whose items may go (the finished-at index serves the order).
_DOOMED_BATCH = f"""
    select b.id from user_batches b
    where b.finished_at < %(cutoff)s and b.state in {FINISHED}
      and not exists (select 1 from recurring_lists r where r.latest_user_batch_id = b.id)
      and not exists (select 1 from bouncer_batch_parts p join bouncer_batches bb on bb.id = p.bouncer_batch_id
                      where p.user_batch_id = b.id and bb.state in ('packed', 'submitting', 'submitted'))
    order by b.finished_at, b.id limit 1
"""

_BY_AGE = {
    # An event goes with its deliveries once fanned out and none of them is still pending.
    "events": """
        with gone as (
            delete from events where id in (
                select e.id from events e where e.created_at < %(cutoff)s and e.fanned_out
                  and not exists (select 1 from deliveries d where d.event_id = e.id and d.state = 'pending')
                order by e.created_at limit %(n)s)
            returning id),
        deliveries_gone as (delete from deliveries d using gone where d.event_id = gone.id returning 1)
        select (select count(*) from gone), (select count(*) from deliveries_gone)
    """,
    "pack_runs": "delete from pack_runs where id in (select id from pack_runs where created_at < %(cutoff)s"
                 " order by id limit %(n)s)",
    # Never the result of an address in flight (a queue row): its store may be rewriting it (an INSERT
    # that skipped the old row, then an UPDATE) in the transaction that resolves that queue row, and
    # deleting it would lose the result just paid for. The outer `verified_at` is checked again on
    # the row version a waiting delete finally gets (a rewrite committed meanwhile is fresh).
    "results": "delete from results where (address_id, lane) in (select r.address_id, r.lane from results r"
               " where r.verified_at < %(cutoff)s and not exists (select 1 from queue q where q.lane = r.lane"
               " and q.address_id = r.address_id) order by r.verified_at limit %(n)s) and verified_at < %(cutoff)s",
}


class CleanupActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @activity.defn
    async def results_cutoff(self, request: ResultsCutoffRequest) -> str:
        """The instant before which results may go: the earliest of the cutoff, now minus the
        cache TTL, and the oldest retained user batch's creation minus the TTL (see the module doc),
        where a paused batch created before the cutoff does not count: one paused and never resumed
        would otherwise hold every result back, for everyone, for as long as it is kept."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                """
                select least(%(cutoff)s::timestamptz, now() - make_interval(secs => %(ttl)s),
                             coalesce((select min(created_at) from user_batches
                                       where created_at >= %(cutoff)s or state <> 'paused'),
                                      'infinity')
                             - make_interval(secs => %(ttl)s))
                """,
                {"cutoff": datetime.fromisoformat(request.cutoff), "ttl": request.result_ttl_days * 86400.0},
            )
            (at,) = await cur.fetchone()
        return at.isoformat()

    @activity.defn
    async def delete_chunk(self, chunk: CleanupChunk) -> ChunkOutcome:
        """Delete at most `chunk_rows` rows of `chunk.kind`, in one short transaction.

        Idempotent: it deletes by a condition, not by a remembered list, so a retry deletes
        what is still there. Heartbeats so a stuck statement is noticed.
        """
        activity.heartbeat(chunk.kind)
        p = {"cutoff": datetime.fromisoformat(chunk.cutoff), "n": chunk.chunk_rows}
        if chunk.kind == "items":
            return await self._user_batch_chunk(p)
        if chunk.kind == "bouncer_batches":
            return await self._bouncer_batch_chunk(p)
        if chunk.kind not in _BY_AGE:
            raise ApplicationError(f"unknown cleanup kind {chunk.kind!r}", non_retryable=True)
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(_BY_AGE[chunk.kind], p)
            deleted = (await cur.fetchone())[0] if chunk.kind == "events" else cur.rowcount
        return ChunkOutcome(deleted=deleted, more=deleted == chunk.chunk_rows)

    async def _user_batch_chunk(self, p: dict) -> ChunkOutcome:
        """Items of the oldest finished user batch past the cutoff; with its last items, the batch."""
        async with self.pool.connection() as conn, conn.transaction():
            row = await (await conn.execute(_DOOMED_BATCH, p)).fetchone()
            if row is None:
                return ChunkOutcome(deleted=0, more=False)
            ub = row[0]
            # Lock the row, and look again once it is ours: a `dlq retry` that reopened the batch
            # (back to queued) while this transaction waited for the lock has made it a running
            # batch. (It cannot become a recurring list's latest again, nor gain an open Bouncer batch
            # while finished.) The next chunk chooses again.
            locked = await (await conn.execute(
                f"select 1 from user_batches where id = %(ub)s and state in {FINISHED} and finished_at < %(cutoff)s"
                " for update",
                {**p, "ub": ub},
            )).fetchone()
            if locked is None:
                return ChunkOutcome(deleted=0, more=True)
            deleted = (await conn.execute(
                "delete from items where user_batch_id = %(ub)s and row_no in"
                " (select row_no from items where user_batch_id = %(ub)s order by row_no limit %(n)s)",
                {**p, "ub": ub},
            )).rowcount
            if deleted == p["n"]:
                return ChunkOutcome(deleted=deleted, more=True)
            for table in ("user_batch_lanes", "queue", "waits"):
                await conn.execute(f"delete from {table} where user_batch_id = %s", (ub,))
            await conn.execute("delete from user_batches where id = %s", (ub,))
        return ChunkOutcome(deleted=deleted, user_batches=1, more=True)

    async def _bouncer_batch_chunk(self, p: dict) -> ChunkOutcome:
        """Finished Bouncer batches (stored or failed) older than the cutoff, with their parts."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "delete from bouncer_batches where id in (select id from bouncer_batches"
                " where state in ('stored', 'failed') and created_at < %(cutoff)s order by id limit %(n)s)"
                " returning id",
                p,
            )
            ids = [r[0] for r in await cur.fetchall()]
            if ids:
                await conn.execute("delete from bouncer_batch_parts where bouncer_batch_id = any(%s)", (ids,))
        return ChunkOutcome(deleted=len(ids), more=len(ids) == p["n"])

"""The packer: claims ranges of user batches' queues into Bouncer batches.

Only the lane's scheduler calls it (single writer per lane), so no cross-process locking is
needed beyond the transaction. A pack claims ranges, not rows: it moves each user batch's
cursor and records (user batch, seq range) parts, so its cost does not grow with the backlog.

Order: priority first; then fair share (the user with the fewest addresses dispatched from
their unfinished batches goes first, so a 100-address batch never waits behind a 2M import);
then age. Each user's turn takes all their queued work that fits, which keeps the seed's
example exact: John 5k + Alice 2k + Bob 3k, then Bob 3k.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.client import Client
from temporalio.common import Priority
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.dispatch_gate import DISPATCH
from activities.heartbeat import heartbeats
from db import SLOTS_CHANNEL, lock_lanes
from workflows.models import (
    EXPRESS_PRIORITY,
    LaneHold,
    PackedBatch,
    PackRequest,
    PackResult,
    StandbyRefresh,
    bouncer_batch_summary,
    bouncer_batch_workflow_id,
)

BOUNCER_BATCH_WORKFLOW = "BouncerBatchWorkflow"  # by name: workflows import this module


class PackingActivities:
    def __init__(self, pool: AsyncConnectionPool, max_in_flight_per_user: int = 0, client: Client | None = None) -> None:
        self.pool = pool
        self.max_in_flight_per_user = max_in_flight_per_user  # 0: no cap unless `user_limits` sets one
        self.client = client  # starts the batches' workflows (`PackRequest.start`)

    @activity.defn
    @heartbeats
    async def pack_batches(self, request: PackRequest) -> PackResult:
        """Form up to `slots` regular and `express_slots` express Bouncer batches; with
        `request.start`, start their workflows once they are committed.

        Idempotent by `pack_key`: a retry returns (and starts) the batches the first attempt created.
        """
        with DISPATCH.dispatching():
            result = await self._pack(request)
            await self._start_workflows(request, result.batches)
        return result

    async def _start_workflows(self, request: PackRequest, batches: list[PackedBatch]) -> None:
        """One Bouncer batch workflow per batch, eagerly on this worker when the server allows.
        A retry finds a running one started and moves on; one that has ended runs again, finds its
        batch submitted (or stored) and ends, freeing the slot the retry took (as a child start
        did before release 3)."""
        if request.start is None or self.client is None:
            return

        async def start(batch: PackedBatch) -> None:
            try:
                await self.client.start_workflow(
                    BOUNCER_BATCH_WORKFLOW,
                    dataclasses.replace(request.start, bouncer_batch_id=batch.bouncer_batch_id, after=batch.after),
                    id=bouncer_batch_workflow_id(request.lane, batch.bouncer_batch_id),
                    task_queue=request.start_task_queue,
                    static_summary=bouncer_batch_summary(request.lane, batch.bouncer_batch_id, batch.size),
                    priority=EXPRESS_PRIORITY if batch.express else Priority.default,
                    request_eager_start=True,
                )
            except WorkflowAlreadyStartedError:
                pass

        await asyncio.gather(*(start(b) for b in batches))

    async def _pack(self, request: PackRequest) -> PackResult:
        if request.linger_s > 0 and 0 < await self._queued(request.lane) < request.batch_size:
            # Less than a full batch: give lists submitted together a moment to arrive and share
            # Bouncer batches (the seed's John + Alice + Bob). A full batch is never held back.
            await asyncio.sleep(request.linger_s)
        began = time.perf_counter()
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                # Keys are `<pack_key>:<n>`; a range (not LIKE) so the unique index serves it.
                "select id, size, express, coalesce(after_id, 0) from bouncer_batches"
                " where pack_key > %s and pack_key < %s order by id",
                (request.pack_key + ":", request.pack_key + ";"),
            )
            done = await cur.fetchall()
            if done:  # a retry: answer what the first attempt answered
                await cur.execute(
                    "select queue_drained, queued_after from pack_runs where pack_key = %s", (request.pack_key,)
                )
                drained, queued_after = await cur.fetchone()
                return PackResult([PackedBatch(*row) for row in done], drained, queued_after)

            candidates = await _candidates(cur, request.lane)
            if not candidates:
                return PackResult([], queue_drained=True)
            served = await _served(cur, request.lane)
            allowance = await _allowances(cur, request.lane, self.max_in_flight_per_user)
            packer = _Packer(cur, request, candidates, served, allowance)

            batches: list[PackedBatch] = []
            express_size = min(request.express_max_addresses, request.batch_size)
            if express_size > 0:
                # Small lists (all they ever queued fits), not the tail of a big import.
                small = [c for c in candidates if c[4] <= express_size]
                while len(batches) < request.express_slots:
                    batch = await packer.form(small, express_size, express=True)
                    if batch is None:
                        break
                    batches.append(batch)
            regular = 0
            while regular < request.slots:
                after = request.follow[regular] if regular < len(request.follow) else 0
                batch = await packer.form(candidates, request.batch_size, express=False, after=after)
                if batch is None:
                    break
                batches.append(batch)
                regular += 1
                if batch.size < request.batch_size:
                    break  # the queue ran out
            left = sum(max(c[4] - c[3], 0) for c in candidates)
            await cur.execute(
                "insert into pack_runs (lane, pack_key, batches, addresses, queue_drained, queued_after, duration_ms)"
                " values (%s, %s, %s, %s, %s, %s, %s)",
                (request.lane, request.pack_key, len(batches), sum(b.size for b in batches), left == 0, left,
                 (time.perf_counter() - began) * 1000.0),
            )
            return PackResult(batches, queue_drained=left == 0, queued_after=left)

    async def _queued(self, lane: str) -> int:
        """Addresses waiting in the lane (from cursors: an upper bound)."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "select coalesce(sum(l.next_seq - l.cursor), 0) from user_batch_lanes l"
                " join user_batches b on b.id = l.user_batch_id"
                " where l.lane = %s and b.state = 'queued' and l.cursor < l.next_seq",
                (lane,),
            )
            return int((await cur.fetchone())[0])

    @activity.defn
    async def unfinished_batches(self, lane: str) -> list[PackedBatch]:
        """Bouncer batches of the lane not yet stored or failed: a fresh scheduler adopts them."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "select id, size, express from bouncer_batches"
                " where lane = %s and state in ('packed', 'submitting', 'submitted')"
                " order by id",
                (lane,),
            )
            return [PackedBatch(*row) for row in await cur.fetchall()]

    @activity.defn
    async def hold_lane(self, hold: LaneHold) -> None:
        """Write the lane's hold row (its standby batches are not sent while it exists), and wake
        them to look again."""
        async with self.pool.connection() as conn, conn.transaction():
            if hold.held:
                await conn.execute(
                    "insert into lane_holds (lane, reason) values (%s, %s)"
                    " on conflict (lane) do update set reason = excluded.reason",
                    (hold.lane, hold.reason),
                )
            else:
                await conn.execute("delete from lane_holds where lane = %s", (hold.lane,))
            await conn.execute("select pg_notify(%s, %s)", (SLOTS_CHANNEL, f"lane:{hold.lane}"))

    @activity.defn
    async def refresh_standby(self, request: StandbyRefresh) -> list[int]:
        """Empty the lane's standby batches if work that arrived after them is owed their places.

        Standby batches (release 6) are packed while every slot is busy, possibly many turnovers
        before they are sent; without this a list submitted behind a big import would wait for
        all of them. If the packer, with their addresses back in the queue, would put queued work
        of another user ahead (a higher priority or, with fair share, a less served user), their
        parts go back to their queues and the batches are left empty (their workflows end without
        a request; the scheduler packs ahead again). Returns the batches now empty (idempotent:
        a retry finds them so). A batch already being sent is not touched.
        """
        if not request.standby:
            return []
        lane = request.lane
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "select id, size from bouncer_batches where id = any(%s) and lane = %s and state = 'packed'"
                " and after_id is not null order by id for update",
                (request.standby, lane),
            )
            rows = await cur.fetchall()
            empty = [bb for bb, size in rows if size == 0]  # a retry, or every list of it paused
            waiting = [bb for bb, size in rows if size > 0]
            if not waiting:
                return empty
            await cur.execute(
                "select p.user_batch_id, p.seq_from, p.seq_to, p.addresses, b.user_id, b.priority"
                " from bouncer_batch_parts p join user_batches b on b.id = p.user_batch_id"
                " where p.bouncer_batch_id = any(%s)",
                (waiting,),
            )
            parts = await cur.fetchall()
            queued = [(user, prio) for _ub, user, prio, *_rest in await _candidates(cur, lane)]
            served = await _served(cur, lane)
            if not _owed_standby(parts, queued, served, request.fair_share):
                return empty
            await cur.execute("delete from bouncer_batch_parts where bouncer_batch_id = any(%s)", (waiting,))
            await cur.execute("update bouncer_batches set size = 0 where id = any(%s)", (waiting,))
            ranges: dict[int, list[tuple[int, int, int]]] = {}
            for ub, seq_from, seq_to, n, _user, _prio in parts:
                ranges.setdefault(ub, []).append((seq_from, seq_to, n))
            for ub, rs in ranges.items():
                await _requeue(cur, ub, lane, rs)
            await cur.execute("select pg_notify(%s, %s)", (SLOTS_CHANNEL, f"lane:{lane}"))
        return empty + waiting


def _owed_standby(parts: list[tuple], queued: list[tuple], served: dict[str, int], fair_share: bool) -> bool:
    """Would the packer put queued work ahead of (some of) these standby parts? Its order is
    priority (lower first), then, with fair share, the least served user (then age: a list
    queued after the parts were packed never comes first by age)."""
    users = {user for *_r, user, _prio in parts}
    lowest = max(prio for *_r, prio in parts)  # the part the packer reached last
    most_served = max(served.get(user, 0) for user in users)
    return any(
        prio < lowest or (fair_share and user not in users and prio == lowest and served.get(user, 0) < most_served)
        for user, prio in queued
    )


async def _requeue(cur, user_batch_id: int, lane: str, ranges: list[tuple[int, int, int]]) -> None:
    """Put the queue rows of withdrawn parts (seq ranges, packed but never sent) back in their
    queue: the cursor moves back when nothing after them was packed, else they are numbered
    again after the queue's end (and the queue is marked as having gaps)."""
    first = min(f for f, _t, _n in ranges)
    addresses = sum(n for _f, _t, n in ranges)
    p = {"ub": user_batch_id, "lane": lane, "first": first, "n": addresses,
         "froms": [f for f, _t, _n in ranges], "tos": [t for _f, t, _n in ranges]}
    await cur.execute(
        "select exists (select 1 from bouncer_batch_parts p join bouncer_batches b on b.id = p.bouncer_batch_id"
        " where p.user_batch_id = %(ub)s and b.lane = %(lane)s and p.seq_to > %(first)s)",
        p,
    )
    (later,) = await cur.fetchone()
    if not later:
        await cur.execute(
            "update user_batch_lanes set cursor = %(first)s, dispatched = dispatched - %(n)s"
            " where user_batch_id = %(ub)s and lane = %(lane)s",
            p,
        )
        return
    await cur.execute(lock_lanes("values (%(ub)s::bigint, %(lane)s::text)"), p)  # a store may number rows there too
    await cur.execute(
        """
        with moved as (
            select q.seq, row_number() over (order by q.seq) as rn
            from queue q join unnest(%(froms)s::bigint[], %(tos)s::bigint[]) w(f, t) on q.seq >= w.f and q.seq < w.t
            where q.user_batch_id = %(ub)s and q.lane = %(lane)s)
        update queue q set seq = l.next_seq + m.rn - 1
        from moved m, user_batch_lanes l
        where q.user_batch_id = %(ub)s and q.lane = %(lane)s and q.seq = m.seq
          and l.user_batch_id = %(ub)s and l.lane = %(lane)s
        """,
        p,
    )
    p["rows"] = cur.rowcount
    await cur.execute(
        "update user_batch_lanes set next_seq = next_seq + %(rows)s, holes = true, dispatched = dispatched - %(n)s"
        " where user_batch_id = %(ub)s and lane = %(lane)s",
        p,
    )


class _Packer:
    """Forms Bouncer batches from candidate user batches, one pack at a time.

    A candidate is `[user batch, user, priority, cursor, next_seq, holes]`; forming a batch
    moves cursors (in memory and in the database) and records the parts.
    """

    def __init__(
        self, cur, request: PackRequest, candidates: list[list], served: dict[str, int], allowance: dict[str, int]
    ) -> None:
        self.cur = cur
        self.request = request
        self.served = served
        self.allowance = allowance  # capped users: addresses they may still have dispatched
        self.index = {id(c): i for i, c in enumerate(candidates)}  # age order, for ties
        self.formed = 0

    async def form(self, candidates: list[list], size: int, express: bool, after: int = 0) -> PackedBatch | None:
        cur, lane = self.cur, self.request.lane
        parts: list[tuple[int, int, int, int]] = []  # (user batch, from, to, count)
        room = size
        # Users in turn: priority, least served, oldest batch.
        fair = self.request.fair_share
        for c in sorted(candidates, key=lambda c: (c[2], self.served.get(c[1], 0) if fair else 0, self.index[id(c)])):
            ub, user, _prio, cursor, next_seq, holes = c
            if room == 0:
                break
            want = min(room, self.allowance.get(user, room))
            if cursor >= next_seq or want <= 0:
                continue
            if holes:
                take_to, count = await _claim(cur, ub, lane, cursor, want)
            else:  # every seq number from the cursor on is a row: no need to count them
                take_to = min(cursor + want, next_seq)
                count = take_to - cursor
            c[3] = take_to if count else next_seq
            if count == 0:
                continue
            parts.append((ub, cursor, take_to, count))
            room -= count
            self.served[user] = self.served.get(user, 0) + count
            if user in self.allowance:
                self.allowance[user] -= count
        if not parts:
            return None
        await cur.execute(
            "insert into bouncer_batches (lane, pack_key, size, callback_token, express, after_id)"
            " values (%s, %s, %s, %s, %s, %s) returning id",
            (lane, f"{self.request.pack_key}:{self.formed}", size - room, secrets.token_urlsafe(24), express,
             after or None),
        )
        (bb_id,) = await cur.fetchone()
        self.formed += 1
        async with cur.copy(
            "copy bouncer_batch_parts (bouncer_batch_id, user_batch_id, seq_from, seq_to, addresses) from stdin"
        ) as copy:
            for part in parts:
                await copy.write_row((bb_id, *part))
        for ub, _f, seq_to, n in parts:
            await cur.execute(
                "update user_batch_lanes set cursor = %s, dispatched = dispatched + %s"
                " where user_batch_id = %s and lane = %s",
                (seq_to, n, ub, lane),
            )
        return PackedBatch(bb_id, size - room, express, after)


async def _candidates(cur, lane: str) -> list[list]:
    """The lane's queued lists with addresses left, in packing order (before fair share):
    `[user batch, user, priority, cursor, next_seq, holes]` each."""
    await cur.execute(
        """
        select l.user_batch_id, b.user_id, b.priority, l.cursor, l.next_seq, l.holes
        from user_batch_lanes l join user_batches b on b.id = l.user_batch_id
        where l.lane = %s and b.state = 'queued' and l.cursor < l.next_seq
        order by b.priority, b.created_at, b.id
        """,
        (lane,),
    )
    return [list(r) for r in await cur.fetchall()]


async def _served(cur, lane: str) -> dict[str, int]:
    """Fair share's measure: addresses packed per user from their unfinished batches in the lane."""
    await cur.execute(
        """
        select b.user_id, sum(l.dispatched) from user_batch_lanes l join user_batches b on b.id = l.user_batch_id
        where l.lane = %s and b.state in ('queued', 'paused') group by 1
        """,
        (lane,),
    )
    return {u: int(n) for u, n in await cur.fetchall()}


async def _allowances(cur, lane: str, default_cap: int) -> dict[str, int]:
    """Addresses each capped user may still have dispatched in this lane (per-user in-flight cap).

    The cap is `user_limits.max_in_flight` for the user, else `default_cap`; 0 means none.
    In flight = addresses in the lane's open Bouncer batches (a handful of rows: <= slots).
    """
    await cur.execute(
        """
        with capped as (
            select u.user_id, coalesce(ul.max_in_flight, %(cap)s) as cap
            from (select distinct b.user_id from user_batch_lanes l join user_batches b on b.id = l.user_batch_id
                  where l.lane = %(lane)s and b.state = 'queued' and l.cursor < l.next_seq) u
            left join user_limits ul on ul.user_id = u.user_id),
        flying as (
            select b.user_id, sum(p.addresses) as n
            from bouncer_batches bb join bouncer_batch_parts p on p.bouncer_batch_id = bb.id
            join user_batches b on b.id = p.user_batch_id
            where bb.lane = %(lane)s and bb.state in ('packed', 'submitting', 'submitted') group by 1)
        select c.user_id, c.cap - coalesce(f.n, 0) from capped c left join flying f using (user_id) where c.cap > 0
        """,
        {"lane": lane, "cap": default_cap},
    )
    return {user: int(left) for user, left in await cur.fetchall()}


async def _claim(cur, user_batch_id: int, lane: str, cursor: int, room: int) -> tuple[int, int]:
    """The end (exclusive) of the next `room` queue rows from `cursor`, and how many there are.

    For a lane whose seq numbers may have gaps (`user_batch_lanes.holes`): count rows, not
    numbers (an index scan of up to `room` entries: ~26 ms p50 for 10,000 in `bench saturation`).
    """
    await cur.execute(
        "select seq from queue where user_batch_id = %s and lane = %s and seq >= %s order by seq offset %s limit 1",
        (user_batch_id, lane, cursor, room - 1),
    )
    row = await cur.fetchone()
    if row is not None:
        return int(row[0]) + 1, room
    await cur.execute(
        "select count(*), max(seq) from queue where user_batch_id = %s and lane = %s and seq >= %s",
        (user_batch_id, lane, cursor),
    )
    count, last = await cur.fetchone()
    if not count:
        return cursor, 0
    return int(last) + 1, int(count)

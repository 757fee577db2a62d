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

import secrets
import time

from psycopg_pool import AsyncConnectionPool
from temporalio import activity

from workflows.models import PackedBatch, PackRequest, PackResult


class PackingActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @activity.defn
    async def pack_batches(self, request: PackRequest) -> PackResult:
        """Form up to `slots` Bouncer batches of up to `batch_size` addresses.

        Idempotent by `pack_key`: a retry returns the batches the first attempt created.
        """
        began = time.perf_counter()
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                # Keys are `<pack_key>:<n>`; a range (not LIKE) so the unique index serves it.
                "select id, size from bouncer_batches where pack_key > %s and pack_key < %s order by id",
                (request.pack_key + ":", request.pack_key + ";"),
            )
            done = await cur.fetchall()
            if done:  # a retry: answer what the first attempt answered
                await cur.execute(
                    "select queue_drained, queued_after from pack_runs where pack_key = %s", (request.pack_key,)
                )
                drained, queued_after = await cur.fetchone()
                return PackResult([PackedBatch(i, s) for i, s in done], drained, queued_after)

            await cur.execute(
                """
                select l.user_batch_id, b.user_id, b.priority, l.cursor, l.next_seq
                from user_batch_lanes l join user_batches b on b.id = l.user_batch_id
                where l.lane = %s and b.state = 'queued' and l.cursor < l.next_seq
                order by b.priority, b.created_at, b.id
                """,
                (request.lane,),
            )
            candidates = [list(r) for r in await cur.fetchall()]
            if not candidates:
                return PackResult([], queue_drained=True)
            await cur.execute(
                """
                select b.user_id, sum(l.dispatched) from user_batch_lanes l join user_batches b on b.id = l.user_batch_id
                where l.lane = %s and b.state in ('queued', 'paused') group by 1
                """,
                (request.lane,),
            )
            served = {u: int(n) for u, n in await cur.fetchall()}

            batches: list[PackedBatch] = []
            exhausted = False
            while len(batches) < request.slots and not exhausted:
                parts: list[tuple[int, int, int, int]] = []  # (user batch, from, to, count)
                room = request.batch_size
                # Users in turn: priority, least served, oldest batch (candidates are age-sorted).
                order = sorted(
                    range(len(candidates)),
                    key=lambda i: (candidates[i][2], served.get(candidates[i][1], 0) if request.fair_share else 0, i),
                )
                for i in order:
                    ub, user, _prio, cursor, next_seq = candidates[i]
                    if room == 0 or cursor >= next_seq:
                        continue
                    take_to, count = await _claim(cur, ub, request.lane, cursor, room)
                    if count == 0:
                        candidates[i][3] = next_seq
                        continue
                    parts.append((ub, cursor, take_to, count))
                    candidates[i][3] = take_to
                    room -= count
                    served[user] = served.get(user, 0) + count
                if not parts:
                    exhausted = True
                    break
                size = request.batch_size - room
                await cur.execute(
                    "insert into bouncer_batches (lane, pack_key, size, callback_token) values (%s, %s, %s, %s)"
                    " returning id",
                    (request.lane, f"{request.pack_key}:{len(batches)}", size, secrets.token_urlsafe(24)),
                )
                (bb_id,) = await cur.fetchone()
                async with cur.copy(
                    "copy bouncer_batch_parts (bouncer_batch_id, user_batch_id, seq_from, seq_to, addresses)"
                    " from stdin"
                ) as copy:
                    for ub, seq_from, seq_to, n in parts:
                        await copy.write_row((bb_id, ub, seq_from, seq_to, n))
                for ub, _f, seq_to, n in parts:
                    await cur.execute(
                        "update user_batch_lanes set cursor = %s, dispatched = dispatched + %s"
                        " where user_batch_id = %s and lane = %s",
                        (seq_to, n, ub, request.lane),
                    )
                batches.append(PackedBatch(bb_id, size))
                if room > 0:
                    exhausted = True
            drained = exhausted or all(c[3] >= c[4] for c in candidates)
            queued = 0 if exhausted else sum(max(c[4] - c[3], 0) for c in candidates)
            await cur.execute(
                "insert into pack_runs (lane, pack_key, batches, addresses, queue_drained, queued_after, duration_ms)"
                " values (%s, %s, %s, %s, %s, %s, %s)",
                (request.lane, request.pack_key, len(batches), sum(b.size for b in batches), drained, queued,
                 (time.perf_counter() - began) * 1000.0),
            )
            return PackResult(batches, queue_drained=drained, queued_after=queued)

    @activity.defn
    async def unfinished_batches(self, lane: str) -> list[PackedBatch]:
        """Bouncer batches of the lane not yet stored or failed: a fresh scheduler adopts them."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.execute(
                "select id, size from bouncer_batches where lane = %s and state in ('packed', 'submitting', 'submitted')"
                " order by id",
                (lane,),
            )
            return [PackedBatch(i, s) for i, s in await cur.fetchall()]


async def _claim(cur, user_batch_id: int, lane: str, cursor: int, room: int) -> tuple[int, int]:
    """The end (exclusive) of the next `room` queue rows from `cursor`, and how many there are.

    Seq numbers may have gaps (rows resolved or moved), so count rows, not numbers.
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

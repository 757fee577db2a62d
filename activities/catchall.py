"""The catchall lane's intake: accept-all addresses found by the deliverability lane.

An address whose deliverability result is `risky` with `domain.acceptAll = "yes"` is verified a
second time on the catchall lane, for the user batches that asked for that lane. It enters
the lane two ways: at prepare/resume (a fresh accept-all result already exists, see
`CANDIDATES`) and when the deliverability lane stores such a result (`hand_off`). Both keep
pay-once per lane: a fresh catchall result is reused, an address already queued on the lane
is waited on, not queued twice.
"""

from __future__ import annotations

import psycopg

from db import fresh_result, lock_lanes
from settings import CATCHALL, DELIVERABILITY

# Which lane's results feed which lane.
NEXT_LANE = {DELIVERABILITY: CATCHALL}

# Extra condition on `addresses a` when enqueueing the catchall lane at prepare or resume.
CANDIDATES = f"""
    and exists (select 1 from results d where d.address_id = a.id and d.lane = '{DELIVERABILITY}'
                and d.status = 'risky' and d.accept_all = 'yes'
                and {fresh_result("d")})
"""


async def hand_off(cur: psycopg.AsyncCursor, lane: str, ttl: dict) -> int:
    """Queue the accept-all addresses just settled on `lane` onto the next lane.

    Runs inside `store_results`' transaction and reads its `settled` temp table (user batch,
    address, dead), so a user batch's `remaining` on the next lane grows in the same commit
    that shrinks it on this one: the batch never looks finished in between. Paused user
    batches are skipped (resume enqueues them); cancelled ones too. Returns how many
    addresses were put on the next lane's queue (0: no need to wake its scheduler).
    """
    target = NEXT_LANE.get(lane)
    if target is None:
        return 0
    p = {"lane": lane, "target": target, **ttl}
    await cur.execute(
        f"""
        create temp table handoff on commit drop as
        select s.user_batch_id, s.address_id,
               exists (select 1 from results c where c.address_id = s.address_id and c.lane = %(target)s
                       and {fresh_result("c", cap="b.max_result_age_s")}) as fresh,
               (select q.user_batch_id from queue q where q.lane = %(target)s and q.address_id = s.address_id) as owner,
               false as queued_before
        from settled s
        join user_batches b on b.id = s.user_batch_id and b.state = 'queued' and %(target)s = any(b.lanes)
        join results r on r.address_id = s.address_id and r.lane = %(lane)s
        where not s.dead and r.status = 'risky' and r.accept_all = 'yes'
        """,
        p,
    )
    if not cur.rowcount:
        return 0
    await cur.execute("update handoff set queued_before = true where owner is not null")
    # Not yet queued on the target lane: the lowest user batch owns it, the others wait.
    await cur.execute(
        """
        update handoff h set owner = o.user_batch_id
        from (select address_id, min(user_batch_id) as user_batch_id from handoff
              where not fresh and owner is null group by 1) o
        where h.address_id = o.address_id and not h.fresh and h.owner is null
        """
    )
    # Another lane's store (or this lane's own) may be numbering rows of the same lists meanwhile.
    await cur.execute(lock_lanes("select distinct user_batch_id, %(target)s::text from handoff"
                                 " where not fresh and not queued_before and owner = user_batch_id"), p)
    await cur.execute(
        """
        insert into queue (user_batch_id, lane, seq, address_id)
        select h.user_batch_id, %(target)s,
               l.next_seq + row_number() over (partition by h.user_batch_id order by h.address_id) - 1, h.address_id
        from handoff h join user_batch_lanes l on l.user_batch_id = h.user_batch_id and l.lane = %(target)s
        where not h.fresh and not h.queued_before and h.owner = h.user_batch_id
        """,
        p,
    )
    queued = cur.rowcount
    await cur.execute(
        """
        insert into waits (lane, address_id, user_batch_id)
        select %(target)s, address_id, user_batch_id from handoff where not fresh and owner <> user_batch_id
        on conflict do nothing
        """,
        p,
    )
    await cur.execute(
        """
        update user_batch_lanes l set
            unique_addresses = l.unique_addresses + c.n - c.already,
            cached = l.cached + c.fresh,
            enqueued = l.enqueued + c.owned,
            shared = l.shared + c.waiting,
            remaining = l.remaining + c.owned + c.waiting,
            next_seq = l.next_seq + c.owned
        from (select user_batch_id, count(*) as n, count(*) filter (where fresh) as fresh,
                     count(*) filter (where not fresh and not queued_before and owner = user_batch_id) as owned,
                     count(*) filter (where not fresh and owner <> user_batch_id) as waiting,
                     count(*) filter (where not fresh and queued_before and owner = user_batch_id) as already
              from handoff group by 1) c
        where l.user_batch_id = c.user_batch_id and l.lane = %(target)s
        """,
        p,
    )
    return max(queued, 0)

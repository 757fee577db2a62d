"""Pipeline-wide numbers read from Postgres: shared by the worker's gauges and `starter.py health`.

Each query is cheap at any backlog: queue depth comes from the user batches' cursors (not a
count of queue rows), open Bouncer batches from a partial index, usage from per-minute rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg


@dataclass
class Readings:
    queue_depth: dict[str, int] = field(default_factory=dict)  # lane -> addresses (an upper bound)
    in_flight: dict[str, int] = field(default_factory=dict)  # lane -> Bouncer batches packed or at the API
    dead_letters: dict[str, int] = field(default_factory=dict)  # lane -> all time
    dead_letters_recent: int = 0  # in ALERT_FAILED_WINDOW_S
    requests: dict[str, int] = field(default_factory=dict)  # budget -> requests, busiest of this and last minute
    budgets: dict[str, float] = field(default_factory=dict)  # budget -> requests per minute allowed
    batch_size: int = 10_000

    @property
    def backlog(self) -> int:
        return sum(self.queue_depth.values())

    @property
    def backlog_batches(self) -> float:
        return self.backlog / self.batch_size

    @property
    def utilization(self) -> dict[str, float]:
        return {b: self.requests.get(b, 0) / per_minute for b, per_minute in self.budgets.items()}


async def read(conn: psycopg.AsyncConnection, settings) -> Readings:
    r = Readings(
        budgets={"create": float(settings.creations_per_minute), "other": float(settings.requests_per_minute)},
        batch_size=settings.batch_size,
    )
    cur = conn.cursor()
    # Paused and cancelled batches keep their cursors but their unclaimed rows are withdrawn.
    await cur.execute(
        "select l.lane, sum(l.next_seq - l.cursor)::bigint from user_batch_lanes l"
        " join user_batches b on b.id = l.user_batch_id where b.state = 'queued' and l.cursor < l.next_seq"
        " group by 1"
    )
    r.queue_depth = {lane: int(n) for lane, n in await cur.fetchall()}
    await cur.execute(
        "select lane, count(*) from bouncer_batches where state in ('packed', 'submitting', 'submitted') group by 1"
    )
    r.in_flight = {lane: int(n) for lane, n in await cur.fetchall()}
    await cur.execute(
        "select lane, count(*), count(*) filter (where created_at > now() - make_interval(secs => %s))"
        " from dead_letters group by 1",
        (settings.alert_failed_window_s,),
    )
    rows = await cur.fetchall()
    r.dead_letters = {lane: int(n) for lane, n, _recent in rows}
    r.dead_letters_recent = sum(int(recent) for _lane, _n, recent in rows)
    await cur.execute(
        "select budget, max(requests) from api_usage"
        " where minute >= date_trunc('minute', now()) - interval '1 minute' group by 1"
    )
    r.requests = {budget: int(n) for budget, n in await cur.fetchall()}
    return r

"""Alert thresholds (the seeds': backlog, failed, rate-limit utilization; plus a credits floor).

An alert raises one `alert.raised` event when its threshold is crossed and one `alert.cleared`
when the value is back under, however often it is checked and by however many processes:
the state lives in `alert_state`, and only the transaction that flips it writes the event.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from ops.readings import Readings


@dataclass
class Alert:
    name: str
    crossed: bool
    value: float
    threshold: float
    what: str  # in words, for events and the health output
    firing: bool = False  # after evaluation
    changed: bool = False  # this evaluation raised or cleared it


def thresholds(settings, r: Readings, credits: int | None) -> list[Alert]:
    """The alerts and whether each is crossed now; credits only when they were read."""
    found = [
        Alert("backlog", r.backlog_batches > settings.alert_backlog_batches, round(r.backlog_batches, 2),
              settings.alert_backlog_batches, "queued work in Bouncer batches"),
        Alert("failed", r.dead_letters_recent > settings.alert_failed, r.dead_letters_recent, settings.alert_failed,
              f"addresses dead-lettered in the last {settings.alert_failed_window_s:.0f} s"),
    ]
    for budget, share in sorted(r.utilization.items()):
        found.append(Alert(f"rate_limit_{budget}", share > settings.alert_rate_utilization, round(share, 3),
                           settings.alert_rate_utilization, f"share of the {budget} budget used in a minute"))
    if credits is not None:
        found.append(Alert("credits", credits < settings.alert_credits_floor, credits, settings.alert_credits_floor,
                           "credits left"))
    return found


async def evaluate(conn: psycopg.AsyncConnection, alerts: list[Alert]) -> list[Alert]:
    """Record each alert's state; write an event for each one that flipped. Returns `alerts`."""
    async with conn.transaction():
        for a in alerts:
            cur = await conn.execute(
                """
                insert into alert_state (name, firing, value, threshold) values (%s, %s, %s, %s)
                on conflict (name) do update set firing = excluded.firing, value = excluded.value,
                    threshold = excluded.threshold, changed_at = now(), observed_at = now()
                where alert_state.firing <> excluded.firing
                returning (xmax = 0) as inserted
                """,
                (a.name, a.crossed, a.value, a.threshold),
            )
            row = await cur.fetchone()
            a.firing = a.crossed
            # A first sighting below the threshold is no news; anything else that flipped is.
            a.changed = row is not None and not (row[0] and not a.crossed)
            if a.changed:
                await conn.execute(
                    "insert into events (kind, subject, data) values (%s, %s, %s)",
                    ("alert.raised" if a.crossed else "alert.cleared", a.name,
                     Jsonb({"value": a.value, "threshold": a.threshold, "what": a.what})),
                )
            elif row is None:
                # Unchanged: keep the latest value for readers of the table.
                await conn.execute("update alert_state set value = %s, observed_at = now() where name = %s",
                                   (a.value, a.name))
    return alerts

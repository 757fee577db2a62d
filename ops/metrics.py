"""Our Prometheus series, and the loop that keeps the pipeline-wide gauges current.

Counters move where things happen: the Bouncer client's response hook (requests, latency,
API usage) and `store_results` (addresses verified). Gauges that describe the whole
pipeline (queue depth, in-flight batches, dead letters, rate-limit use, credits) are read
from Postgres by every worker's sampler, so each worker reports the same global value:
aggregate them with max(), the counters with sum().
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram
from psycopg_pool import AsyncConnectionPool

from ops import readings
from settings import DELIVERABILITY

log = logging.getLogger("ops.metrics")

ADDRESSES_VERIFIED = Counter(
    "pipeline_addresses_verified", "Addresses whose result was stored, by lane and Bouncer status", ["lane", "status"]
)
API_REQUESTS = Counter(
    "bouncer_api_requests", "Bouncer API requests by lane, endpoint and HTTP status code (error: no answer)",
    ["lane", "endpoint", "code"],
)
API_LATENCY = Histogram(
    "bouncer_api_request_duration_seconds", "Bouncer API request latency by lane and endpoint", ["lane", "endpoint"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge("pipeline_queue_depth", "Addresses queued and not yet packed, by lane", ["lane"])
IN_FLIGHT = Gauge("pipeline_in_flight_batches", "Bouncer batches packed or at the API, by lane", ["lane"])
DEAD_LETTERS = Gauge("pipeline_dead_letters", "Dead-lettered addresses (all time), by lane", ["lane"])
RATE_LIMIT_UTILIZATION = Gauge(
    "pipeline_rate_limit_utilization",
    "API requests of all workers in the current or previous minute over the per-minute budget (create, other)",
    ["budget"],
)
RATE_LIMIT_BUDGET = Gauge("pipeline_rate_limit_budget_per_minute", "The per-minute API budgets", ["budget"])
CREDITS = Gauge("bouncer_credits_remaining", "Credits left on the Bouncer account, as last read")
ALERT_FIRING = Gauge("pipeline_alert_firing", "1 while an alert threshold is crossed", ["alert"])

SERIES = (
    "pipeline_addresses_verified_total", "bouncer_api_requests_total", "bouncer_api_request_duration_seconds",
    "pipeline_queue_depth", "pipeline_in_flight_batches", "pipeline_dead_letters", "pipeline_rate_limit_utilization",
    "pipeline_rate_limit_budget_per_minute", "bouncer_credits_remaining", "pipeline_alert_firing",
)


def budget_of(endpoint: str) -> str:
    """Which per-minute budget a request spends: batch creations, or everything else."""
    return "create" if endpoint == "create" else "other"


class ApiUsage:
    """This process's API requests per minute, flushed to Postgres so health sees all workers."""

    def __init__(self) -> None:
        self._pending: Tally[tuple[datetime, str]] = Tally()

    def observe(self, endpoint: str, code: str, seconds: float, lane: str = DELIVERABILITY) -> None:
        """The Bouncer client's `on_response` hook (see `hook`)."""
        API_REQUESTS.labels(lane, endpoint, code).inc()
        API_LATENCY.labels(lane, endpoint).observe(seconds)
        # `api_usage` (health's utilization alerts) counts against the deliverability lane's budgets;
        # another lane's API has budgets of its own and shows in the series above.
        if lane == DELIVERABILITY and code != "error":  # no answer: the request may not have reached the API
            minute = datetime.now(UTC).replace(second=0, microsecond=0)
            self._pending[(minute, budget_of(endpoint))] += 1

    def hook(self, lane: str) -> Callable[[str, str, float], None]:
        """`on_response` for the Bouncer client of `lane`."""
        return functools.partial(self.observe, lane=lane)

    async def flush(self, pool: AsyncConnectionPool) -> None:
        pending, self._pending = self._pending, Tally()
        if not pending:
            return
        try:
            async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                await cur.executemany(
                    "insert into api_usage (minute, budget, requests) values (%s, %s, %s)"
                    " on conflict (minute, budget) do update set requests = api_usage.requests + excluded.requests",
                    [(minute, budget, n) for (minute, budget), n in sorted(pending.items())],
                )
                await cur.execute("delete from api_usage where minute < now() - interval '1 day'")
        except Exception:
            self._pending.update(pending)  # keep them for the next flush
            raise


def set_gauges(r: readings.Readings, lanes: tuple[str, ...]) -> None:
    for lane in lanes:
        QUEUE_DEPTH.labels(lane).set(r.queue_depth.get(lane, 0))
        IN_FLIGHT.labels(lane).set(r.in_flight.get(lane, 0))
        DEAD_LETTERS.labels(lane).set(r.dead_letters.get(lane, 0))
    for budget, share in r.utilization.items():
        RATE_LIMIT_UTILIZATION.labels(budget).set(share)
    for budget, per_minute in r.budgets.items():
        RATE_LIMIT_BUDGET.labels(budget).set(per_minute)


async def sample_forever(settings, pool: AsyncConnectionPool, usage: ApiUsage, bouncer, stop: asyncio.Event) -> None:
    """Every METRICS_SAMPLE_S: flush API usage, refresh the gauges; every ALERT_CHECK_S: evaluate
    the alert thresholds; every CREDITS_SAMPLE_S: read the credits (one API request)."""
    from ops import alerts
    from settings import LANES

    credits: int | None = None
    last_credits = last_alerts = float("-inf")
    while not stop.is_set():
        try:
            await usage.flush(pool)
            now = time.monotonic()
            if settings.credits_sample_s > 0 and now - last_credits >= settings.credits_sample_s:
                last_credits = now
                try:
                    credits = await bouncer.credits()
                    CREDITS.set(credits)
                except Exception as exc:  # noqa: BLE001 - an unreachable API is a reading, not a crash
                    log.warning("credits not read: %s", exc)
            async with pool.connection() as conn:
                r = await readings.read(conn, settings)
            set_gauges(r, LANES)
            if settings.alert_check_s > 0 and now - last_alerts >= settings.alert_check_s:
                last_alerts = now
                async with pool.connection() as conn:
                    for alert in await alerts.evaluate(conn, alerts.thresholds(settings, r, credits)):
                        ALERT_FIRING.labels(alert.name).set(int(alert.firing))
        except Exception:
            log.exception("metrics sample failed")
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.metrics_sample_s)
        except TimeoutError:
            pass
    await usage.flush(pool)

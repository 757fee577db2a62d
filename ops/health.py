"""`starter.py health`: is the pipeline up, and is it within its alert thresholds?

down: Temporal or Postgres cannot be reached (nothing can progress). degraded: it runs, but
something needs a look (no worker polling, schema behind the code, search attributes missing,
Bouncer unreachable or short of credits, a lane paused or its scheduler missing while work is
queued, an alert threshold crossed). Alerts are recorded (ops.alerts) as a side effect.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import psycopg
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowExecutionStatus

import db
import temporal_client
from ops import alerts, readings
from settings import DELIVERABILITY, LANES
from workflows.models import SchedulerStatus, scheduler_id
from workflows.search import KEYS

OK, DEGRADED, DOWN = "ok", "degraded", "down"
EXIT_CODES = {"healthy": 0, "degraded": 1, "down": 2}
TIMEOUT_S = 5.0
POLLER_FRESH_S = 90.0  # a poller last seen longer ago is a worker that stopped


@dataclass
class Check:
    name: str
    status: str  # ok, degraded, down
    detail: str


@dataclass
class Report:
    status: str = "healthy"  # healthy, degraded, down
    checks: list[Check] = field(default_factory=list)
    readings: dict = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    def finish(self) -> Report:
        statuses = {c.status for c in self.checks}
        self.status = "down" if DOWN in statuses else "degraded" if DEGRADED in statuses else "healthy"
        return self

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def as_dict(self) -> dict:
        return asdict(self)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


async def check(settings, bouncer_factory) -> Report:
    """Run every check; `bouncer_factory(lane)` returns an async-context BouncerClient for that lane."""
    report = Report()
    client = await _temporal(settings, report)
    conn = await _postgres(settings, report)
    r = None
    try:
        if conn is not None:
            r = await _database(settings, conn, report)
        if client is not None:
            await _temporal_parts(settings, client, report, r)
        credits = await _bouncer(settings, bouncer_factory, report)
        if r is not None:
            _thresholds_as_checks(settings, r, credits, report)
            found = await alerts.evaluate(conn, alerts.thresholds(settings, r, credits))
            report.alerts = [
                {"name": a.name, "firing": a.firing, "changed": a.changed, "value": a.value, "threshold": a.threshold}
                for a in found
            ]
    finally:
        if conn is not None:
            await conn.close()
    return report.finish()


async def _temporal(settings, report: Report) -> Client | None:
    try:
        client = await asyncio.wait_for(
            temporal_client.connect(settings), TIMEOUT_S
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect is the finding
        report.add("temporal", DOWN, f"cannot reach Temporal at {settings.temporal_address}: {_first_line(exc)}")
        return None
    report.add("temporal", OK, f"{settings.temporal_address}, namespace {settings.temporal_namespace}")
    return client


async def _postgres(settings, report: Report) -> psycopg.AsyncConnection | None:
    try:
        conn = await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True,
                                                     connect_timeout=int(TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001
        report.add("postgres", DOWN, f"cannot reach Postgres: {_first_line(exc)}")
        return None
    report.add("postgres", OK, "reachable")
    return conn


async def _database(settings, conn: psycopg.AsyncConnection, report: Report) -> readings.Readings | None:
    expected = max(version for version, _path in db.migration_files())
    try:
        row = await (await conn.execute("select coalesce(max(version), 0) from schema_migrations")).fetchone()
        version = int(row[0])
    except psycopg.errors.UndefinedTable:
        version = 0
    if version < expected:
        report.add("schema", DEGRADED, f"at migration {version}, the code expects {expected}: start a worker "
                                       "(it migrates at start)")
        return None
    report.add("schema", OK, f"migration {version}")
    r = await readings.read(conn, settings)
    report.readings = {
        "queue_depth": r.queue_depth, "backlog_batches": round(r.backlog_batches, 2), "in_flight": r.in_flight,
        "dead_letters": r.dead_letters, "dead_letters_recent": r.dead_letters_recent, "requests": r.requests,
        "budgets": r.budgets, "utilization": {k: round(v, 3) for k, v in r.utilization.items()},
    }
    return r


async def _temporal_parts(settings, client: Client, report: Report, r: readings.Readings | None) -> None:
    try:
        found = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=settings.temporal_namespace), timeout=_td(TIMEOUT_S)
        )
        missing = [k.name for k in KEYS if k.name not in found.custom_attributes]
        if missing:
            report.add("search_attributes", DEGRADED, f"not registered: {', '.join(missing)} (workflows fail to "
                                                      "record them): see README, Operations")
        else:
            report.add("search_attributes", OK, ", ".join(k.name for k in KEYS))
    except Exception as exc:  # noqa: BLE001 - e.g. not permitted on this namespace
        report.add("search_attributes", OK, f"not checked: {_first_line(exc)}")

    try:
        resp = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(namespace=settings.temporal_namespace,
                                     task_queue=TaskQueue(name=settings.task_queue),
                                     task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            timeout=_td(TIMEOUT_S),
        )
        # The server lists a poller for minutes after its last poll; a live worker's long poll
        # (up to ~70 s when idle) renews it, so an older one is a worker that is gone.
        now = time.time()
        pollers = sum(1 for pl in resp.pollers
                      if not pl.HasField("last_access_time") or now - pl.last_access_time.ToSeconds() <= POLLER_FRESH_S)
        report.add("workers", OK if pollers else DEGRADED,
                   f"{pollers} worker(s) polling {settings.task_queue}" if pollers
                   else f"no worker polls task queue {settings.task_queue}: start `python worker.py`")
    except Exception as exc:  # noqa: BLE001
        report.add("workers", DEGRADED, f"task queue {settings.task_queue} not described: {_first_line(exc)}")

    for lane in LANES:
        queued = r.queue_depth.get(lane, 0) if r else 0
        handle = client.get_workflow_handle(scheduler_id(lane))
        try:
            desc = await handle.describe(rpc_timeout=_td(TIMEOUT_S))
            running = desc.status == WorkflowExecutionStatus.RUNNING
        except Exception:  # noqa: BLE001 - never started
            running = False
        if not running:
            status = DEGRADED if queued else OK
            report.add(f"scheduler_{lane}", status, f"not running; {queued:,} addresses queued"
                       + (": submit or resume to start it" if queued else ""))
            continue
        try:
            st = await handle.query("status", result_type=SchedulerStatus, rpc_timeout=_td(TIMEOUT_S))
        except Exception as exc:  # noqa: BLE001 - no worker to answer the query
            report.add(f"scheduler_{lane}", DEGRADED, f"running, status not answered: {_first_line(exc)}")
            continue
        detail = f"{st.in_flight} in flight, {st.free_slots} slots free, {queued:,} addresses queued"
        if st.paused:
            report.add(f"scheduler_{lane}", DEGRADED, f"paused ({st.pause_reason}); {detail}")
        else:
            report.add(f"scheduler_{lane}", OK, f"running; {detail}")


async def _bouncer(settings, bouncer_factory, report: Report) -> int | None:
    """Each enabled lane's endpoint answers a credits call; the deliverability lane's credits
    are returned (the credits alert watches them)."""
    credits = None
    for lane in settings.lanes_enabled():
        name, url = ("bouncer", settings.bouncer_base_url) if lane == DELIVERABILITY else (
            f"bouncer_{lane}", settings.lane_api(lane).base_url)
        try:
            async with bouncer_factory(lane) as bouncer:
                left = await asyncio.wait_for(bouncer.credits(), TIMEOUT_S * 2)
        except Exception as exc:  # noqa: BLE001
            report.add(name, DEGRADED, f"Bouncer API ({lane} lane) at {url} not reachable: {_first_line(exc)}")
            continue
        report.add(name, OK, f"{url}: {left:,} credits")
        if lane == DELIVERABILITY:
            credits = left
    return credits


def _thresholds_as_checks(settings, r: readings.Readings, credits: int | None, report: Report) -> None:
    for a in alerts.thresholds(settings, r, credits):
        side = "below" if a.name == "credits" else "above"
        report.add(f"alert_{a.name}", DEGRADED if a.crossed else OK,
                   f"{a.what}: {_num(a.value)} (alert {side} {_num(a.threshold)})")


def _num(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,}"


def _td(seconds: float) -> timedelta:
    return timedelta(seconds=seconds)

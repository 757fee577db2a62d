"""starter.py: submit lists, watch them, fetch results, pause/resume/cancel, run the dev stack.

    python starter.py dev up                      # embedded stack in the background (.dev/)
    python starter.py submit leads.csv --user alice --wait
    python starter.py status [USER_BATCH_ID] [--json]
    python starter.py results USER_BATCH_ID -o out.csv [--status deliverable]
    python starter.py pause|resume USER_BATCH_ID   (or --lane deliverability)
    python starter.py cancel USER_BATCH_ID
    python starter.py submit leads.csv --user alice --at 2027-06-01T02:00Z --every 30d
    python starter.py schedules list|pause|unpause|trigger|delete [SCHEDULE_ID]
    python starter.py clean --older-than 30d      # run the cleanup now, print what it deleted
    python starter.py apikeys create --user alice # keys of the HTTP API (`python -m api`)
    python starter.py dlq list|retry|purge [--user-batch ID | --lane L]

Exit codes: 0 ok, 1 failed, 2 bad input or unknown id.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional
from urllib.parse import urlsplit

import orjson
import psycopg
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError

import schedules
import temporal_client
from activities.events import TOPICS, record_event, requeue_failed
from activities.ingest import IngestStats, UnreadableInput, copy_items
from activities.user_batches import in_lane_order, lane_problem
from db import outcomes
from devstack import DevStack
from ops import readings
from settings import LANES, Settings
from workflows import search
from workflows.models import FINISHED_STATES, PRIORITIES, Progress as BatchProgress, SchedulerStatus, Summary
from workflows.models import UserBatchInput
from workflows.models import recurring_schedule_id, scheduler_id, scheduler_summary, user_batch_workflow_id

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
dev_app = typer.Typer(no_args_is_help=True, help="Start, stop and inspect the embedded dev stack (.dev/).")
app.add_typer(dev_app, name="dev")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: addresses that got no result (list, retry, purge).")
app.add_typer(dlq_app, name="dlq")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # one error, one line: no hard wrap at 80 columns


class Priority(str, Enum):
    critical = "critical"
    high = "high"
    normal = "normal"
    low = "low"


class Format(str, Enum):
    csv = "csv"
    json = "json"
    jsonl = "jsonl"


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def emit_json(obj: object) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS).decode() + "\n")


def settings() -> Settings:
    return Settings()


async def temporal(s: Settings) -> Client:
    try:
        return await temporal_client.connect(s)
    except ValueError as exc:  # a TLS setting (the message names it)
        raise fail(str(exc), 2)
    except RuntimeError as exc:
        hint = ("Check TEMPORAL_TLS_CA_FILE, TEMPORAL_TLS_CERT_FILE / _KEY_FILE or TEMPORAL_API_KEY (README, Security)"
                if temporal_client.uses_tls(s) else "Is the stack up (`starter.py dev up`)?")
        raise fail(f"cannot reach Temporal at {s.temporal_address}: {exc}. {hint}", 1)


def db_connect(s: Settings) -> psycopg.Connection:
    try:
        return psycopg.connect(s.database_url)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(f"cannot reach Postgres ({first}). Is the stack up (`starter.py dev up`)?", 1)


def load_batch(conn: psycopg.Connection, user_batch_id: int, user: str | None) -> tuple:
    row = conn.execute(
        "select id, user_id, name, priority, lanes, state, rows_total, invalid, duplicates, workflow_id,"
        " created_at, finished_at, summary from user_batches where id = %s",
        (user_batch_id,),
    ).fetchone()
    if row is None or (user is not None and row[1] != user):
        raise fail(f"no user batch {user_batch_id}" + (f" for user {user}" if user else ""))
    return row


# ---- dev stack ----------------------------------------------------------------------------


def stack() -> DevStack:
    return DevStack(Path(".dev"), metrics_port=9464)


@dev_app.command("up")
def dev_up(
    worker: Annotated[bool, typer.Option(help="Also start a worker")] = True,
) -> None:
    """Start Postgres, the Temporal dev server (Web UI), the Bouncer sandbox and a worker."""
    st = stack()
    with out.status("starting the embedded stack..."):
        st.up(worker=worker)
    out.print(f"stack up: Temporal {st.temporal_address}, Web UI http://127.0.0.1:{st.ui_port}, "
              f"sandbox {st.sandbox_url}, Postgres {st.pgdata}, "
              + (f"metrics http://127.0.0.1:{st.metrics_port}/metrics" if worker
                 else "no worker (start one with `python worker.py`; it serves the metrics)"))


@dev_app.command("down")
def dev_down() -> None:
    """Stop everything `dev up` started (state stays in .dev/)."""
    stack().down()
    out.print("stack down")


@dev_app.command("status")
def dev_status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which parts of the dev stack are running."""
    st = stack().status()
    if as_json:
        emit_json(st)
    else:
        for k, v in st.items():
            out.print(f"{k:>9}: {v}")


# ---- submit -----------------------------------------------------------------------------


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="CSV file, or one address per line (gzip too; - reads stdin)")],
    user: Annotated[str, typer.Option(help="Owner of the user batch")],
    name: Annotated[Optional[str], typer.Option(help="A label (defaults to the file name; `stdin` or `pipe` for those)")] = None,
    priority: Annotated[Priority, typer.Option(help="Packing priority")] = Priority.normal,
    column: Annotated[Optional[str], typer.Option(help="Email column name or 1-based number")] = None,
    lanes: Annotated[str, typer.Option(help="Comma-separated lanes")] = "deliverability",
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until done")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    at: Annotated[Optional[str], typer.Option("--at", help="Start later, e.g. 2027-06-01T02:00Z")] = None,
    every: Annotated[Optional[str], typer.Option("--every", help="Re-verify the list this often, e.g. 30d")] = None,
    max_age: Annotated[Optional[str], typer.Option(
        "--max-age", help="Reuse only results younger than this, e.g. 7d (default RESULT_TTL_DAYS)")] = None,
) -> None:
    """Stream a list into Postgres (COPY) and start its UserBatchWorkflow (now, --at a time, and --every period)."""
    s = settings()
    start_at, period = _when(at, every, wait)
    max_age_s = _max_age(max_age)
    lane_list = [x.strip() for x in lanes.split(",") if x.strip()]
    bad = [x for x in lane_list if x not in LANES]
    if bad or not lane_list:
        raise fail(f"unknown lane {', '.join(bad) or '(none)'}; lanes are: {', '.join(LANES)}")
    if lane_problem(lane_list, s):
        raise fail(lane_problem(lane_list, s))
    lane_list = in_lane_order(lane_list)
    if not user.strip():
        raise fail("--user is empty: name the list's owner")
    # `-` is stdin; a pipe such as `<(zcat x.gz)` (/dev/fd/63) is read like a file, though not a regular one.
    from_stdin = str(file) == "-"
    label = "stdin" if from_stdin else str(file)
    if not from_stdin and file.is_dir():
        raise fail(f"cannot read {file}: it is a directory, not a file")
    if not from_stdin and not file.exists():
        raise fail(f"cannot read {file}: no such file")
    source = iter(functools.partial(sys.stdin.buffer.read, 1024 * 1024), b"") if from_stdin else file
    # A pipe's path (/dev/fd/63) names nothing the user wrote: such a list is called `pipe` unless --name.
    name = name or ("stdin" if from_stdin else Path(label).name if file.is_file() else "pipe")

    async def run() -> tuple[int, object, float, Summary | None, WorkflowFailureError | None]:
        # Temporal first: an unreachable server must not leave stored rows behind.
        client = await temporal(s)
        from workflows.user_batch import UserBatchWorkflow

        started = time.perf_counter()
        with db_connect(s) as conn:
            try:
                with conn.transaction():
                    (ub_id,) = conn.execute(
                        "insert into user_batches (user_id, name, priority, lanes, source, workflow_id,"
                        " max_result_age_s) values (%s, %s, %s, %s, %s, %s, %s) returning id",
                        (user, name, PRIORITIES.index(priority.value), lane_list, label, None,
                         max_age_s),
                    ).fetchone()
                    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                  console=err, disable=as_json, transient=True) as bar:
                        # A count, not a bar: a pipe's (or a gzip's decompressed) size is not known ahead.
                        task = bar.add_task(f"reading {name}")
                        stats = copy_items(
                            conn, ub_id, source, column, name=label,
                            on_progress=lambda st: bar.update(
                                task, description=f"reading {name}: {st.rows:,} rows"),
                        )
                    if stats.rows == 0:  # rolled back with the row: nothing is stored
                        raise UnreadableInput(f"{label} has no rows (empty, or a header only): nothing to verify")
                    conn.execute(  # `scheduled` until its workflow starts (`--at`)
                        "update user_batches set rows_total = %s, invalid = %s, workflow_id = %s, state = %s"
                        " where id = %s",
                        (stats.rows, stats.invalid, user_batch_workflow_id(ub_id),
                         "scheduled" if start_at else "receiving", ub_id),
                    )
            except UnreadableInput as exc:
                raise fail(str(exc))
        ingest_s = time.perf_counter() - started
        delay = max(start_at - datetime.now(timezone.utc), timedelta(0)) if start_at else None
        try:
            handle = await client.start_workflow(
                UserBatchWorkflow.run, UserBatchInput(ub_id), id=user_batch_workflow_id(ub_id), task_queue=s.task_queue,
                search_attributes=search.at_start(user, priority.value, lane_list[0],
                                                  "scheduled" if start_at else "preparing"),
                static_summary=f"user batch {ub_id} of {user}: {stats.rows:,} rows, priority {priority.value}",
                start_delay=delay,
            )
        except RPCError as exc:
            with db_connect(s) as c, c.transaction():
                c.execute("update user_batches set state = 'failed', finished_at = now() where id = %s", (ub_id,))
                record_event(c, "user_batch.failed", ub_id, user, {"user_batch_id": ub_id, "reason": "workflow did not start"})
            hint = (" (create the search attributes: README, \"Operations\")"
                    if "search attribute" in str(exc).lower() else "")
            raise fail(f"user batch {ub_id} stored but its workflow did not start: {exc}{hint}", 1)
        if period is not None:
            try:
                await schedules.create_recurring(client, s, ub_id, period, start_at or datetime.now(timezone.utc))
            except (RPCError, psycopg.Error) as exc:
                raise fail(f"user batch {ub_id} started, but its schedule was not created: {exc}", 1)
        summary = failure = None
        if wait:
            try:
                summary = await follow(handle, as_json)
            except WorkflowFailureError as exc:  # cancelled, or failed: reported below, with the batch's id
                failure = exc
        return ub_id, stats, ingest_s, summary, failure

    ub_id, stats, ingest_s, summary, failure = asyncio.run(run())
    result = {
        "user_batch_id": ub_id,
        "workflow_id": user_batch_workflow_id(ub_id),
        "rows": stats.rows,
        "invalid": stats.invalid,
        "invalid_rows": stats.invalid_rows,
        "header": stats.header,
        "ingest_s": round(ingest_s, 3),
    }
    if summary is not None:
        result.update(state=summary.state, by_state=summary.by_state, by_status=summary.by_status)
        if summary.by_catchall_status:
            result.update(by_catchall_status=summary.by_catchall_status)
    if start_at is not None:
        result["starts_at"] = start_at.isoformat()
    if period is not None:
        result["schedule_id"] = recurring_schedule_id(ub_id)
    if failure is not None:
        with db_connect(s) as conn:
            state = load_batch(conn, ub_id, None)[5]
        result.update(state=state, error=str(failure.cause or failure))
        if as_json:
            emit_json(result)
        raise fail(f"user batch {ub_id} is {state} (workflow {result['workflow_id']}: {result['error']})", 1)
    if as_json:
        emit_json(result)
    else:
        out.print(f"user batch [bold]{ub_id}[/bold]: {stats.rows:,} rows ({stats.invalid:,} invalid) "
                  f"read in {ingest_s:.1f}s; workflow {result['workflow_id']}"
                  + (f", starts at {start_at:%Y-%m-%d %H:%M:%S %Z}" if start_at else ""))
        print_header(stats)
        print_invalid_rows(ub_id, stats)
        if period is not None:
            out.print(f"re-verified every {schedules.format_duration(period.total_seconds())} by schedule {result['schedule_id']} (`starter.py schedules list`)")
        if summary is not None:
            print_summary(summary)


INVALID_ROWS_PRINTED = 10


def print_header(stats: IngestStats) -> None:
    """The line taken as the header (on stderr): a first row that was data would show here."""
    if (h := stats.header) is not None:
        names = ", ".join(h["names"])
        err.print(f"  header on line {h['line']}: {names[:200]}; addresses from column {h['column']}",
                  highlight=False, markup=False)


def print_invalid_rows(ub_id: int, stats: IngestStats) -> None:
    """The first invalid rows with their line numbers and reasons (on stderr), and where the rest are."""
    for bad in stats.invalid_rows[:INVALID_ROWS_PRINTED]:
        err.print(f"  line {bad['row']:,}: {bad['reason']}", highlight=False, markup=False)
    if stats.invalid > INVALID_ROWS_PRINTED:
        err.print(f"  ... {stats.invalid - INVALID_ROWS_PRINTED:,} more invalid rows: "
                  f"`starter.py results {ub_id} --status invalid`", highlight=False, markup=False)


def _max_age(text: str | None) -> float | None:
    """--max-age in seconds (None: RESULT_TTL_DAYS applies)."""
    if text is None:
        return None
    try:
        return schedules.parse_max_age(text)
    except ValueError as exc:
        raise fail(f"--max-age: {exc}")


def _when(at: str | None, every: str | None, wait: bool) -> tuple[datetime | None, timedelta | None]:
    """Parse --at and --every; refuse a time in the past and --wait with a delayed start."""
    try:
        start_at = schedules.parse_instant(at) if at is not None else None
        period = schedules.parse_duration(every) if every is not None else None
    except ValueError as exc:
        raise fail(str(exc))
    if start_at is not None and start_at <= datetime.now(timezone.utc):
        raise fail(f"--at {at} is in the past; leave it out to start now")
    if start_at is not None and wait:
        raise fail("--wait cannot follow a delayed start; use `starter.py status` later")
    if period is not None and period < timedelta(minutes=1):
        raise fail("--every must be at least 1m")
    return start_at, period


async def follow(handle, quiet: bool) -> Summary:
    """Progress bar from the workflow's `progress` query until it returns (WorkflowFailureError
    if it was cancelled or failed)."""
    result = asyncio.ensure_future(handle.result())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, disable=quiet) as bar:
        task = bar.add_task("preparing", total=None)
        while not result.done():
            try:
                p: BatchProgress | None = await handle.query("progress", result_type=BatchProgress)
            except RPCError:
                p = None
            if p is not None and p.state == "paused":  # its `remaining` counts only the in-flight addresses
                bar.update(task, description="paused (resume to go on): addresses verified")
            elif p is not None and p.lanes:
                unique = sum(lane.unique_addresses for lane in p.lanes)
                bar.update(task, total=unique, completed=unique - p.remaining,
                           description=f"{p.state}: addresses verified")
            await asyncio.wait([result], timeout=0.5)
    return result.result()


def print_summary(summary: Summary) -> None:
    t = Table(title=f"user batch {summary.user_batch_id}: {summary.state}")
    t.add_column("outcome")
    t.add_column("rows", justify="right")
    for k, v in sorted(summary.by_state.items()):
        t.add_row(k, f"{v:,}")
    for k, v in sorted(summary.by_status.items()):
        t.add_row(f"  status {k}", f"{v:,}")
    for k, v in sorted(summary.by_catchall_status.items()):
        t.add_row(f"  catchall {k}", f"{v:,}")
    out.print(t)


# ---- status -----------------------------------------------------------------------------


@app.command()
def status(
    user_batch_id: Annotated[Optional[int], typer.Argument(help="One user batch; omit for the overview")] = None,
    user: Annotated[Optional[str], typer.Option(help="Only this user's batches")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh the overview live")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch)")] = 2.0,
    count: Annotated[int, typer.Option(help="Stop after this many refreshes (--watch; 0: never)")] = 0,
) -> None:
    """A user batch's counts, or the overview of lanes, queues, API use, credits and dead letters.

    The overview also lists in-flight Bouncer batches and recent user batches."""
    if watch and user_batch_id is not None:
        raise fail(f"--watch redraws the overview, not one user batch: leave out {user_batch_id} "
                   "(`starter.py submit --wait` follows a list as it runs)")
    if watch and as_json:
        raise fail("--watch draws a live table; --json prints one object: give one of them")
    if watch and interval <= 0:
        raise fail(f"--interval {interval:g}: give a number of seconds above 0")
    if count < 0:
        raise fail(f"--count {count}: give a number of refreshes >= 0 (0: until Ctrl-C)")
    s = settings()
    with db_connect(s) as conn:
        if user_batch_id is not None:
            row = load_batch(conn, user_batch_id, user)
            lanes = conn.execute(outcomes.LANE_QUERY, (user_batch_id,)).fetchall()
            doc = batch_doc(row, lanes)
            if as_json:
                emit_json(doc)
                return
            t = Table(title=f"user batch {row[0]} ({row[2]}) of {row[1]}: {row[5]}")
            for col in ("lane", "unique", *outcomes.LANE_COLUMNS[2:]):
                t.add_column(col, justify="right" if col != "lane" else "left")
            for ln in lanes:
                t.add_row(ln[0], *(f"{v:,}" for v in ln[1:]))
            out.print(t)
            out.print(f"rows {row[6]:,}: {row[7]:,} invalid, {row[8]:,} duplicates; priority {PRIORITIES[row[3]]}")
            if row[12]:
                out.print(f"outcome: {row[12]}")
            return
    if watch:
        asyncio.run(watch_overview(s, user, interval, count))
        return
    doc = asyncio.run(overview(s, user))
    if as_json:
        emit_json(doc)
        return
    out.print(render_overview(doc))


async def overview(s: Settings, user: str | None) -> dict:
    """Lanes (scheduler status + queue depth), API use, credits, dead letters, recent user batches."""
    try:
        conn = await psycopg.AsyncConnection.connect(s.database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(f"cannot reach Postgres ({first}). Is the stack up (`starter.py dev up`)?", 1)
    async with conn:
        batches = await (await conn.execute(
            "select id, user_id, name, priority, lanes, state, rows_total, invalid, duplicates, workflow_id,"
            " created_at, finished_at, summary from user_batches where (%s::text is null or user_id = %s)"
            " order by id desc limit 20",
            (user, user),
        )).fetchall()
        queued = dict(await (await conn.execute(
            "select q.lane, count(*) from queue q join user_batch_lanes l"
            " on l.user_batch_id = q.user_batch_id and l.lane = q.lane where q.seq >= l.cursor group by 1"
        )).fetchall())
        dead = (await (await conn.execute("select count(*) from dead_letters")).fetchone())[0]
        r = await readings.read(conn, s)
        credits = await (await conn.execute(
            "select value, observed_at from alert_state where name = 'credits'"
        )).fetchone()
    with db_connect(s) as sync_conn:
        users = user_loads(sync_conn, s.max_in_flight_per_user)

    client = await temporal(s)
    lanes = []
    for lane in LANES:
        doc = {"lane": lane, "queued": queued.get(lane, 0), "in_flight_batches": r.in_flight.get(lane, 0)}
        handle = client.get_workflow_handle(scheduler_id(lane))
        try:
            # Only a running scheduler is asked (a query to a closed one waits for a worker to replay it).
            if (await handle.describe()).status != WorkflowExecutionStatus.RUNNING:
                raise LookupError(lane)
            st = await handle.query("status", result_type=SchedulerStatus, rpc_timeout=timedelta(seconds=5))
            # The database's count is exact and current (the workflow's is as of its last pack).
            lanes.append({**st.__dict__, **doc, "running": True})
        except (RPCError, LookupError):
            lanes.append({**doc, "running": False})
    return {
        "lanes": lanes,
        "user_batches": [batch_doc(b, None) for b in batches],
        "dead_letters": dead,
        "api": {b: {"requests_per_minute": r.requests.get(b, 0), "budget_per_minute": r.budgets[b],
                    "utilization": round(r.utilization[b], 3)} for b in r.budgets},
        "credits": {"credits": int(credits[0]), "observed_at": credits[1].isoformat()} if credits else None,
        "users": users,
    }


def render_overview(doc: dict) -> Group:
    t = Table(title="lanes")
    for col in ("lane", "state", "queued", "in flight", "free slots", "dispatched"):
        t.add_column(col)
    for ld in doc["lanes"]:
        if ld["running"]:
            state = f"paused ({ld['pause_reason']})" if ld["paused"] else "running"
            t.add_row(ld["lane"], state, f"{ld['queued']:,}", str(ld["in_flight"]), str(ld["free_slots"]),
                      str(ld["dispatched_batches"]))
        else:
            t.add_row(ld["lane"], "not started", f"{ld['queued']:,}", str(ld["in_flight_batches"]), "-", "-")
    api = Table(title="Bouncer API (all workers)")
    for col in ("budget", "requests this minute", "per minute allowed", "use"):
        api.add_column(col)
    for budget, a in doc["api"].items():
        api.add_row(budget, f"{a['requests_per_minute']:,}", f"{a['budget_per_minute']:,.0f}",
                    f"{a['utilization']:.0%}")
    ub = Table(title="recent user batches")
    for col in ("id", "user", "name", "priority", "state", "rows"):
        ub.add_column(col)
    for b in doc["user_batches"]:
        ub.add_row(str(b["user_batch_id"]), b["user"], b["name"], b["priority"], b["state"], f"{b['rows']:,}")
    c = doc["credits"]
    credits = f"credits: {c['credits']:,} (read {c['observed_at'][:19]}Z)" if c else "credits: not read yet"
    parts = [t, api, ub]
    if doc["users"]:
        us = Table(title="users with work (in-flight addresses per lane against the per-user cap)")
        for col in ("user", *LANES, "queued", "cap"):
            us.add_column(col, justify="left" if col == "user" else "right")
        for u in doc["users"]:
            us.add_row(u["user"], *(f"{u['in_flight'].get(lane, 0):,}" for lane in LANES), f"{u['queued']:,}",
                       f"{u['cap']:,}" if u["cap"] else "none")
        parts.append(us)
    return Group(*parts, Text(f"{credits}; dead letters: {doc['dead_letters']:,}"))


async def watch_overview(s: Settings, user: str | None, interval: float, count: int) -> None:
    """Redraw the overview every `interval` seconds (`count` times; 0: until Ctrl-C)."""
    with Live(console=out, auto_refresh=False) as live:
        n = 0
        while True:
            doc = await overview(s, user)
            stamp = Text(time.strftime("%H:%M:%S") + f"  (every {interval:g} s, Ctrl-C to stop)", style="dim")
            live.update(Group(stamp, render_overview(doc)), refresh=True)
            n += 1
            if count and n >= count:
                return
            await asyncio.sleep(interval)


def user_loads(conn: psycopg.Connection, default_cap: int) -> list[dict]:
    """Per user with work: addresses in flight per lane (open Bouncer batches), unclaimed queued
    addresses, and the cap the packer holds them to (`user_limits`, else MAX_IN_FLIGHT_PER_USER)."""
    rows = conn.execute(
        """
        with flying as (
            select b.user_id, bb.lane, sum(p.addresses) as n
            from bouncer_batches bb join bouncer_batch_parts p on p.bouncer_batch_id = bb.id
            join user_batches b on b.id = p.user_batch_id
            where bb.state in ('packed', 'submitting', 'submitted') group by 1, 2),
        queued as (
            select b.user_id, count(*) as n from queue q
            join user_batch_lanes l on l.user_batch_id = q.user_batch_id and l.lane = q.lane and q.seq >= l.cursor
            join user_batches b on b.id = q.user_batch_id group by 1),
        users as (select user_id from flying union select user_id from queued)
        select u.user_id, coalesce(jsonb_object_agg(f.lane, f.n) filter (where f.lane is not null), '{}'),
               coalesce(max(q.n), 0), coalesce(max(ul.max_in_flight), %s)
        from users u left join flying f using (user_id) left join queued q using (user_id)
        left join user_limits ul using (user_id)
        group by 1 order by 1
        """,
        (default_cap,),
    ).fetchall()
    return [{"user": u, "in_flight": {k: int(v) for k, v in fl.items()}, "queued": int(q), "cap": int(cap) or None}
            for u, fl, q, cap in rows]


@app.command()
def cap(
    user: Annotated[str, typer.Argument(help="The user to cap")],
    max_in_flight: Annotated[Optional[int], typer.Argument(help="Addresses in flight per lane; 0: no cap")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Back to MAX_IN_FLIGHT_PER_USER")] = False,
) -> None:
    """Set one user's cap on in-flight addresses (packing holds the rest back), or show it."""
    s = settings()
    if not user.strip():
        raise fail("the user is empty: name whose cap to set or show")
    if max_in_flight is not None and max_in_flight < 0:
        raise fail(f"cap {max_in_flight} is negative: give a number of addresses >= 0 (0: no cap), or --clear")
    if max_in_flight is not None and clear:
        raise fail("give a cap or --clear, not both")
    with db_connect(s) as conn:
        if clear:
            conn.execute("delete from user_limits where user_id = %s", (user,))
        elif max_in_flight is not None:
            conn.execute(
                "insert into user_limits (user_id, max_in_flight) values (%s, %s)"
                " on conflict (user_id) do update set max_in_flight = excluded.max_in_flight",
                (user, max_in_flight),
            )
        row = conn.execute("select max_in_flight from user_limits where user_id = %s", (user,)).fetchone()
    current = row[0] if row else s.max_in_flight_per_user
    source = "user_limits" if row else "MAX_IN_FLIGHT_PER_USER"
    out.print(f"user {user}: " + (f"at most {current:,} addresses in flight per lane" if current else "no cap")
              + f" ({source})")


def batch_doc(row: tuple, lanes: list | None) -> dict:
    doc = {
        "user_batch_id": row[0], "user": row[1], "name": row[2], "priority": PRIORITIES[row[3]],
        "lanes": list(row[4]), "state": row[5], "rows": row[6], "invalid": row[7], "duplicates": row[8],
        "workflow_id": row[9], "created_at": row[10].isoformat(),
        "finished_at": row[11].isoformat() if row[11] else None, "summary": row[12],
    }
    if lanes is not None:
        doc |= outcomes.lane_progress(lanes)
    return doc


# ---- results ----------------------------------------------------------------------------

@app.command()
def results(
    user_batch_id: Annotated[int, typer.Argument()],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="File to write (default stdout)")] = None,
    status_text: Annotated[Optional[str], typer.Option(
        "--status", help="Only rows with this status or state, e.g. deliverable, invalid (several: deliverable,risky)")
    ] = None,
    columns_text: Annotated[Optional[str], typer.Option(
        "--columns", help="Only these columns, in this order, e.g. email,status,reason")] = None,
    fmt: Annotated[Format, typer.Option("--format")] = Format.csv,
    user: Annotated[Optional[str], typer.Option(help="Refuse batches of other users")] = None,
) -> None:
    """Stream a user batch's per-row results (CSV, JSON or JSON Lines) in input order."""
    try:
        status_filter = outcomes.status_filter(status_text)
    except ValueError as exc:
        raise fail(f"--{exc}") from None
    s = settings()
    with db_connect(s) as conn:
        batch = load_batch(conn, user_batch_id, user)
        try:
            columns = outcomes.chosen_columns(columns_text, outcomes.columns(batch[4]))
        except ValueError as exc:
            raise fail(f"--columns: {exc}") from None
        try:
            sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
        except OSError as exc:
            raise fail(f"cannot write {output}: {exc.strerror or exc}") from None
        params = {"ub": user_batch_id, "f": status_filter}
        n = 0
        closed = False
        # A bar while a file is written (stdout carries the rows); its total is known without a filter.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, disable=output is None, transient=True) as bar:
            task = bar.add_task(f"writing {output.name if output else ''}", total=None if status_filter else batch[6])
            try:
                if fmt is Format.csv:
                    sink.write(outcomes.csv_header(columns))
                    # COPY streams the rows as Postgres renders them, one message per row.
                    with conn.cursor().copy(outcomes.csv_copy(columns), params) as copy:
                        for data in copy:
                            sink.write(data)
                            n += 1
                            if not n % 10_000:
                                bar.update(task, completed=n)
                else:
                    with conn.cursor(name="results") as cur:  # server-side: never the whole list in memory
                        cur.execute(outcomes.json_query(columns), params)
                        opening, closing = outcomes.JSON_FRAMES[fmt.value]
                        sink.write(opening)
                        while docs := cur.fetchmany(10_000):
                            sink.write(outcomes.json_chunk([d for (d,) in docs], not n, fmt.value))
                            n += len(docs)
                            bar.update(task, completed=n)
                        sink.write(closing)
                if not output:
                    sink.flush()
            except BrokenPipeError:
                if output:
                    raise
                closed = True  # `results ... | head`: the reader has what it wanted
            finally:
                if output:
                    sink.close()
    if closed:
        # Later flushes of stdout would fail again: point it at /dev/null, and end as a success.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if output:
        err.print(f"{n:,} rows written to {output}")


# ---- control ------------------------------------------------------------------------------


def _control(user_batch_id: Optional[int], lane: Optional[str], user: Optional[str], pause: bool) -> None:
    s = settings()
    if user_batch_id is None and lane is None:
        raise fail(f"give a USER_BATCH_ID, or --lane L for a whole lane (lanes: {', '.join(LANES)})")
    if user_batch_id is not None and lane is not None:
        raise fail("give a USER_BATCH_ID or --lane, not both")
    if lane is not None and lane not in LANES:
        raise fail(f"unknown lane {lane}; lanes are: {', '.join(LANES)}")
    if user_batch_id is not None:
        with db_connect(s) as conn:
            row = load_batch(conn, user_batch_id, user)
        if row[5] in FINISHED_STATES:
            raise fail(f"user batch {user_batch_id} is {row[5]}; it cannot be {'paused' if pause else 'resumed'}")

    async def go() -> None:
        client = await temporal(s)
        if lane is not None:
            from workflows.models import LanePause

            from activities.user_batches import scheduler_input
            from workflows.scheduler import GreedySchedulerWorkflow

            try:
                # Signal-with-start: a lane can be paused before its scheduler ever ran.
                await client.start_workflow(
                    GreedySchedulerWorkflow.run,
                    scheduler_input(s, lane),
                    id=scheduler_id(lane),
                    task_queue=s.task_queue,
                    start_signal="pause" if pause else "resume",
                    start_signal_args=[LanePause("paused by operator")] if pause else [],
                    static_summary=scheduler_summary(lane),
                )
            except RPCError as exc:
                raise fail(f"lane {lane} could not be {'paused' if pause else 'resumed'}: {exc.message}", 1)
            out.print(f"lane {lane} {'paused' if pause else 'resumed'}")
            return
        handle = client.get_workflow_handle(row[9])
        if due := await temporal_client.not_started_before(handle):
            raise fail(f"user batch {user_batch_id} starts at {due:%Y-%m-%d %H:%M:%S %Z}; nothing to "
                       f"{'pause' if pause else 'resume'} before then (`starter.py cancel {user_batch_id}` drops it)")
        if row[5] in ("receiving", "preparing"):  # the workflow applies it once the list is queued
            err.print(f"user batch {user_batch_id} is {row[5]}: the {'pause' if pause else 'resume'} waits until "
                      "its rows are queued")
        try:
            p = await handle.execute_update("pause" if pause else "resume", result_type=BatchProgress)
        except Exception as exc:  # noqa: BLE001 - one line for the user, not a traceback
            raise fail(f"user batch {user_batch_id} cannot be {'paused' if pause else 'resumed'}: {exc}", 1)
        out.print(f"user batch {user_batch_id} is {p.state}")

    asyncio.run(go())


@app.command()
def pause(
    user_batch_id: Annotated[Optional[int], typer.Argument()] = None,
    lane: Annotated[Optional[str], typer.Option(help="Pause a whole lane instead")] = None,
    user: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """Pause a user batch (its queued addresses are skipped) or a lane (nothing new is dispatched)."""
    _control(user_batch_id, lane, user, True)


@app.command()
def resume(
    user_batch_id: Annotated[Optional[int], typer.Argument()] = None,
    lane: Annotated[Optional[str], typer.Option(help="Resume a whole lane instead")] = None,
    user: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """Resume a paused user batch or lane."""
    _control(user_batch_id, lane, user, False)


@app.command()
def cancel(
    user_batch_id: Annotated[int, typer.Argument()],
    user: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """Cancel a user batch: queued addresses are withdrawn, unresolved rows end `cancelled`."""
    s = settings()
    with db_connect(s) as conn:
        row = load_batch(conn, user_batch_id, user)
    if row[5] in FINISHED_STATES:
        raise fail(f"user batch {user_batch_id} is already {row[5]}")

    async def go() -> None:
        client = await temporal(s)
        handle = client.get_workflow_handle(row[9])
        try:
            await handle.cancel()
        except RPCError as exc:
            raise fail(f"user batch {user_batch_id} cannot be cancelled: {exc.message}", 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            desc = await handle.describe()
            if desc.status is not None and desc.status.name != "RUNNING":
                with db_connect(s) as conn:
                    out.print(f"user batch {user_batch_id}: {load_batch(conn, user_batch_id, user)[5]}")
                return
            await asyncio.sleep(0.3)
        out.print(f"user batch {user_batch_id}: cancellation requested")

    asyncio.run(go())


# ---- events to subscribers ---------------------------------------------------------------------

events_app = typer.Typer(no_args_is_help=True, help="Webhook subscriptions to events, and their deliveries.")
app.add_typer(events_app, name="events")


@events_app.command("subscribe")
def events_subscribe(
    topic: Annotated[str, typer.Option(help=f"One of {', '.join(TOPICS)}, a `prefix.*`, or `*`")],
    url: Annotated[str, typer.Option(help="http(s) URL that receives signed POSTs")],
    secret: Annotated[str, typer.Option(help="HMAC-SHA256 key the receiver verifies signatures with")],
    user: Annotated[Optional[str], typer.Option(help="Only this user's events (default: everyone's)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Subscribe a webhook to a topic; every matching event is POSTed to it, signed, with retries."""
    known = topic == "*" or topic in TOPICS or topic.startswith("alert.") or (
        topic.endswith(".*") and any(t.startswith(topic[:-1]) for t in TOPICS))
    if not known:
        raise fail(f"unknown topic {topic!r}; topics are: {', '.join(TOPICS)} (or `prefix.*`, `*`)")
    if problem := _url_problem(url):
        raise fail(f"url {url!r} {problem}")
    if user is not None and not user.strip():
        raise fail("--user is empty: name the user whose events go to this URL, or leave it out for everyone's")
    if len(secret) < 16:
        raise fail("the secret must have at least 16 characters")
    with db_connect(settings()) as conn:
        (sub_id,) = conn.execute(
            "insert into subscriptions (topic, url, secret, user_id) values (%s, %s, %s, %s) returning id",
            (topic, url, secret, user),
        ).fetchone()
    if as_json:
        emit_json({"subscription_id": sub_id, "topic": topic, "url": url, "user": user})
    else:
        out.print(f"subscription {sub_id}: {topic} -> {url}" + (f" (user {user})" if user else ""))


def _url_problem(url: str) -> str:
    """Why a webhook URL cannot be POSTed to ('' if it can)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError as exc:
        return f"is not a URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http(s) URL with a host, e.g. https://hooks.example.com/bouncer"
    if any(c.isspace() for c in url):
        return "contains whitespace"
    return ""


@events_app.command("unsubscribe")
def events_unsubscribe(subscription_id: Annotated[int, typer.Argument()]) -> None:
    """Remove a subscription; its undelivered events are marked failed ('unsubscribed')."""
    with db_connect(settings()) as conn, conn.transaction():
        row = conn.execute("delete from subscriptions where id = %s returning topic, url", (subscription_id,)).fetchone()
        if row is None:
            raise fail(f"no subscription {subscription_id}")
        conn.execute("update deliveries set state = 'failed', last_error = 'unsubscribed'"
                     " where subscription_id = %s and state = 'pending'", (subscription_id,))
    out.print(f"subscription {subscription_id} ({row[0]} -> {row[1]}) removed")


DELIVERY_STATES = ("pending", "delivered", "failed")


@events_app.command("list")
def events_list(
    state: Annotated[Optional[str], typer.Option(help="Only deliveries in this state: pending, delivered, failed")]
    = None,
    limit: Annotated[int, typer.Option(help="Most recent deliveries shown")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Subscriptions, and the most recent deliveries with their state, attempts and last error."""
    if state is not None and state not in DELIVERY_STATES:
        raise fail(f"--state {state!r} is not one of {', '.join(DELIVERY_STATES)}")
    if limit < 1:
        raise fail(f"--limit {limit}: show at least 1")
    with db_connect(settings()) as conn:
        subs = conn.execute("select id, topic, url, user_id, created_at from subscriptions order by id").fetchall()
        deliveries = conn.execute(
            "select d.id, d.event_id, e.kind, e.user_batch_id, d.subscription_id, d.state, d.attempts, d.last_status,"
            " d.last_error, e.created_at, d.delivered_at from deliveries d join events e on e.id = d.event_id"
            " where %(s)s::text is null or d.state = %(s)s order by d.id desc limit %(n)s",
            {"s": state, "n": limit},
        ).fetchall()
        pending_events = conn.execute("select count(*) from events where not fanned_out").fetchone()[0]
    keys = ("delivery_id", "event_id", "topic", "user_batch_id", "subscription_id", "state", "attempts",
            "last_status", "last_error", "event_at", "delivered_at")
    docs = [dict(zip(keys, (*d[:9], d[9].isoformat(), d[10].isoformat() if d[10] else None))) for d in deliveries]
    if as_json:
        emit_json({
            "subscriptions": [{"subscription_id": i, "topic": t, "url": u, "user": us, "created_at": c.isoformat()}
                              for i, t, u, us, c in subs],
            "deliveries": docs, "events_not_fanned_out": pending_events,
        })
        return
    t = Table(title="subscriptions")
    for col in ("id", "topic", "url", "user"):
        t.add_column(col)
    for i, topic, url, user, _c in subs:
        t.add_row(str(i), topic, url, user or "(all)")
    out.print(t)
    t = Table(title="deliveries (newest first)")
    for col in ("id", "event", "topic", "user batch", "sub", "state", "attempts", "last"):
        t.add_column(col)
    for d in docs:
        last = str(d["last_status"] or "") if d["state"] == "delivered" else (d["last_error"] or "")
        t.add_row(str(d["delivery_id"]), str(d["event_id"]), d["topic"], str(d["user_batch_id"] or "-"),
                  str(d["subscription_id"]), d["state"], str(d["attempts"]), last[:60])
    out.print(t)


@events_app.command("retry")
def events_retry(
    delivery_ids: Annotated[Optional[list[int]], typer.Argument(help="Deliveries to send again")] = None,
    all_failed: Annotated[bool, typer.Option("--failed", help="Every failed (dead-lettered) delivery")] = False,
) -> None:
    """Send failed deliveries again (each gets a fresh set of attempts)."""
    if not delivery_ids and not all_failed:
        raise fail("give DELIVERY_ID... or --failed")
    with db_connect(settings()) as conn, conn.transaction():
        if delivery_ids:
            found = {i: (state, live) for i, state, live in conn.execute(
                "select d.id, d.state, exists (select 1 from subscriptions s where s.id = d.subscription_id)"
                " from deliveries d where d.id = any(%s)", (delivery_ids,))}
            if missing := [i for i in delivery_ids if i not in found]:
                raise fail(f"no delivery {', '.join(map(str, missing))} (`starter.py events list` shows them)")
            if not_failed := [f"{i} is {found[i][0]}" for i in delivery_ids if found[i][0] != "failed"]:
                raise fail(f"only failed deliveries are sent again: {', '.join(not_failed)}")
            if orphans := [str(i) for i in delivery_ids if not found[i][1]]:
                raise fail(f"delivery {', '.join(orphans)}: its subscription was removed")
        n = requeue_failed(conn, delivery_ids or [], all_failed)
    out.print(f"{n} deliveries queued again")


# ---- health -------------------------------------------------------------------------------


@app.command()
def health(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False) -> None:
    """Check every part against the alert thresholds. Exit code 0 healthy, 1 degraded, 2 down.

    Covers Temporal, Postgres, schema, workers, schedulers, Bouncer, credits, backlog, failures, rate limits.

    Crossing a threshold (or clearing it) records one event in `events`."""
    from ops.health import check
    from worker import bouncer_client

    s = settings()
    report = asyncio.run(check(s, lambda lane: bouncer_client(s, lane)))
    if as_json:
        emit_json(report.as_dict())
    else:
        colors = {"ok": "green", "degraded": "yellow", "down": "red"}
        t = Table(title=f"health: {report.status}")
        t.add_column("check")
        t.add_column("status")
        t.add_column("detail")
        for c in report.checks:
            t.add_row(c.name, f"[{colors[c.status]}]{c.status}[/]", c.detail)
        out.print(t)
        for a in report.alerts:
            if a["changed"]:
                out.print(f"alert {a['name']} {'raised' if a['firing'] else 'cleared'} (event recorded)")
    raise typer.Exit(report.exit_code)


# ---- recurring lists (Temporal Schedules) ---------------------------------------------------

schedules_app = typer.Typer(no_args_is_help=True, help="Recurring lists: `submit --every` schedules.")
app.add_typer(schedules_app, name="schedules")


@schedules_app.command("list")
def schedules_list(
    user: Annotated[Optional[str], typer.Option(help="Only this user's lists")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Recurring lists: schedule id, period, runs so far, next run, paused."""
    s = settings()

    async def go() -> list[dict]:
        return await schedules.list_recurring(await temporal(s), s, user)

    found = asyncio.run(go())
    if as_json:
        emit_json(found)
        return
    t = Table(title="recurring lists")
    t.add_column("schedule", no_wrap=True, min_width=len("recurring-list-") + 4)  # every command needs it whole
    for col in ("user", "every", "runs", "latest batch", "next run", "state"):
        t.add_column(col)
    for d in found:
        state = "paused" if d["paused"] else ("active" if d["paused"] is False else d["note"])
        t.add_row(d["schedule_id"], d["user"], d["every"], str(d["runs"]), str(d["latest_user_batch_id"]),
                  d["next_run"] or "-", state)
    out.print(t)


def _schedule_action(schedule_id: str, user: Optional[str], verb: str) -> None:
    s = settings()
    try:
        schedules.owned_schedule(s, schedule_id, user)
    except LookupError as exc:
        raise fail(str(exc))
    except psycopg.OperationalError:
        db_connect(s)  # one-line error naming Postgres

    async def go() -> None:
        client = await temporal(s)
        handle = client.get_schedule_handle(schedule_id)
        try:
            if verb == "paused":
                await handle.pause(note="paused with starter.py")
            elif verb == "unpaused":
                await handle.unpause(note="unpaused with starter.py")
            elif verb == "triggered":
                await handle.trigger()
            else:
                await schedules.delete_recurring(client, s, schedule_id)
        except RPCError as exc:
            raise fail(f"schedule {schedule_id} could not be {verb}: {exc.message}", 1)

    asyncio.run(go())
    out.print(f"schedule {schedule_id} {verb}")


@schedules_app.command("pause")
def schedules_pause(schedule_id: str, user: Annotated[Optional[str], typer.Option()] = None) -> None:
    """No runs until unpaused (a run in progress finishes)."""
    _schedule_action(schedule_id, user, "paused")


@schedules_app.command("unpause")
def schedules_unpause(schedule_id: str, user: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Resume a paused recurring list."""
    _schedule_action(schedule_id, user, "unpaused")


@schedules_app.command("trigger")
def schedules_trigger(schedule_id: str, user: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Run it now (skipped if the previous run is still verifying)."""
    _schedule_action(schedule_id, user, "triggered")


@schedules_app.command("delete")
def schedules_delete(schedule_id: str, user: Annotated[Optional[str], typer.Option()] = None) -> None:
    """Stop re-verifying: the schedule goes; its user batches stay until cleanup."""
    _schedule_action(schedule_id, user, "deleted")


# ---- cleanup ----------------------------------------------------------------------------------


@app.command()
def clean(
    older_than: Annotated[str, typer.Option("--older-than", help="Retention, e.g. 30d")] = "",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the cleanup workflow now and print what it deleted (default: CLEANUP_RETENTION_DAYS)."""
    s = settings()
    try:
        days = schedules.parse_duration(older_than).total_seconds() / 86400 if older_than else s.cleanup_retention_days
    except ValueError as exc:
        raise fail(str(exc))

    async def go():
        from workflows.models import CleanupInput

        client = await temporal(s)
        try:
            return await client.execute_workflow(
                CleanupWorkflow.run, CleanupInput(days, s.result_ttl_days, s.cleanup_chunk_rows),
                id=f"cleanup-manual-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}", task_queue=s.task_queue,
            )
        except WorkflowFailureError as exc:
            raise fail(f"cleanup failed: {exc.cause}", 1)

    from workflows.cleanup import KINDS, CleanupWorkflow

    summary = asyncio.run(go())
    if as_json:
        emit_json(summary.__dict__)
        return
    out.print(f"deleted what finished before {summary.cutoff}; results verified before {summary.results_cutoff}")
    t = Table(title=f"cleanup: {summary.chunks} chunks")
    t.add_column("kind")
    t.add_column("rows deleted", justify="right")
    t.add_row("user batches", f"{summary.user_batches:,}")
    for kind in KINDS:
        t.add_row(kind, f"{summary.deleted.get(kind, 0):,}")
    out.print(t)


# ---- API keys ---------------------------------------------------------------------------------

apikeys_app = typer.Typer(no_args_is_help=True, help="API keys of the HTTP API (hashed at rest).")
app.add_typer(apikeys_app, name="apikeys")


@apikeys_app.command("create")
def apikeys_create(
    user: Annotated[str, typer.Option(help="The user whose batches the key sees")],
    admin: Annotated[bool, typer.Option("--admin", help="May also pause/resume lanes")] = False,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from api import keys

    with db_connect(settings()) as conn:
        try:
            key_id, key = keys.create_key(conn, user, admin)
        except ValueError as exc:
            raise fail(str(exc))
    err.print(f"key {key_id} for {user}{' (admin)' if admin else ''}; store it now, it is not shown again:")
    print(key)


@apikeys_app.command("list")
def apikeys_list(
    user: Annotated[Optional[str], typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Keys (id, user, prefix, created, revoked); never the keys themselves."""
    from api import keys

    with db_connect(settings()) as conn:
        found = keys.list_keys(conn, user)
    if as_json:
        emit_json(found)
        return
    t = Table(title="API keys")
    for col in ("id", "user", "prefix", "admin", "created", "revoked"):
        t.add_column(col)
    for k in found:
        t.add_row(str(k["id"]), k["user"], k["prefix"] + "...", "yes" if k["admin"] else "",
                  k["created_at"][:19], (k["revoked_at"] or "")[:19])
    out.print(t)


@apikeys_app.command("revoke")
def apikeys_revoke(key_id: int) -> None:
    """Revoke a key: the API refuses it from the next request on."""
    from api import keys

    with db_connect(settings()) as conn:
        if not keys.revoke_key(conn, key_id):
            raise fail(f"no live key {key_id} (`starter.py apikeys list`)")
    out.print(f"key {key_id} revoked")
# ---- dead letters -------------------------------------------------------------------------


def _dlq_selection(conn: psycopg.Connection, user_batch_id: int | None, lane: str | None, user: str | None,
                   require: bool):
    from activities.dead_letters import Selection

    if require and user_batch_id is None and lane is None:
        raise fail("give --user-batch ID or --lane L (what to act on)")
    if lane is not None and lane not in LANES:
        raise fail(f"unknown lane {lane}; lanes are: {', '.join(LANES)}")
    if user_batch_id is not None:
        load_batch(conn, user_batch_id, user)
    return Selection(user_batch_id=user_batch_id, lane=lane, user=user)


UserBatchOpt = Annotated[Optional[int], typer.Option("--user-batch", help="Only addresses of this user batch")]
LaneOpt = Annotated[Optional[str], typer.Option(help="Only this lane")]
UserOpt = Annotated[Optional[str], typer.Option(help="Only this user's batches")]


@dlq_app.command("list")
def dlq_list(
    user_batch_id: UserBatchOpt = None,
    lane: LaneOpt = None,
    user: UserOpt = None,
    limit: Annotated[int, typer.Option(help="Show at most this many")] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead letters with their reason, attempt count and the user batches whose rows they failed."""
    from activities.dead_letters import count_dead_letters, list_dead_letters

    if limit < 1:
        raise fail(f"--limit {limit}: show at least 1")
    with db_connect(settings()) as conn:
        sel = _dlq_selection(conn, user_batch_id, lane, user, require=False)
        total = count_dead_letters(conn, sel)
        rows = list_dead_letters(conn, sel, limit)
    if as_json:
        emit_json({"total": total, "dead_letters": [
            {**r, "created_at": r["created_at"].isoformat(), "user_batches": list(r["user_batches"])} for r in rows]})
        return
    t = Table(title=f"dead letters: {total:,}" + (f" (first {len(rows):,})" if total > len(rows) else ""))
    for col in ("id", "lane", "address", "user batches", "bouncer batch", "attempts", "reason", "since"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["id"]), r["lane"], r["email"], ",".join(map(str, r["user_batches"])) or "-",
                  str(r["bouncer_batch_id"] or "-"), str(r["attempts"]), r["reason"],
                  r["created_at"].strftime("%Y-%m-%d %H:%M"))
    out.print(t)


@dlq_app.command("retry")
def dlq_retry(
    user_batch_id: UserBatchOpt = None,
    lane: LaneOpt = None,
    user: UserOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Send dead-lettered addresses again through the normal path.

    Their user batches wait for them (a completed one is reopened and finalizes again)."""
    from activities.dead_letters import requeue_dead_letters, wake_after_retry

    s = settings()
    with db_connect(s) as conn:
        sel = _dlq_selection(conn, user_batch_id, lane, user, require=True)

    async def go() -> tuple[int, list]:
        client = await temporal(s)  # before changing anything: a retry must not strand rows
        with db_connect(s) as conn:
            retried, touched, lanes = requeue_dead_letters(conn, sel)
        try:
            await wake_after_retry(client, s, touched, lanes)
        except RuntimeError as exc:
            raise fail(str(exc), 1)
        return retried, touched

    retried, touched = asyncio.run(go())
    if as_json:
        emit_json({"retried": retried, "user_batches": [t.__dict__ for t in touched]})
        return
    out.print(f"{retried:,} dead letters re-queued for {len(touched)} user batches"
              + "".join(f"; {t.user_batch_id}: {t.addresses:,}" + (" (reopened)" if t.was_completed else "")
                        for t in touched))


@dlq_app.command("purge")
def dlq_purge(
    user_batch_id: UserBatchOpt = None,
    lane: LaneOpt = None,
    user: UserOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete dead letters (their rows stay `failed`)."""
    from activities.dead_letters import purge_dead_letters

    with db_connect(settings()) as conn:
        sel = _dlq_selection(conn, user_batch_id, lane, user, require=True)
        n = purge_dead_letters(conn, sel)
    if as_json:
        emit_json({"purged": n})
    else:
        out.print(f"{n:,} dead letters purged")


def main() -> None:
    code = 0
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # The Temporal SDK's native runtime threads can abort the interpreter's finalization
    # ("PyGILState_Release ... finalizing"); all work is done and flushed, so leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

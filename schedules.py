"""Temporal Schedules of the pipeline, from the client side: recurring lists and daily cleanup.

- `submit --every 30d` registers the list in `recurring_lists` and creates the Schedule
  `recurring-list-<user batch id>`, whose action is RecurringListWorkflow (copy the stored rows
  into a new user batch, verify it). Overlap policy SKIP: a run due while the previous one still
  verifies is skipped, not stacked.
- The cleanup Schedule `cleanup-daily` runs CleanupWorkflow on CLEANUP_CRON; every worker
  installs (or updates) it at start, so the settings of the newest deployment win.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import psycopg
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleState,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from settings import Settings
from workflows.models import CLEANUP_SCHEDULE_ID, CleanupInput, RecurringRun, recurring_schedule_id

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = timedelta(days=100 * 365)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w`, `45s`, or a sum like `1d12h`."""
    compact = re.sub(r"\s", "", text.lower())
    if not re.fullmatch(r"(\d+(\.\d+)?[smhdw])+", compact):
        raise ValueError(f"cannot read duration {text!r}: use a number and a unit, e.g. 30d, 12h, 90m, 2w")
    seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"([\d.]+)([smhdw])", compact))
    if seconds > MAX_DURATION.total_seconds():  # beyond this, dates overflow (Postgres, Temporal, Python)
        raise ValueError(f"duration {text!r} is longer than {MAX_DURATION.days // 365} years")
    return timedelta(seconds=seconds)


MIN_MAX_AGE = timedelta(minutes=1)


def parse_max_age(text: str) -> float:
    """A list's `max_result_age_s` from `7d`, `12h`...: results older than this are verified again.
    At least a minute: a result must still count as fresh when the store that wrote it looks."""
    age = parse_duration(text)
    if age < MIN_MAX_AGE:
        raise ValueError(f"{text!r} is shorter than 1m")
    return age.total_seconds()


def format_duration(seconds: float) -> str:
    """What `parse_duration` reads, in days and smaller units: 2592000 -> `30d`, 5400 -> `1h30m`."""
    rest, parts = round(seconds), []
    for unit in "dhms":
        n, rest = divmod(rest, _UNITS[unit])
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts) or "0s"


def parse_instant(text: str) -> datetime:
    """ISO 8601 (`2027-06-01T02:00Z`); a time without a zone is UTC."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read time {text!r}: use ISO 8601, e.g. 2027-06-01T02:00Z") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def interval_spec(every: timedelta, anchor: datetime) -> ScheduleSpec:
    """Fire every `every` counted from `anchor` (not from the epoch), starting at anchor + every.

    Temporal aligns intervals to the epoch; the offset shifts that grid onto the anchor, and
    start_at past the anchor leaves out the run at the anchor itself (the submission covers it).
    """
    offset = timedelta(seconds=(anchor - EPOCH).total_seconds() % every.total_seconds())
    return ScheduleSpec(intervals=[ScheduleIntervalSpec(every=every, offset=offset)],
                        start_at=anchor + timedelta(seconds=1))


async def create_recurring(client: Client, settings: Settings, user_batch_id: int, every: timedelta,
                           anchor: datetime) -> str:
    """Register user batch `user_batch_id` as a recurring list and create its Schedule."""
    if every < timedelta(minutes=1):
        raise ValueError("--every must be at least 1m")
    schedule_id = recurring_schedule_id(user_batch_id)
    with psycopg.connect(settings.database_url) as conn:
        (user_id,) = conn.execute("select user_id from user_batches where id = %s", (user_batch_id,)).fetchone()
        conn.execute(
            "insert into recurring_lists (schedule_id, user_id, source_user_batch_id, latest_user_batch_id, every_s)"
            " values (%s, %s, %s, %s, %s)",
            (schedule_id, user_id, user_batch_id, user_batch_id, int(every.total_seconds())),
        )
        from workflows.recurring import RecurringListWorkflow

        # Inside the transaction: if the schedule cannot be created, the registration rolls back.
        await client.create_schedule(
            schedule_id,
            Schedule(
                action=ScheduleActionStartWorkflow(
                    RecurringListWorkflow.run, RecurringRun(schedule_id), id=f"{schedule_id}-run",
                    task_queue=settings.task_queue,
                ),
                spec=interval_spec(every, anchor),
                policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=1)),
                state=ScheduleState(note=f"re-verifies user batch {user_batch_id}'s list every "
                                         f"{format_duration(every.total_seconds())}"),
            ),
        )
    return schedule_id


async def list_recurring(client: Client, settings: Settings, user: str | None = None) -> list[dict]:
    """Registered recurring lists with their Schedule's state (paused, next run, runs so far)."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "select schedule_id, user_id, source_user_batch_id, latest_user_batch_id, every_s, runs, created_at"
            " from recurring_lists where %(u)s::text is null or user_id = %(u)s order by created_at",
            {"u": user},
        ).fetchall()
    found = []
    for sid, uid, source, latest, every_s, runs, created in rows:
        doc = {"schedule_id": sid, "user": uid, "source_user_batch_id": source, "latest_user_batch_id": latest,
               "every": format_duration(every_s), "runs": runs, "created_at": created.isoformat()}
        try:
            desc = await client.get_schedule_handle(sid).describe()
            nxt = desc.info.next_action_times
            paused = desc.schedule.state.paused
            doc.update(paused=paused, note=desc.schedule.state.note or "",
                       next_run=nxt[0].isoformat() if nxt and not paused else None)  # paused: none is due
        except Exception as exc:  # noqa: BLE001 - a row without its schedule is shown, not hidden
            doc.update(paused=None, note=f"schedule missing: {exc}", next_run=None)
        found.append(doc)
    return found


def owned_schedule(settings: Settings, schedule_id: str, user: str | None) -> None:
    """Raise LookupError unless `schedule_id` is a registered recurring list (of `user`, if given)."""
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("select user_id from recurring_lists where schedule_id = %s", (schedule_id,)).fetchone()
    if row is None or (user is not None and row[0] != user):
        raise LookupError(f"no recurring list {schedule_id}" + (f" for user {user}" if user else ""))


async def delete_recurring(client: Client, settings: Settings, schedule_id: str) -> None:
    """Delete the Schedule, then the registration (its user batches stay, like any others)."""
    try:
        await client.get_schedule_handle(schedule_id).delete()
    except Exception as exc:  # noqa: BLE001
        if "not found" not in str(exc).lower():
            raise
    with psycopg.connect(settings.database_url) as conn:
        conn.execute("delete from recurring_lists where schedule_id = %s", (schedule_id,))


def cleanup_schedule(settings: Settings) -> Schedule:
    from workflows.cleanup import CleanupWorkflow

    return Schedule(
        action=ScheduleActionStartWorkflow(
            CleanupWorkflow.run,
            CleanupInput(settings.cleanup_retention_days, settings.result_ttl_days, settings.cleanup_chunk_rows),
            id=f"{CLEANUP_SCHEDULE_ID}-run",
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(cron_expressions=[settings.cleanup_cron]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(hours=6)),
        state=ScheduleState(note=f"deletes what is older than {settings.cleanup_retention_days:g} days"),
    )


async def install_cleanup_schedule(client: Client, settings: Settings) -> str:
    """Create the daily cleanup Schedule, or bring an existing one to these settings.

    Idempotent (every worker calls it at start); a paused schedule stays paused.
    Returns "created" or "updated".
    """
    wanted = cleanup_schedule(settings)
    try:
        await client.create_schedule(CLEANUP_SCHEDULE_ID, wanted)
        return "created"
    except ScheduleAlreadyRunningError:
        pass

    def update(current: ScheduleUpdateInput) -> ScheduleUpdate:
        state = current.description.schedule.state
        if state.paused:  # an operator's pause stays, with the reason they gave
            wanted.state = state
        else:  # the note says what it deletes: these settings'
            wanted.state.limited_actions, wanted.state.remaining_actions = state.limited_actions, state.remaining_actions
        return ScheduleUpdate(schedule=wanted)

    await client.get_schedule_handle(CLEANUP_SCHEDULE_ID).update(update)
    return "updated"

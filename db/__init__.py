"""Postgres access: numbered SQL migrations applied idempotently, and connection helpers."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

MIGRATIONS = Path(__file__).parent / "migrations"
# NOTIFY channel: a Bouncer batch left the API (payload: its id) or a lane's hold changed
# (`lane:<lane>`); standby batches waiting for a slot listen (activities/bouncer_api.py).
SLOTS_CHANNEL = "bouncer_slots"


def fresh_result(alias: str, cap: str | None = None) -> str:
    """SQL: the result `alias` may be reused instead of asking the API again. Parameters `ttl` and
    `ttl_unknown` (seconds, `Settings.freshness()`): an `unknown` verdict is kept only briefly.
    `cap`: an SQL expression (seconds, NULL for none) capping both, for queries over several user
    batches (`user_batches.max_result_age_s`)."""
    age = f"case when {alias}.status = 'unknown' then %(ttl_unknown)s else %(ttl)s end"
    if cap:
        age = f"least({age}, {cap})"  # least() skips a NULL cap
    return f"{alias}.verified_at > now() - make_interval(secs => {age})"


def lock_lanes(rows: str) -> str:
    """SQL: lock the `user_batch_lanes` rows named by `rows` (a query of (user_batch_id, lane)), in
    key order, before queue rows are numbered from their `next_seq`. Two transactions that read the
    same `next_seq` number their rows alike: the second insert hits the primary key (or, ON
    CONFLICT, silently drops addresses). Under READ COMMITTED the next statement's snapshot sees
    the number the previous holder left. One indexed row per list, not per address."""
    return (f"select 1 from user_batch_lanes where (user_batch_id, lane) in ({rows})"
            " order by user_batch_id, lane for update")


_LOCK_KEY = 74_211_001  # advisory lock: one migrator at a time across processes


def migration_files() -> list[tuple[int, Path]]:
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        m = re.match(r"(\d+)_", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return found


def migrate(database_url: str) -> list[int]:
    """Apply the migrations not yet recorded in `schema_migrations`; returns the versions applied.

    Safe to call from every process at start: an advisory lock serializes migrators and each
    migration runs in its own transaction together with its bookkeeping row.
    """
    applied: list[int] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "create table if not exists schema_migrations "
                "(version int primary key, name text not null, applied_at timestamptz not null default now())"
            )
            done = {r[0] for r in conn.execute("select version from schema_migrations")}
            for version, path in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute(
                        "insert into schema_migrations (version, name) values (%s, %s)", (version, path.name)
                    )
                applied.append(version)
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied


def schema_version(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("select coalesce(max(version), 0) from schema_migrations").fetchone()
        return int(row[0])


async def _configure(conn: psycopg.AsyncConnection) -> None:
    # A store's temp table holds one download (10,000 records, ~8 MB with their jsonb): at the
    # default 8 MB of temp buffers it went to disk (900 MB of temp writes per 2M addresses).
    # Settable only before the session's first temp table, so here, once per connection.
    await conn.execute("set temp_buffers = '64MB'")
    # The pipeline keeps the server busy with many statements at once: a parallel plan adds CPU
    # there (a 100k-row list's summary: 0.47 s in one process, 0.28 s in three, 0.8 CPU-s) and
    # takes it from the others. Throughput over one statement's latency.
    await conn.execute("set max_parallel_workers_per_gather = 0")


def open_pool(database_url: str, size: int) -> AsyncConnectionPool:
    """An async pool (call `await pool.open()`); one per process. Connections autocommit:
    multi-statement work opens `conn.transaction()` explicitly."""
    return AsyncConnectionPool(
        database_url, min_size=1, max_size=size, open=False, kwargs={"autocommit": True}, configure=_configure
    )


_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]").search
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text(value: str) -> str:
    """A value in COPY's text format. Bulk paths format their lines with this and write blocks:
    psycopg's per-row `write_row` was measured as most of the cost of a COPY loop."""
    return value.translate(_ESCAPES) if _NEEDS_ESCAPE(value) else value

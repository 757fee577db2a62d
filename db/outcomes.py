"""A user batch's per-row results as `starter.py results` and `GET /v1/batches/{id}/results` give
them: the columns (`--columns` / `?columns=` choose some), the filters `--status` / `?status=`
accept, and the queries (in input order);
and its per-lane counts as `starter.py status ID` and `GET /v1/batches/{id}` give them."""

from __future__ import annotations

from settings import CATCHALL

COLUMNS = ("row", "input", "email", "state", "note", "status", "reason", "score", "accept_all", "verified_at",
           # from Bouncer's record: the domain's and the account's flags, the mail provider, a suggested
           # correction, and the toxicity score (0-5)
           "disposable", "free", "role", "full_mailbox", "provider", "did_you_mean", "toxicity")
# Appended for user batches that asked for the catchall lane.
CATCHALL_COLUMNS = ("catchall_status", "catchall_reason", "catchall_score", "catchall_verified_at")
# A Bouncer status (also matched against the catchall lane's) or a row's state.
FILTERS = ("deliverable", "risky", "undeliverable", "unknown", "verified", "invalid", "duplicate",
           "cancelled", "failed", "pending")

# Each column's SQL over `item_outcomes`. Postgres renders the rows (CSV by COPY, JSON objects by
# row_to_json): the per-row work stays in C, not in the Python process that streams them
# out (`bench export`, 2M rows as CSV: 28.8 s when Python formatted them, 11.4 s so).
_SQL = {
    "row": "row_no", "input": "raw", "email": "email", "state": "state", "note": "note", "status": "status",
    "reason": "reason", "score": "score", "accept_all": "accept_all", "verified_at": "verified_at",
    "disposable": "record->'domain'->>'disposable'", "free": "record->'domain'->>'free'",
    "role": "record->'account'->>'role'", "full_mailbox": "record->'account'->>'fullMailbox'",
    "provider": "record->>'provider'", "did_you_mean": "record->>'didYouMean'", "toxicity": "record->'toxicity'",
    "catchall_status": "catchall_status", "catchall_reason": "catchall_reason", "catchall_score": "catchall_score",
    "catchall_verified_at": "catchall_verified_at",
}
# As CSV text: timestamps in ISO 8601 as in JSON (not COPY's "2026-01-02 03:04:05+00"), and the
# toxicity as its plain value.
_CSV_SQL = _SQL | {"verified_at": "to_json(verified_at) #>> '{}'", "toxicity": "record->>'toxicity'",
                   "catchall_verified_at": "to_json(catchall_verified_at) #>> '{}'"}
# Parameters: `ub` (the user batch's id), `f` (a list of FILTERS, or None for every row).
_WHERE = ("o.user_batch_id = %(ub)s and (%(f)s::text[] is null or o.status = any(%(f)s::text[])"
          " or o.state = any(%(f)s::text[]) or o.catchall_status = any(%(f)s::text[]))")


def csv_copy(columns: tuple[str, ...]) -> str:
    """COPY of the rows as CSV lines (no header), for `cursor.copy(csv_copy(cols), params)`."""
    return (f"copy (select {', '.join(_CSV_SQL[c] for c in columns)} from item_outcomes o where {_WHERE}"
            " order by o.row_no) to stdout (format csv)")


def json_query(columns: tuple[str, ...]) -> str:
    """One JSON object (text) per row, its keys in `columns` order (row_to_json: compact, and
    cheaper than json_build_object). The object is built by a lateral subquery of each row, so
    the order is the row's number whether or not `row` is among the columns."""
    fields = ", ".join(f'{_SQL[c]} as "{c}"' for c in columns)
    return (f"select row_to_json(t)::text from item_outcomes o cross join lateral (select {fields}) t"
            f" where {_WHERE} order by o.row_no")


def csv_header(columns: tuple[str, ...]) -> bytes:
    return (",".join(columns) + "\n").encode()


# The JSON formats' opening and closing: one array (an object a line), or JSON Lines (no array,
# so a consumer of a big list can read it a line at a time).
JSON_FRAMES = {"json": (b"[", b"\n]\n"), "jsonl": (b"", b"")}


def json_chunk(docs: list[str], first: bool, fmt: str) -> bytes:
    """JSON objects between JSON_FRAMES[fmt]: `[\n{...},\n{...}\n]\n`, or `{...}\n{...}\n`."""
    if fmt == "jsonl":
        return ("\n".join(docs) + "\n").encode()
    return (("\n" if first else ",\n") + ",\n".join(docs)).encode()


def columns(lanes: list[str]) -> tuple[str, ...]:
    return COLUMNS + (CATCHALL_COLUMNS if CATCHALL in lanes else ())


def status_filter(text: str | None) -> list[str] | None:
    """`deliverable,risky` as ["deliverable", "risky"] (rows matching any); None for every row.
    ValueError naming what is not one of FILTERS."""
    if text is None:
        return None
    wanted = [w.strip() for w in text.split(",")]
    if bad := [w for w in wanted if w not in FILTERS]:
        raise ValueError(f"status {', '.join(map(repr, bad))} is not one of {', '.join(FILTERS)}"
                         " (several: comma-separated)")
    return wanted


def chosen_columns(text: str | None, available: tuple[str, ...]) -> tuple[str, ...]:
    """`email,status` as ("email", "status"), in the order given; every column when None.
    ValueError naming what this batch has not."""
    if text is None:
        return available
    wanted = tuple(w.strip() for w in text.split(","))
    if bad := [w for w in wanted if w not in available]:
        raise ValueError(f"column {', '.join(map(repr, bad))} is not one of {', '.join(available)}")
    if len(set(wanted)) < len(wanted):
        raise ValueError("a column is named twice")
    return wanted


# Per lane: `remaining` addresses not yet settled; while the batch is paused only the in-flight
# ones, the rest `withdrawn` until resume. Settled: unique_addresses - remaining - withdrawn.
LANE_COLUMNS = ("lane", "unique_addresses", "cached", "shared", "enqueued", "remaining", "withdrawn", "failed")
LANE_QUERY = f"select {', '.join(LANE_COLUMNS)} from user_batch_lanes where user_batch_id = %s order by lane"


def lane_progress(lanes: list[tuple]) -> dict:
    """`lane_progress` (one object per lane) and the batch's `addresses_settled` / `addresses_total`."""
    unique = sum(ln[1] for ln in lanes)
    return {
        "lane_progress": [dict(zip(LANE_COLUMNS, ln)) for ln in lanes],
        "addresses_settled": unique - sum(ln[5] + ln[6] for ln in lanes),
        "addresses_total": unique,
    }

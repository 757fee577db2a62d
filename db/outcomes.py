"""A user batch's per-row results as `starter.py results` and `GET /v1/batches/{id}/results` give
them: the columns, the filters `--status` / `?status=` accept, and the query (in input order);
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

# Parameters: `ub` (the user batch's id), `f` (one of FILTERS, or None for every row).
QUERY = (
    "select row_no, raw, email, state, note, status, reason, score, accept_all, verified_at,"
    " record->'domain'->>'disposable', record->'domain'->>'free', record->'account'->>'role',"
    " record->'account'->>'fullMailbox', record->>'provider', record->>'didYouMean', record->'toxicity',"
    " catchall_status, catchall_reason, catchall_score, catchall_verified_at"
    " from item_outcomes where user_batch_id = %(ub)s and (%(f)s::text is null"
    " or status = %(f)s or state = %(f)s or catchall_status = %(f)s) order by row_no"
)


def columns(lanes: list[str]) -> tuple[str, ...]:
    return COLUMNS + (CATCHALL_COLUMNS if CATCHALL in lanes else ())


def filter_problem(status_filter: str | None) -> str | None:
    """None when `status_filter` is None or one of FILTERS, else the reason."""
    if status_filter is None or status_filter in FILTERS:
        return None
    return f"status {status_filter!r} is not one of {', '.join(FILTERS)}"


def row(r: tuple, width: int) -> tuple:
    """A QUERY row as output values: timestamps in ISO 8601, the rest as stored (None: an empty
    CSV cell), cut to `width` columns."""
    return (*r[:9], r[9].isoformat() if r[9] else None, *r[10:20], r[20].isoformat() if r[20] else None)[:width]


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

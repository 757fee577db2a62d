"""Scoped dead-letter listing and retry (`activities/dead_letters.py`) on hand-built rows: which
lists a shared dead letter concerns.

The rows are written directly (the states they stand for take a full pipeline minutes to reach);
the retry and the listing are the real functions.
"""

from __future__ import annotations

import psycopg

from activities.dead_letters import Selection, count_dead_letters, list_dead_letters, requeue_dead_letters

DELIVERABILITY, CATCHALL = "deliverability", "catchall"


def _list(conn, user: str, state: str, emails: list[str], lanes=(DELIVERABILITY,), item_state="pending") -> int:
    """A user batch begun 10 minutes ago (finished 1 minute ago if completed) with one row per email."""
    (ub,) = conn.execute(
        "insert into user_batches (user_id, state, lanes, rows_total, created_at, finished_at)"
        " values (%s, %s, %s, %s, now() - interval '10 min',"
        " case when %s = 'completed' then now() - interval '1 min' end) returning id",
        (user, state, list(lanes), len(emails), state)).fetchone()
    for row_no, e in enumerate(emails, 1):
        conn.execute("insert into items values (%s, %s, %s, %s, %s)", (ub, row_no, e, e, item_state))
    return ub


def _address(conn, email: str) -> int:
    return conn.execute("insert into addresses (email) values (%s) on conflict (email) do update set email = excluded.email"
                        " returning id", (email,)).fetchone()[0]


def _dead_letter(conn, lane: str, address: int, minutes_ago: int = 5) -> None:
    conn.execute("insert into dead_letters (lane, address_id, reason, attempts, created_at)"
                 " values (%s, %s, 'no result', 3, now() - make_interval(mins => %s))", (lane, address, minutes_ago))


def test_a_scoped_listing_leaves_out_another_users_catchall_dead_letter_for_a_row_the_catchall_lane_never_had(
    db_url
):
    """bob's list sent X and Y to the catchall lane (accept-all) and both were dead-lettered there.
    ann's and cara's lists (both lanes, open since before) never had them on that lane: ann is
    still asking the deliverability lane about X (her own result age), and Y's deliverability
    verdict is now `deliverable` (re-verified since), which the catchall lane does not re-verify.
    Their rows are `pending` in `items` (a verified row's state is derived, never stored), so the
    check for the catchall lane's verdict read them as left without one: bob's dead letters were
    listed as ann's and cara's."""
    x, y = "x@accept-all.example", "y@accept-all.example"
    both = (DELIVERABILITY, CATCHALL)
    with psycopg.connect(db_url) as conn, conn.transaction():
        ax, ay = _address(conn, x), _address(conn, y)
        bob = _list(conn, "bob", "queued", [x, y], lanes=both)
        ann = _list(conn, "ann", "queued", [x], lanes=both)
        cara = _list(conn, "cara", "queued", [y], lanes=both)
        conn.execute("insert into results (address_id, lane, status, reason, accept_all, record, verified_at)"
                     " values (%s, %s, 'risky', 'low_deliverability', 'yes', '{}', now() - interval '8 min'),"
                     " (%s, %s, 'deliverable', 'accepted_email', 'no', '{}', now() - interval '2 min')",
                     (ax, DELIVERABILITY, ay, DELIVERABILITY))
        conn.execute("insert into queue (user_batch_id, lane, seq, address_id) values (%s, %s, 0, %s)",
                     (ann, DELIVERABILITY, ax))
        _dead_letter(conn, CATCHALL, ax)
        _dead_letter(conn, CATCHALL, ay)

    with psycopg.connect(db_url) as conn:
        for user in ("ann", "cara"):
            assert list_dead_letters(conn, Selection(user=user)) == [], user
            assert count_dead_letters(conn, Selection(user=user, lane=CATCHALL)) == 0, user
        assert count_dead_letters(conn, Selection(user_batch_id=ann)) == 0
        assert requeue_dead_letters(conn, Selection(user_batch_id=cara, user="cara"))[0] == 0
        # bob's own: X, whose accept-all verdict sent it to the catchall lane for him.
        assert [(d["address_id"], d["user_batches"]) for d in list_dead_letters(conn, Selection(user="bob"))] == [
            (ax, [bob])]
        # With X's accept-all verdict settled for ann too (as when her list reused it and waited on
        # bob's catchall send), his dead letter concerns her row as well.
        conn.execute("delete from queue")
        assert [d["user_batches"] for d in list_dead_letters(conn, Selection(user="ann"))] == [[ann]]

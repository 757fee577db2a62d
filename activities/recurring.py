"""Recurring lists: a scheduled run copies the stored rows of a list into a new user batch.

The rows never leave Postgres: a run is one INSERT ... SELECT from the list's latest user batch.
Rows that were invalid stay invalid (with their reason); every other row starts `pending`, so
the normal prepare path dedupes it and queues it for verification again, reusing only results
younger than half the schedule's period (`user_batches.max_result_age_s`; the list's own
`--max-age` or RESULT_TTL_DAYS if shorter): each run verifies the list again, while an address
another list verified meanwhile is not paid for twice.
"""

from __future__ import annotations

import math

from psycopg_pool import AsyncConnectionPool
from temporalio import activity
from temporalio.exceptions import ApplicationError

from workflows.models import FINISHED_STATES, CopyOutcome, CopyRequest, user_batch_workflow_id


class RecurringActivities:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @activity.defn
    async def copy_user_batch(self, request: CopyRequest) -> CopyOutcome:
        """Create the run's user batch from the list's latest one; idempotent by `run_key`.

        One transaction: the new batch, its items, and the list's `latest` pointer move together
        (cleanup keeps the latest batch's items, so the next run always has rows to copy).
        """
        source_tag = f"schedule {request.schedule_id} run {request.run_key}"
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "select latest_user_batch_id, every_s from recurring_lists where schedule_id = %s for update",
                (request.schedule_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise ApplicationError(
                    f"recurring list {request.schedule_id} is not registered (deleted with `schedules delete`?)",
                    type="UnknownRecurringList", non_retryable=True,
                )
            latest, every_s = row
            done = await (await conn.execute(
                "select id, rows_total from user_batches where source = %s", (source_tag,)
            )).fetchone()
            if done is not None:  # a retry after the commit: the batch exists already
                return CopyOutcome(int(done[0]), int(latest), int(done[1]))
            src = await (await conn.execute(
                "select user_id, name, priority, lanes, state, max_result_age_s from user_batches where id = %s",
                (latest,)
            )).fetchone()
            if src is None:
                raise ApplicationError(f"user batch {latest} of recurring list {request.schedule_id} is gone",
                                       type="UnknownRecurringList", non_retryable=True)
            user_id, name, priority, lanes, state, max_age_s = src
            if state not in FINISHED_STATES:
                # The schedule's overlap policy (SKIP) sees only the runs it started, not the
                # submission the list began with: a run due while that one verifies is skipped here.
                return CopyOutcome(0, int(latest), 0)
            (ub,) = await (await conn.execute(
                "insert into user_batches (user_id, name, priority, lanes, source, max_result_age_s)"
                " values (%s, %s, %s, %s, %s, %s) returning id",
                (user_id, name, priority, lanes, source_tag, min(every_s / 2, max_age_s or math.inf)),
            )).fetchone()
            rows = (await conn.execute(
                """
                insert into items (user_batch_id, row_no, raw, email, state, reason)
                select %(ub)s, row_no, raw, email,
                       case when state = 'invalid' then 'invalid' else 'pending' end,
                       case when state = 'invalid' then reason end
                from items where user_batch_id = %(src)s
                """,
                {"ub": ub, "src": latest},
            )).rowcount
            await conn.execute(
                "update user_batches set rows_total = %s, workflow_id = %s where id = %s",
                (rows, user_batch_workflow_id(ub), ub),
            )
            await conn.execute(
                "update recurring_lists set latest_user_batch_id = %s, runs = runs + 1 where schedule_id = %s",
                (ub, request.schedule_id),
            )
        return CopyOutcome(int(ub), int(latest), int(rows))

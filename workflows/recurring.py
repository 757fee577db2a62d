"""One run of a recurring list (the action of its Temporal Schedule): copy the stored list into a
new user batch, then verify it like any submission, as a child UserBatchWorkflow."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.recurring import RecurringActivities
    from workflows.models import CopyRequest, RecurringRun, Summary, UserBatchInput, user_batch_workflow_id
    from workflows.user_batch import UserBatchWorkflow

DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn
class RecurringListWorkflow:
    @workflow.run
    async def run(self, inp: RecurringRun) -> Summary | None:
        """The run's summary; None when it was skipped (the list's latest run still verifies)."""
        copied = await workflow.execute_activity_method(
            RecurringActivities.copy_user_batch,
            CopyRequest(inp.schedule_id, workflow.info().workflow_id),
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=DB_RETRY,
        )
        if not copied.user_batch_id:
            workflow.set_current_details(f"skipped: user batch {copied.source_user_batch_id} is still verifying")
            return None
        workflow.set_current_details(
            f"user batch {copied.user_batch_id}: {copied.rows:,} rows copied from {copied.source_user_batch_id}"
        )
        # ABANDON: the user batch is a submission of its own (cancel it like any other); this run
        # waits for it so the schedule's overlap policy skips a run while the previous one verifies.
        return await workflow.execute_child_workflow(
            UserBatchWorkflow.run,
            UserBatchInput(copied.user_batch_id, progress_recheck_s=inp.progress_recheck_s),
            id=user_batch_workflow_id(copied.user_batch_id),
            parent_close_policy=ParentClosePolicy.ABANDON,
        )

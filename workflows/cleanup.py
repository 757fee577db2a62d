"""Cleanup: delete what is past retention, chunk by chunk (one short activity per chunk).

Run daily by a Temporal Schedule (installed at worker start) and on demand by
`starter.py clean --older-than 30d`. The rule for what is safe to delete is in
activities/cleanup.py. Completed workflows go by the namespace's retention period, not here.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.cleanup import CleanupActivities
    from workflows.models import CleanupChunk, CleanupInput, CleanupSummary, ResultsCutoffRequest

DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))
# Items first: results are bounded by the user batches that remain once old ones are gone.
KINDS = ("items", "results", "events", "bouncer_batches", "pack_runs")


@workflow.defn
class CleanupWorkflow:
    @workflow.run
    async def run(self, inp: CleanupInput) -> CleanupSummary:
        cutoff = (workflow.now() - timedelta(days=inp.older_than_days)).isoformat()
        summary = CleanupSummary(cutoff=cutoff, results_cutoff="")
        for kind in KINDS:
            at = cutoff
            if kind == "results":
                at = await workflow.execute_activity_method(
                    CleanupActivities.results_cutoff,
                    ResultsCutoffRequest(cutoff, inp.result_ttl_days),
                    start_to_close_timeout=timedelta(minutes=1),
                    retry_policy=DB_RETRY,
                )
                summary.results_cutoff = at
            summary.deleted[kind] = 0
            more = True
            while more:
                outcome = await workflow.execute_activity_method(
                    CleanupActivities.delete_chunk,
                    CleanupChunk(kind, at, inp.chunk_rows),
                    start_to_close_timeout=timedelta(minutes=10),
                    heartbeat_timeout=timedelta(minutes=2),
                    retry_policy=DB_RETRY,
                )
                summary.deleted[kind] += outcome.deleted
                summary.user_batches += outcome.user_batches
                summary.chunks += 1
                more = outcome.more
                workflow.set_current_details(
                    f"deleting {kind}: {summary.deleted[kind]:,} so far; {summary.chunks} chunks"
                )
                if workflow.info().is_continue_as_new_suggested():
                    # A huge backlog: the next run (of the schedule, or a re-run) picks up the rest.
                    workflow.logger.info("cleanup stops early: history is large; the rest goes next run")
                    return summary
        workflow.set_current_details(
            f"done: {summary.user_batches:,} user batches; "
            + ", ".join(f"{n:,} {k}" for k, n in summary.deleted.items())
        )
        return summary

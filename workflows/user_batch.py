"""One user batch: prepare -> nudge the lane schedulers -> wait until every address is settled -> finalize."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.events import EventActivities
    from activities.heartbeat import HEARTBEAT_TIMEOUT
    from activities.ingest import IngestActivities
    from activities.user_batches import UserBatchActivities
    from workflows import search
    from workflows.models import (
        FINISHED_STATES,
        IngestRequest,
        PauseRequest,
        Progress,
        RegisterRequest,
        Summary,
        UserBatchFailure,
        UserBatchInput,
    )

DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn
class UserBatchWorkflow:
    @workflow.init
    def __init__(self, inp: UserBatchInput) -> None:
        self._id = inp.user_batch_id  # known to an update that comes before `run` begins
        self._progress: Progress | None = None
        self._news = 0  # bumped by `progressed` signals and by pause/resume
        self._control = asyncio.Lock()

    @workflow.signal
    def progressed(self) -> None:
        """Sent by Bouncer batch workflows when results for this batch were stored."""
        self._news += 1

    @workflow.query
    def progress(self) -> Progress | None:
        return self._progress

    @workflow.update
    async def pause(self) -> Progress:
        """Stop dispatching this batch's queued addresses; in-flight ones finish."""
        return await self._set_paused(True)

    @workflow.update
    async def resume(self) -> Progress:
        return await self._set_paused(False)

    @pause.validator
    def _validate_pause(self) -> None:
        self._reject_if_finished()

    @resume.validator
    def _validate_resume(self) -> None:
        self._reject_if_finished()

    def _reject_if_finished(self) -> None:
        if not self._id:
            raise ValueError("the list is still being registered; try again in a moment")
        if self._progress is not None and self._progress.state in FINISHED_STATES:
            raise ValueError(f"user batch {self._id} is {self._progress.state}")

    @workflow.run
    async def run(self, inp: UserBatchInput) -> Summary:
        self._id = inp.user_batch_id
        try:
            if not self._id:
                await self._register_and_ingest(inp)
            read_news = self._news  # the news heard before the latest read of the progress began
            async with self._control:
                self._progress = await _database(UserBatchActivities.prepare_user_batch, self._id, minutes=30)
            if not workflow.patched("prepare-nudges-scheduler"):
                await self._nudge()  # since release 2 the prepare activity signals the schedulers
            self._describe()
            recheck: asyncio.Future | None = None
            # Since release 2 each re-read also finalizes a settled batch (one activity, not two).
            advance = workflow.patched("advance-finalizes")
            summary: Summary | None = None
            # Since release 6 the news is taken before each read, not after it: a `progressed`
            # signal handled in the activation that delivered a read's result (its store committed
            # after the read) was counted as seen, and the list waited for the slow timer.
            news_before_read = workflow.patched("news-before-read")
            while not (self._progress.state == "queued" and self._progress.remaining == 0):
                seen = read_news if news_before_read else self._news
                if workflow.patched("recheck-timer-not-cancelled"):
                    # The slow timer re-reads in case a signal was missed. It runs out on its own
                    # instead of being cancelled by each signal: two history events per period,
                    # not per Bouncer batch.
                    if recheck is None or recheck.done():
                        recheck = asyncio.ensure_future(workflow.sleep(inp.progress_recheck_s))
                    timer = recheck
                    await workflow.wait_condition(lambda: self._news != seen or timer.done())
                else:
                    try:
                        await workflow.wait_condition(
                            lambda: self._news != seen, timeout=timedelta(seconds=inp.progress_recheck_s)
                        )
                    except asyncio.TimeoutError:
                        pass
                read_news = self._news
                async with self._control:
                    self._progress = await (self._advance() if advance else self._read_progress())
                self._describe()
                if self._progress.summary is not None:
                    summary = self._progress.summary
                    break
                info = workflow.info()
                if info.is_continue_as_new_suggested() or info.get_current_history_length() >= inp.max_history_events:
                    # Its state is in Postgres: the next run's prepare finds the list queued or
                    # paused and only reads its counts. Updates in progress finish first.
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    workflow.continue_as_new(dataclasses.replace(inp, user_batch_id=self._id, source=None))
            if summary is None:
                async with self._control:
                    summary = await _database(UserBatchActivities.finalize_user_batch, self._id, minutes=30)
                self._progress = await self._read_progress()
            elif not workflow.patched("no-read-after-advance"):
                # Before release 5 the counts were read once more after `advance_user_batch` had
                # finalized, although it had just read them: an activity round trip at every list's end.
                self._progress = await self._read_progress()
            workflow.set_current_details(f"completed: {summary.rows:,} rows; " + _counts(summary.by_status))
            search.show({search.BATCH_STATE: "completed"})
            # A pause or resume accepted while the list was finalized gets its answer (the
            # batch as it ended) instead of "workflow execution already completed".
            await workflow.wait_condition(workflow.all_handlers_finished)
            return summary
        except (asyncio.CancelledError, ActivityError) as err:
            # A cancel that lands while an activity runs arrives as ActivityError(CancelledError).
            if not is_cancelled_exception(err):
                search.show({search.BATCH_STATE: "failed"})
                await self._record_failure(err)
                raise
            # Temporal cancellation: withdraw queued addresses, then end as cancelled.
            if not self._id:
                raise  # cancelled before its row existed: nothing to withdraw
            summary = await _database(UserBatchActivities.cancel_user_batch, self._id, minutes=10)
            await self._nudge()  # other batches may have inherited shared addresses
            workflow.set_current_details(f"cancelled: {_counts(summary.by_state)}")
            search.show({search.BATCH_STATE: "cancelled"})
            raise
        except ApplicationError as err:
            await self._record_failure(err)
            raise

    async def _record_failure(self, err: Exception) -> None:
        """The row ends `failed` and subscribers hear `user_batch.failed` (new in this version)."""
        if not self._id or not workflow.patched("user-batch-failed-event"):
            return
        cause = err.cause if isinstance(err, ActivityError) and err.cause is not None else err
        await workflow.execute_activity_method(
            EventActivities.fail_user_batch,
            UserBatchFailure(self._id, str(cause)),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )

    async def _register_and_ingest(self, inp: UserBatchInput) -> None:
        """SDK submissions by URI: create the row, then stream the source (heartbeating, resumable)."""
        if inp.source is None:
            raise ApplicationError("UserBatchInput needs a user_batch_id or a source", type="InvalidInput",
                                   non_retryable=True)
        self._id = await workflow.execute_activity_method(
            UserBatchActivities.register_user_batch,
            RegisterRequest(workflow.info().workflow_id, inp.source),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=DB_RETRY,
        )
        workflow.set_current_details(f"user batch {self._id}: reading its list")
        src = inp.source
        search.show({search.USER_ID: src.user_id, search.PRIORITY: src.priority, search.LANE: src.lanes[0],
                     search.BATCH_STATE: "ingesting"})
        ingested = await workflow.execute_activity_method(
            IngestActivities.ingest_source,
            IngestRequest(self._id, inp.source.uri, inp.source.column),
            start_to_close_timeout=timedelta(hours=6),
            heartbeat_timeout=timedelta(seconds=inp.ingest_heartbeat_s),
            retry_policy=DB_RETRY,
        )
        workflow.logger.info("user batch %s: %s rows ingested", self._id, ingested.rows)

    async def _set_paused(self, paused: bool) -> Progress:
        # Before the list is prepared (its first task, or while a URI is ingested) the database
        # would ignore a pause, and prepare would then queue the whole list: wait for prepare.
        # Histories recorded before this patch replay the old (ignored) pause.
        if self._progress is None and workflow.patched("pause-waits-for-prepare"):
            await workflow.wait_condition(lambda: self._progress is not None)
        async with self._control:
            self._progress = await _database(UserBatchActivities.set_paused, PauseRequest(self._id, paused), minutes=10)
        await self._nudge()
        self._news += 1  # the main loop re-reads progress and upserts the search attributes
        self._describe(upsert=False)  # no commands beside an update's response
        return self._progress

    async def _advance(self) -> Progress:
        return await _database(UserBatchActivities.advance_user_batch, self._id, minutes=30)  # may finalize a big list

    async def _read_progress(self) -> Progress:
        return await workflow.execute_activity_method(
            UserBatchActivities.read_progress,
            self._id,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=DB_RETRY,
        )

    async def _nudge(self) -> None:
        lanes = [lane.lane for lane in (self._progress.lanes if self._progress else [])]
        await asyncio.gather(
            *(
                workflow.execute_activity_method(
                    UserBatchActivities.nudge_scheduler,
                    lane,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=DB_RETRY,
                )
                for lane in lanes
            )
        )

    def _describe(self, upsert: bool = True) -> None:
        """The Web UI's current details and the search attributes, from counts the workflow has."""
        p = self._progress
        if p is None:
            return
        state = search.user_batch_state(p.state)
        flight = f"{p.in_flight_batches:,} Bouncer batch{'es' if p.in_flight_batches != 1 else ''} in flight"
        rows = f"{p.rows:,} rows ({p.invalid:,} invalid, {p.duplicates:,} duplicates)"
        if p.state == "paused":
            # While paused, `remaining` counts only the addresses already at the API.
            workflow.set_current_details(f"paused: {flight}, nothing new is sent until resumed; {rows}")
        else:
            verified = p.unique_addresses - p.remaining - p.failed
            failed = f" ({p.failed:,} failed)" if p.failed else ""
            workflow.set_current_details(
                f"{state}: {verified:,} of {p.unique_addresses:,} addresses verified{failed}; {flight}; {rows}"
            )
        if upsert:
            search.show({search.USER_ID: p.user_id, search.PRIORITY: p.priority,
                         search.LANE: p.lanes[0].lane if p.lanes else "", search.BATCH_STATE: state})


def _database(activity, arg, minutes: int):
    """A long database activity: it heartbeats (a dead worker is noticed in seconds, not at the
    timeout) and is retried by DB_RETRY."""
    return workflow.execute_activity_method(
        activity, arg, start_to_close_timeout=timedelta(minutes=minutes), heartbeat_timeout=HEARTBEAT_TIMEOUT,
        retry_policy=DB_RETRY,
    )


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {k}" for k, n in sorted(counts.items())) or "nothing"

"""One Bouncer batch: submit -> await completion (callback, else polling) -> download + store -> notify."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.workflow import ActivityCancellationType
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, RetryState, TimeoutError

with workflow.unsafe.imports_passed_through():
    from activities.bouncer_api import (
        BAD_REQUEST,
        CREATE_UNANSWERED,
        KEY_REFUSED_PAUSE,
        NOT_FOUND,
        OUT_OF_CREDITS,
        UNAUTHORIZED,
        BouncerApiActivities,
    )
    from activities.user_batches import UserBatchActivities
    from workflows import search
    from activities.heartbeat import HEARTBEAT_TIMEOUT
    from workflows.models import (
        DONE_AT_API,
        BatchFinished,
        BouncerBatchInput,
        LanePause,
        StoreOutcome,
        StoreRequest,
        scheduler_id,
    )

SPARSE_POLLS = 8  # with a callback on its way, polls are at most this many intervals apart
FINISH_POLLS = 5  # a batch finished early must complete within this many poll intervals
NON_RETRYABLE = [OUT_OF_CREDITS, UNAUTHORIZED, BAD_REQUEST, NOT_FOUND]
# 429s come back with next_retry_delay (the API's Retry-After); 5xx and timeouts back off to 2 min.
API_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    non_retryable_error_types=NON_RETRYABLE,
)


def failure_type(err: BaseException) -> str:
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError):
        return cause.type or "ApplicationError"
    if isinstance(cause, TimeoutError):
        return "Timeout"
    return type(cause).__name__


# Not sandboxed: the SDK's sandbox re-imports the workflow's modules for every new run (~25 ms
# of worker CPU in `bench saturation`), and fifteen of these start together whenever a burst
# of batches completes at the API. The code is kept deterministic by review and by the replay
# tests of recorded histories (tests/test_replay_recorded.py), which run it unsandboxed too.
@workflow.defn(sandboxed=False)
class BouncerBatchWorkflow:
    def __init__(self) -> None:
        self._callback_received = False
        self._slot_freed = False  # the callback receiver already told the scheduler
        self._phase = "submitting"

    @workflow.signal
    def completed(self, slot_freed: bool = False) -> None:
        """Sent by the callback receiver once Bouncer reports the batch done; `slot_freed`: it
        signals the scheduler that the batch's API slot is free (receivers before release 4 sent
        no argument)."""
        self._callback_received = True
        self._slot_freed = self._slot_freed or slot_freed

    @workflow.query
    def phase(self) -> str:
        return self._phase

    @workflow.run
    async def run(self, inp: BouncerBatchInput) -> StoreOutcome:
        bb = inp.bouncer_batch_id
        outcome = "stored"
        result = StoreOutcome(0, 0, 0)
        freeing: asyncio.Future | None = None
        evicted = False
        try:
            request, outcome = await self._submit_and_wait(inp)
            if workflow.patched("store-notifies-user-batches"):
                # The store activity signals the user batches it touched right after its commit.
                request = dataclasses.replace(request, notify=True)
            self._phase = "storing"
            self._show(inp, f"storing results of Bouncer batch {bb}")
            if workflow.patched("free-slot-before-store") and not self._slot_freed:
                # The batch no longer occupies one of the API's parallel slots: the scheduler may
                # dispatch the next one while this one downloads and stores (the end signal in
                # `finally` repeats it harmlessly and wakes the scheduler for re-queued addresses).
                done_at_api = BatchFinished(bb, DONE_AT_API)
                if workflow.patched("store-while-freeing-slot"):
                    # The store starts in the same workflow task as the signal, not after its
                    # round trip (`bench saturation`: callback seen → store started took 0.73 s p50).
                    freeing = asyncio.ensure_future(self._batch_finished(inp, done_at_api))
                else:
                    await self._batch_finished(inp, done_at_api)
            try:
                result = await self._store(inp, request)
            except ActivityError as err:
                # A download refused for good (the key revoked, the batch gone) must still settle
                # the batch's addresses, or their lists wait forever: gone, they are re-queued
                # (as an abandoned batch's); refused, dead-lettered with the reason (`dlq retry`).
                if not request.download or not workflow.patched("refused-download-settles-the-batch"):
                    raise
                kind = failure_type(err)
                if kind == UNAUTHORIZED:
                    await self._pause_lane(inp.lane, KEY_REFUSED_PAUSE)
                outcome = "abandoned" if kind == NOT_FOUND else "failed"
                reason = "" if kind == NOT_FOUND else f"download failed: {kind}: {err.cause}"
                request = dataclasses.replace(request, download=False, failure_reason=reason)
                result = await self._store(inp, request)
            self._phase = outcome
            self._show(
                inp, f"{outcome}: {result.stored:,} results stored, {result.requeued:,} re-queued, "
                f"{result.dead_lettered:,} dead-lettered"
            )
            if not request.notify:
                await asyncio.gather(*(self._notify(wid) for wid in result.touched_workflow_ids))
            if result.handed_off:
                # Signal-with-start: the next lane's scheduler may not be running yet.
                await workflow.execute_activity_method(
                    UserBatchActivities.nudge_scheduler,
                    result.handoff_lane,
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                             maximum_interval=timedelta(seconds=30)),
                )
            return result
        except GeneratorExit:
            # Not an end: a stopped worker's cached run is garbage-collected (outside any workflow
            # task, so no signal can be sent); the run goes on elsewhere from its history.
            evicted = True
            raise
        finally:
            # The scheduler owns the slot count; it must hear of every end, success or not.
            if not evicted:
                if freeing is not None:
                    await freeing  # in order: done at the API, then the end
                await self._batch_finished(inp, BatchFinished(bb, outcome))

    async def _store(self, inp: BouncerBatchInput, request: StoreRequest) -> StoreOutcome:
        return await workflow.execute_activity_method(
            BouncerApiActivities.store_results,
            request,
            task_queue=inp.api_task_queue,
            start_to_close_timeout=timedelta(minutes=10),
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=API_RETRY,
        )

    async def _batch_finished(self, inp: BouncerBatchInput, finished: BatchFinished) -> None:
        try:
            await workflow.get_external_workflow_handle(scheduler_id(inp.lane)).signal("batch_finished", finished)
        except Exception:  # noqa: BLE001 - no scheduler running: a fresh one adopts from the database
            workflow.logger.warning("scheduler of lane %s not reachable; batch %s finished", inp.lane, finished.bouncer_batch_id)

    async def _submit_and_wait(self, inp: BouncerBatchInput) -> tuple[StoreRequest, str]:
        bb = inp.bouncer_batch_id
        try:
            if inp.after:
                # Packed ahead (release 6): its activity builds the request, waits (up to the
                # followed batch's deadline) until that batch has left the API, then creates it.
                self._phase = "standby"
                self._show(inp, f"Bouncer batch {bb}: waiting for Bouncer batch {inp.after} to leave the API")
                submitted = await workflow.execute_activity_method(
                    BouncerApiActivities.submit_standby_batch,
                    bb,
                    task_queue=inp.api_create_task_queue,
                    start_to_close_timeout=timedelta(seconds=inp.deadline_s) + timedelta(minutes=5),
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    retry_policy=API_RETRY,
                )
            else:
                self._show(inp, f"creating Bouncer batch {bb} at the API")
                submitted = await workflow.execute_activity_method(
                    BouncerApiActivities.submit_batch,
                    bb,
                    task_queue=inp.api_create_task_queue,
                    start_to_close_timeout=timedelta(minutes=2),
                    heartbeat_timeout=HEARTBEAT_TIMEOUT,
                    retry_policy=API_RETRY,
                )
        except ActivityError as err:
            kind = failure_type(err)
            if kind == OUT_OF_CREDITS:
                await self._pause_lane(inp.lane, "out of credits")
                return StoreRequest(bb, inp.lane, download=False, count_attempt=False), "out_of_credits"
            if kind == UNAUTHORIZED:
                await self._pause_lane(inp.lane, KEY_REFUSED_PAUSE)
            elif kind == CREATE_UNANSWERED:  # (no patch: no earlier release raised it)
                await self._pause_lane(inp.lane, f"creates went unanswered (Bouncer batch {bb}, see dead letters)")
            return StoreRequest(bb, inp.lane, download=False, failure_reason=f"create failed: {err.cause}"), "failed"
        if not submitted.submitted:
            return StoreRequest(bb, inp.lane, download=False), "stored"

        self._phase = "waiting"
        self._show(inp, f"Bouncer batch {bb}: {submitted.sent:,} addresses at the API, waiting for its results")
        # Callbacks usually end the wait; polling is the fallback. Since release 5, while the lane's
        # callbacks work (its latest completion came by one), it polls every SPARSE_POLLS intervals
        # from the start, not after 1, 2, 4, 8 (the retry policy's backoff, capped there): 1-2
        # status requests per batch instead of ~5 (`bench saturation`: Temporal and worker CPU).
        # A lost callback is still noticed at most SPARSE_POLLS intervals late, and the lane's
        # next batches, seeing its latest completion came by poll, poll as before.
        poll_every = timedelta(seconds=inp.poll_interval_s)
        sparse = submitted.callback and submitted.callbacks_heard and workflow.patched("sparse-polls-while-callbacks-work")
        first_wait = poll_every * SPARSE_POLLS if sparse else poll_every
        try:
            await workflow.wait_condition(lambda: self._callback_received, timeout=first_wait)
        except asyncio.TimeoutError:
            pass
        if not self._callback_received:
            # A callback that overtakes polling abandons the poll rather than cancelling it: no
            # cancel request to race the poll's own completion (the time-skipping test server
            # rejects that race), and an abandoned poll ends with its next attempt anyway.
            abandon = workflow.patched("abandon-poll-on-callback")
            poll = workflow.start_activity_method(
                BouncerApiActivities.await_batch_completion,
                bb,
                task_queue=inp.api_task_queue,
                cancellation_type=(
                    ActivityCancellationType.ABANDON if abandon else ActivityCancellationType.TRY_CANCEL
                ),
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=timedelta(seconds=max(inp.deadline_s - first_wait.total_seconds(), 1)),
                # With a callback on its way, polls back off to 8 intervals: each poll is a
                # Temporal activity attempt and an API request, and a lost callback is rare.
                retry_policy=RetryPolicy(
                    initial_interval=first_wait,
                    backoff_coefficient=2.0 if submitted.callback else 1.0,
                    maximum_interval=poll_every * (SPARSE_POLLS if submitted.callback else 1),
                    non_retryable_error_types=NON_RETRYABLE,
                ),
            )
            callback = asyncio.ensure_future(workflow.wait_condition(lambda: self._callback_received))
            await workflow.wait([poll, callback], return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                poll.cancel()
            if not callback.done():
                callback.cancel()
            if not self._callback_received:
                try:
                    poll.result()
                except ActivityError as err:
                    kind = failure_type(err)
                    # Retries stopped by the schedule-to-close deadline surface the last attempt's
                    # failure (NotReady), not a TimeoutError: that is the stuck case too.
                    if err.retry_state == RetryState.TIMEOUT and workflow.patched("deadline-ends-as-stuck"):
                        kind = "Timeout"
                    # Stuck past the deadline: finish it early and keep what it verified (paid
                    # for); the rest is re-queued. Where that fails, or the batch is gone at the
                    # API: delete it there, re-queue its addresses.
                    if kind == "Timeout" and workflow.patched("finish-stuck-batch") and await self._finish_early(inp):
                        return StoreRequest(bb, inp.lane, download=True, finished_early=True), "finished_early"
                    if kind in ("Timeout", NOT_FOUND):
                        await workflow.execute_activity_method(
                            BouncerApiActivities.abandon_batch,
                            bb,
                            task_queue=inp.api_task_queue,
                            start_to_close_timeout=timedelta(seconds=60),
                            retry_policy=API_RETRY,
                        )
                        return StoreRequest(bb, inp.lane, download=False), "abandoned"
                    if kind == UNAUTHORIZED:
                        await self._pause_lane(inp.lane, KEY_REFUSED_PAUSE)
                    return StoreRequest(bb, inp.lane, download=False, failure_reason=f"status failed: {kind}"), "failed"
        return StoreRequest(bb, inp.lane, download=True), "stored"

    async def _finish_early(self, inp: BouncerBatchInput) -> bool:
        """`POST /finish` for a batch stuck past its deadline, then poll until the API reports it
        completed. False where the API no longer has it, or it does not complete within
        FINISH_POLLS poll intervals (at least a minute)."""
        bb = inp.bouncer_batch_id
        self._show(inp, f"Bouncer batch {bb} is past its deadline at the API: finishing it early")
        poll_every = timedelta(seconds=inp.poll_interval_s)
        try:
            if not await workflow.execute_activity_method(
                BouncerApiActivities.finish_batch,
                bb,
                task_queue=inp.api_task_queue,
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=timedelta(minutes=5),
                retry_policy=API_RETRY,
            ):
                return False
            await workflow.execute_activity_method(
                BouncerApiActivities.await_batch_completion,
                bb,
                task_queue=inp.api_task_queue,
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=max(poll_every * FINISH_POLLS, timedelta(minutes=1)),
                retry_policy=RetryPolicy(initial_interval=min(poll_every, timedelta(seconds=10)), backoff_coefficient=1.0,
                                         non_retryable_error_types=NON_RETRYABLE),
            )
        except ActivityError as err:
            workflow.logger.warning("Bouncer batch %s could not be finished early (%s): deleting it", bb, failure_type(err))
            return False
        return True

    def _show(self, inp: BouncerBatchInput, details: str) -> None:
        """The Web UI's current details, and Lane / BatchState (the phase) as search attributes."""
        workflow.set_current_details(details)
        search.show({search.LANE: inp.lane, search.BATCH_STATE: self._phase})

    async def _pause_lane(self, lane: str, reason: str) -> None:
        await workflow.get_external_workflow_handle(scheduler_id(lane)).signal("pause", LanePause(reason))

    async def _notify(self, workflow_id: str) -> None:
        try:
            await workflow.get_external_workflow_handle(workflow_id).signal("progressed")
        except Exception:  # noqa: BLE001 - a finished or cancelled user batch needs no news
            workflow.logger.info("user batch %s no longer takes signals", workflow_id)

"""The event dispatcher: one workflow (`events-dispatcher`) that delivers every event to its subscribers.

It fetches pending deliveries (the fetch activity fans new `events` rows out and waits on a
NOTIFY when idle), then sends them. Deliveries sharing a key (one subscription, one user
batch) go out one after another in event order, each under a RetryPolicy; different keys go
out concurrently, so one slow or failing subscriber never holds up another, and a user
batch's events reach a subscriber in order. Only delivery ids travel through Temporal.

Continue-as-new does not wait for the chains (a dead subscriber's retries take many minutes,
and every other subscriber's events would wait with them): the next run starts its cursor just
before the oldest delivery not yet settled and fetches again what is still pending. A POST
still under way in the old run holds its row's lease (`deliver`), so it is not sent twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.events import EventActivities
    from workflows.models import DeliveryFailure, DispatcherInput, FetchRequest

DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn
class EventDispatcherWorkflow:
    def __init__(self) -> None:
        self._chains: dict[str, list[tuple[int, int]]] = {}  # key -> (delivery id, ready_seq) waiting their turn
        self._unsettled: dict[int, int] = {}  # delivery id -> ready_seq: handed out, not yet settled
        self._running: set[str] = set()
        self._delivered = 0
        self._failed = 0

    @workflow.signal
    def wake(self) -> None:
        """Sent with signal-with-start; fetches already wake on NOTIFY, so nothing else to do."""

    @workflow.run
    async def run(self, inp: DispatcherInput) -> None:
        self._max_history = inp.max_history_events
        cursor = inp.cursor
        # Before this patch continue-as-new waited for every chain in progress.
        hand_over = workflow.patched("dispatcher-hands-over-chains")
        while not self._should_continue():
            batch = await workflow.execute_activity_method(
                EventActivities.fetch_deliveries,
                FetchRequest(cursor, inp.fetch_wait_s),
                start_to_close_timeout=timedelta(seconds=inp.fetch_wait_s + 60),
                retry_policy=DB_RETRY,
            )
            cursor = batch.cursor
            for ref in batch.deliveries:
                self._unsettled[ref.delivery_id] = ref.ready_seq
                self._chains.setdefault(ref.key, []).append((ref.delivery_id, ref.ready_seq))
                if ref.key not in self._running:
                    self._running.add(ref.key)
                    asyncio.create_task(self._drain(ref.key, inp))
            workflow.set_current_details(
                f"{self._delivered} delivered, {self._failed} failed, {len(self._running)} subscribers busy"
            )
        if hand_over:
            if self._unsettled:  # the next run fetches them again (the ones still pending)
                cursor = min(self._unsettled.values()) - 1
        else:  # chains in progress finished first: the next run started from the cursor
            await workflow.wait_condition(lambda: not self._running)
        workflow.continue_as_new(dataclasses.replace(inp, cursor=cursor))

    async def _drain(self, key: str, inp: DispatcherInput) -> None:
        chain = self._chains[key]
        while chain:
            delivery_id, ready_seq = chain.pop(0)
            try:
                await workflow.execute_activity_method(
                    EventActivities.deliver,
                    delivery_id,
                    # room to wait out an earlier run's attempt (its lease), then post
                    start_to_close_timeout=timedelta(seconds=2 * inp.timeout_s + 60),
                    retry_policy=RetryPolicy(
                        initial_interval=timedelta(seconds=inp.retry_initial_s),
                        backoff_coefficient=2.0,
                        maximum_interval=timedelta(seconds=inp.retry_max_s),
                        maximum_attempts=inp.max_attempts,
                        non_retryable_error_types=["Gone"],
                    ),
                )
                self._delivered += 1
            except ActivityError as err:
                self._failed += 1
                await workflow.execute_activity_method(
                    EventActivities.fail_delivery,
                    DeliveryFailure(delivery_id, f"gave up after {inp.max_attempts} attempts: {err.cause}"),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=DB_RETRY,
                )
            # Settled unless `events retry` made it pending again meanwhile and a fetch handed it out
            # anew (a later ready_seq, further down a chain): that turn is still to come.
            if self._unsettled.get(delivery_id) == ready_seq:
                del self._unsettled[delivery_id]
        del self._chains[key]
        self._running.discard(key)

    def _should_continue(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > self._max_history

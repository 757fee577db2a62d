"""A Bouncer batch that ends before the scheduler has taken its pack's result frees its slot.

The pack activity starts each batch's workflow as soon as its transaction commits, so a batch can
leave the API (the callback receiver's `batch_finished`, done at the API) and be stored (the
batch workflow's) while the scheduler's workflow task for the pack's result is still to run: a
worker restart or a sticky timeout delays it. Those signals are handled first. Before the fix
they found no such batch and did nothing; the result then took the batch's slot, and no signal
was left to free it, so the lane ran one slot short for good.

Three activities stand in for `pack_batches`, `unfinished_batches` and `hold_lane` (same names
and types): the race needs a batch to end between a pack's commit and its result, which the real
pipeline cannot be made to do on cue. Each stand-in pack sends the signals the batches it forms
would send, and returns once they are in the scheduler's history. Temporal is real (the
time-skipping test server).
"""

from __future__ import annotations

import asyncio
import uuid

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from tests.helpers import eventually
from workflows.models import (
    DONE_AT_API,
    BatchFinished,
    LaneHold,
    PackedBatch,
    PackRequest,
    PackResult,
    SchedulerInput,
    SchedulerStatus,
    scheduler_id,
)
from workflows.scheduler import GreedySchedulerWorkflow

LANE = "deliverability"
SIZE = 10_000


async def _signals(handle: WorkflowHandle) -> int:
    history = await handle.fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in history.events)


class Lane:
    """Packs that form one batch each. The first regular pack's batch is stored before its result
    is returned; the first pack ahead's batch (and the batch it follows) leave the API before."""

    def __init__(self, client: Client) -> None:
        self.handle = client.get_workflow_handle(scheduler_id(LANE))
        self.next_id = 1
        self.regular = 0
        self.ahead = 0
        self.formed: list[PackedBatch] = []

    async def finish(self, *signals: tuple[int, str]) -> None:
        before = await _signals(self.handle)
        for bouncer_batch_id, outcome in signals:
            await self.handle.signal(GreedySchedulerWorkflow.batch_finished, BatchFinished(bouncer_batch_id, outcome))
        while await _signals(self.handle) < before + len(signals):
            await asyncio.sleep(0.02)

    def form(self, after: int = 0) -> PackedBatch:
        batch = PackedBatch(self.next_id, SIZE, after=after)
        self.next_id += 1
        self.formed.append(batch)
        return batch

    @activity.defn(name="pack_batches")
    async def pack_batches(self, request: PackRequest) -> PackResult:
        if request.follow:
            self.ahead += 1
            if self.ahead > 1:
                return PackResult([], queue_drained=True)
            batch = self.form(after=request.follow[0])
            # The batch it follows leaves the API; this one is sent, leaves the API in turn.
            await self.finish((batch.after, DONE_AT_API), (batch.bouncer_batch_id, DONE_AT_API))
            return PackResult([batch], queue_drained=False)
        self.regular += 1
        if self.regular > 2:
            return PackResult([], queue_drained=True)
        batch = self.form()
        if self.regular == 1:  # sent, done at the API and stored, all before this result
            await self.finish((batch.bouncer_batch_id, DONE_AT_API), (batch.bouncer_batch_id, "stored"))
        return PackResult([batch], queue_drained=False)

    @activity.defn(name="unfinished_batches")
    async def unfinished_batches(self, lane: str) -> list[PackedBatch]:
        return []

    @activity.defn(name="hold_lane")
    async def hold_lane(self, hold: LaneHold) -> None:
        return None


async def _is(awaitable, expected) -> bool:
    return await awaitable == expected


async def test_a_batch_that_ends_before_its_pack_result_frees_its_slot(skipping_env):
    lane = Lane(skipping_env.client)
    queue = f"race-{uuid.uuid4().hex[:8]}"
    async with Worker(skipping_env.client, task_queue=queue, workflows=[GreedySchedulerWorkflow],
                      activities=[lane.pack_batches, lane.unfinished_batches, lane.hold_lane]):
        handle = await skipping_env.client.start_workflow(
            GreedySchedulerWorkflow.run,
            SchedulerInput(LANE, batch_size=SIZE, max_concurrent_batches=1, standby_batches=1, pack_linger_s=0),
            id=scheduler_id(LANE), task_queue=queue,
        )

        async def counts() -> tuple[int, int, int, int]:
            s: SchedulerStatus = await handle.query(GreedySchedulerWorkflow.status)
            return s.in_flight, s.standby, s.storing, s.free_slots

        # Batch 1 ended before its pack's result, so its slot went to batch 2 (a second pack).
        # While 2 was in flight a pack ahead formed 3 to follow it; 2 and 3 then left the API
        # before that pack's result: both are being stored (which holds the lane's one spare
        # place, so no slot is free), none is in flight, none stands by.
        await eventually(lambda: lane.ahead >= 1, what="the pack ahead")
        await eventually(lambda: _is(counts(), (0, 0, 2, 0)), what="batches 2 and 3 being stored")
        assert [(b.bouncer_batch_id, b.after) for b in lane.formed] == [(1, 0), (2, 0), (3, 2)]

        # Their stores end: the lane packs again (nothing is queued) and is idle, its slot free.
        await lane.finish((2, "stored"), (3, "stored"))
        await eventually(lambda: lane.regular >= 3, what="a pack for the freed slot")
        await eventually(lambda: _is(counts(), (0, 0, 0, 1)), what="the lane idle with its slot free")
        await handle.terminate()

"""A user batch hears every store that commits after its latest read of the progress.

Found by `bench pipeline` (2,000,000 addresses, 20 lists): three lists finished ~53 s after their
last store, at the 60 s recheck. A store that commits after `advance_user_batch` has read the
counts, and whose `progressed` signal reaches the workflow before that read's result, was taken
as seen: the workflow re-armed its wait with the news already counted and waited for the timer.

Two activities stand in for `prepare_user_batch` and `advance_user_batch` (same names and types):
the race needs a store to commit between a read and the read's result, which real stores cannot
be made to do on cue. Temporal is real (the time-skipping test server), and time skipping is off
while the result is awaited, so a wait for the 1-hour recheck timer fails the test.
"""

from __future__ import annotations

import asyncio
import uuid

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from workflows.models import LaneProgress, Progress, Summary, UserBatchInput, user_batch_workflow_id
from workflows.user_batch import UserBatchWorkflow

USER_BATCH_ID = 7
WORKFLOW_ID = user_batch_workflow_id(USER_BATCH_ID)


class Database:
    """The counts one list's stores leave: two Bouncer batches, each store signals after its commit."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.remaining = 2
        self.reads = 0

    def progress(self) -> Progress:
        done = self.remaining == 0
        return Progress(
            USER_BATCH_ID, "queued", rows=2, lanes=[LaneProgress("deliverability", 2, remaining=self.remaining)],
            summary=Summary(USER_BATCH_ID, "completed", 2, {"verified": 2}, {"deliverable": 2}) if done else None,
        )

    async def store_commits(self) -> None:
        self.remaining -= 1
        handle = self.client.get_workflow_handle(WORKFLOW_ID)
        signals = await _signals(handle)
        await handle.signal("progressed")
        while await _signals(handle) == signals:  # in the history before the read's result
            await asyncio.sleep(0.02)

    @activity.defn(name="prepare_user_batch")
    async def prepare_user_batch(self, user_batch_id: int) -> Progress:
        return self.progress()

    @activity.defn(name="advance_user_batch")
    async def advance_user_batch(self, user_batch_id: int) -> Progress:
        self.reads += 1
        read = self.progress()
        if self.reads == 1:
            await self.store_commits()  # the second store, after this read
        return read


async def _signals(handle) -> int:
    history = await handle.fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED for e in history.events)


async def test_a_store_committed_during_a_read_of_the_progress_is_read_at_once(skipping_env):
    db = Database(skipping_env.client)
    queue = f"news-{uuid.uuid4().hex[:8]}"
    async with Worker(skipping_env.client, task_queue=queue, workflows=[UserBatchWorkflow],
                      activities=[db.prepare_user_batch, db.advance_user_batch]):
        handle = await skipping_env.client.start_workflow(
            UserBatchWorkflow.run, UserBatchInput(USER_BATCH_ID, progress_recheck_s=3600),
            id=WORKFLOW_ID, task_queue=queue,
        )
        await db.store_commits()  # the first store: the workflow's first read follows it
        with skipping_env.auto_time_skipping_disabled():
            summary = await asyncio.wait_for(handle.result(), timeout=30)
    assert summary.by_state == {"verified": 2}
    assert db.reads == 2  # the read that missed the second store, then one that saw it
    history = await handle.fetch_history()
    assert not any(e.event_type == EventType.EVENT_TYPE_TIMER_FIRED for e in history.events)

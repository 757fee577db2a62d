"""The callback receiver (callbacks.py) through its HTTP app, against real Postgres and a real
Temporal server: only a callback naming the batch's own id at the API completes it, and no
callback is answered with a 500.

The batch and scheduler workflows are stand-ins started on a task queue no worker polls: their
histories show which signals the receiver sent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

import callbacks
import db
from workflows.models import DONE_AT_API, bouncer_batch_workflow_id, scheduler_id


@dataclass
class Receiver:
    http: httpx.AsyncClient
    client: Client
    db_url: str
    lane: str
    queue: str

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    async def batch(self, state: str = "submitted", provider_id: str | None = "tracked-id", ambiguous: int = 0) -> int:
        """A batch row (token "tok") and a stand-in of its workflow; `ambiguous`: creates sent
        again after one that got no answer."""
        ((bb,),) = self.sql(
            "insert into bouncer_batches (lane, pack_key, state, size, provider_batch_id, callback_token,"
            " ambiguous_creates) values (%s, %s, %s, 1, %s, 'tok', %s) returning id",
            (self.lane, f"test:{uuid.uuid4().hex}", state, provider_id, ambiguous),
        )
        await self.client.start_workflow("BouncerBatchStandIn", id=bouncer_batch_workflow_id(self.lane, bb),
                                         task_queue=self.queue)
        return bb

    async def post(self, bb: int, body: dict | None = None, token: str = "tok") -> httpx.Response:
        return await self.http.post(f"/callbacks/bouncer/{bb}", params={"token": token}, json=body)

    async def signals(self, workflow_id: str, name: str) -> list:
        history = await self.client.get_workflow_handle(workflow_id).fetch_history()
        return [
            (await self.client.data_converter.decode(a.input.payloads, None))
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
            and (a := e.workflow_execution_signaled_event_attributes).signal_name == name
        ]

    async def completed_signals(self, bb: int) -> list:
        return await self.signals(bouncer_batch_workflow_id(self.lane, bb), "completed")

    async def slots_freed(self) -> int:
        return len(await self.signals(scheduler_id(self.lane), "batch_finished"))

    def times(self, bb: int) -> tuple[bool, bool]:
        """(callback_at set, completed_at set) of the batch's row."""
        ((callback, completed),) = self.sql(
            "select callback_at is not null, completed_at is not null from bouncer_batches where id = %s", (bb,))
        return callback, completed

    async def stats(self) -> dict:
        return (await self.http.get("/callbacks/stats")).json()


@pytest.fixture
async def receiver(dev_env, db_url) -> AsyncIterator[Receiver]:
    tag = uuid.uuid4().hex[:8]
    lane, queue = f"lane-{tag}", f"nobody-{tag}"  # a lane of its own: its scheduler is a stand-in too
    client = dev_env.client
    await client.start_workflow("SchedulerStandIn", id=scheduler_id(lane), task_queue=queue)
    pool = db.open_pool(db_url, 4)
    await pool.open()
    transport = httpx.ASGITransport(app=callbacks.create_app(pool, client), raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
            r = Receiver(http, client, db_url, lane, queue)
            yield r
    finally:
        await pool.close()
        for (bb,) in r.sql("select id from bouncer_batches where lane = %s", (lane,)):
            await _terminate(client, bouncer_batch_workflow_id(lane, bb))
        await _terminate(client, scheduler_id(lane))


async def _terminate(client: Client, workflow_id: str) -> None:
    try:
        await client.get_workflow_handle(workflow_id).terminate("test finished")
    except Exception:  # noqa: BLE001 - already ended
        pass


async def test_a_callback_naming_the_tracked_batch_completes_it_and_frees_its_slot(receiver):
    bb = await receiver.batch()
    answer = await receiver.post(bb, {"batchId": "tracked-id", "status": "completed", "quantity": 1})
    assert answer.status_code == 200
    assert await receiver.completed_signals(bb) == [[True]]
    assert await receiver.signals(scheduler_id(receiver.lane), "batch_finished") == [
        [{"bouncer_batch_id": bb, "outcome": DONE_AT_API}]  # BatchFinished, as its JSON
    ]
    assert receiver.times(bb) == (True, True)
    assert (await receiver.stats())["accepted"] == 1


@pytest.mark.parametrize("body", [None, {"status": "completed"}, {"batchId": None}, {"batchId": ""}, [1, 2]],
                         ids=["no-body", "no-batchId", "null-batchId", "empty-batchId", "not-an-object"])
async def test_a_callback_without_a_batch_id_after_an_unanswered_create_is_left_to_the_polls(receiver, body):
    """It cannot be told from the copy the unanswered create may have made: the old receiver signalled
    `completed(False)`, and the batch workflow freed its slot and downloaded a batch still processing."""
    bb = await receiver.batch(ambiguous=1)
    answer = await receiver.post(bb, body)
    assert answer.status_code == 202, answer.text
    assert await receiver.completed_signals(bb) == []
    assert await receiver.slots_freed() == 0
    assert receiver.times(bb) == (True, False)  # heard (the lane's callbacks work), not completed
    stats = await receiver.stats()
    assert (stats["accepted"], stats["unverified"]) == (0, 1)


@pytest.mark.parametrize("body", [None, {"status": "completed"}, {"batchId": None}, [1, 2]],
                         ids=["no-body", "no-batchId", "null-batchId", "not-an-object"])
async def test_a_callback_without_a_batch_id_for_a_batch_created_once_completes_it(receiver, body):
    """The API's callback body is not documented: the per-batch URL and token identify the batch
    when a single create made it (one batch at the API with that URL)."""
    bb = await receiver.batch()
    answer = await receiver.post(bb, body)
    assert answer.status_code == 200, answer.text
    assert await receiver.completed_signals(bb) == [[True]]
    assert await receiver.slots_freed() == 1
    assert receiver.times(bb) == (True, True)
    # Before its create's answer is stored: completed once it lands.
    early = await receiver.batch("submitting", None)

    async def create_answer_lands() -> None:
        await asyncio.sleep(0.3)
        receiver.sql("update bouncer_batches set state = 'submitted', provider_batch_id = 'X' where id = %s", (early,))

    answer, _ = await asyncio.gather(receiver.post(early, body), create_answer_lands())
    assert answer.status_code == 200 and await receiver.completed_signals(early) == [[True]]


@pytest.mark.parametrize("status", ["processing", "queued", "failed", 3])
async def test_a_callback_whose_status_is_not_completed_is_ignored(receiver, status):
    bb = await receiver.batch()
    answer = await receiver.post(bb, {"batchId": "tracked-id", "status": status})
    assert answer.status_code == 202, answer.text
    assert await receiver.completed_signals(bb) == []
    assert await receiver.slots_freed() == 0
    assert receiver.times(bb) == (False, False)
    assert (await receiver.stats())["ignored"] == 1


async def test_a_callback_before_the_creates_answer_is_stored_is_compared_once_it_lands(receiver):
    """Create A's answer was lost, the retry made B; A's callback arrives before B's id is stored:
    refused as stale once B's id lands. This batch's own early callback completes it then."""
    copy, own = await receiver.batch("submitting", None), await receiver.batch("submitting", None)

    async def create_answer_lands(bb: int, provider_id: str) -> None:
        await asyncio.sleep(0.3)
        receiver.sql("update bouncer_batches set state = 'submitted', provider_batch_id = %s where id = %s",
                     (provider_id, bb))

    stale, _ = await asyncio.gather(receiver.post(copy, {"batchId": "A", "status": "completed"}),
                                    create_answer_lands(copy, "B"))
    early, _ = await asyncio.gather(receiver.post(own, {"batchId": "C", "status": "completed"}),
                                    create_answer_lands(own, "C"))
    assert (stale.status_code, early.status_code) == (409, 200)
    assert await receiver.completed_signals(copy) == [] and receiver.times(copy) == (False, False)
    assert await receiver.completed_signals(own) == [[True]] and receiver.times(own) == (True, True)
    assert await receiver.slots_freed() == 1
    stats = await receiver.stats()
    assert (stats["stale"], stats["accepted"]) == (1, 1)


async def test_a_callback_whose_create_answer_never_lands_is_recorded_but_leaves_the_batch_to_its_polls(
    receiver, monkeypatch
):
    monkeypatch.setattr(callbacks, "CREATE_ANSWER_WAIT_S", 0.3)
    bb = await receiver.batch("submitting", None)
    answer = await receiver.post(bb, {"batchId": "A", "status": "completed"})
    assert answer.status_code == 202, answer.text
    assert await receiver.completed_signals(bb) == []
    assert await receiver.slots_freed() == 0
    assert receiver.times(bb) == (True, False)


@pytest.mark.parametrize("token", ["%C3%A9", "tok%C3%A9", "%FF", "%00"])
async def test_a_token_outside_ascii_is_refused_and_counted(receiver, token):
    bb = await receiver.batch()
    answer = await receiver.http.post(f"/callbacks/bouncer/{bb}?token={token}",
                                      json={"batchId": "tracked-id", "status": "completed"})
    assert answer.status_code == 403, answer.text
    assert (await receiver.stats())["refused"] == 1
    assert await receiver.completed_signals(bb) == []


async def test_a_callback_for_a_batch_whose_workflow_ended_is_recorded_and_answered_2xx(receiver):
    """The old receiver let the signal's RPCError through: a 500, no bookkeeping, and a sender
    retrying forever."""
    bb = await receiver.batch()
    await receiver.client.get_workflow_handle(bouncer_batch_workflow_id(receiver.lane, bb)).terminate("gone")
    answer = await receiver.post(bb, {"batchId": "tracked-id", "status": "completed"})
    assert answer.status_code == 200, answer.text
    assert receiver.times(bb) == (True, True)
    assert await receiver.slots_freed() == 1
    assert (await receiver.stats())["accepted"] == 1

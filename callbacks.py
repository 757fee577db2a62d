"""HTTP receiver for Bouncer's completion callbacks: checks the per-batch token, signals the workflow
(and the lane's scheduler, whose slot the batch no longer holds).

The callback URL carries an unguessable token stored on the batch row; anything else is
refused (403) and counted, so a forged or replayed call cannot complete a batch early; a callback
naming another `batchId` (a copy left by an ambiguous create) is refused as stale. Only a callback
naming the batch's own id at the API completes it, or one naming none for a batch created by a
single, answered create (the API holds one batch with that URL). One that cannot be told from a
copy (no id after an unanswered create, or the create's answer not stored in time) is recorded and
answered 202, and the batch's polls decide; one whose `status` is not "completed" is ignored (202).
"""

from __future__ import annotations

import asyncio
import hmac
import logging

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client
from temporalio.service import RPCError

from db import SLOTS_CHANNEL
from activities.dispatch_gate import DISPATCH
from workflows.models import DONE_AT_API, BatchFinished, bouncer_batch_workflow_id, scheduler_id

log = logging.getLogger(__name__)

# A callback can overtake the create's answer being stored (a small batch, ~ms at the sandbox):
# its batchId is compared once the answer lands, if within this long (under a sender's timeout).
CREATE_ANSWER_WAIT_S = 2.0
_CREATE_ANSWER_LOOK_S = 0.05


def _posted(body: bytes) -> tuple[str | None, bool]:
    """The `batchId` the callback names (None if its body is not a JSON object naming one), and
    whether it may say the batch completed (False only for a `status` other than "completed")."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None, True
    if not isinstance(doc, dict):
        return None, True
    value = doc.get("batchId")
    batch_id = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    status = doc.get("status")
    return batch_id or None, status is None or (isinstance(status, str) and status.lower() == "completed")


def _same_token(stored: str, given: str) -> bool:
    # As bytes: compare_digest refuses str with characters outside ASCII (TypeError, a 500).
    return hmac.compare_digest(stored.encode(), given.encode("utf-8", "replace"))


async def _signal_completed(client: Client, lane: str, bouncer_batch_id: int) -> None:
    try:
        await client.get_workflow_handle(bouncer_batch_workflow_id(lane, bouncer_batch_id)).signal("completed", True)
    except RPCError as exc:  # its workflow has ended (terminated, or failed): the row is recorded still
        log.warning("workflow of batch %s not signalled: %s", bouncer_batch_id, exc)


async def _free_slot(client: Client, lane: str, bouncer_batch_id: int) -> None:
    try:
        await client.get_workflow_handle(scheduler_id(lane)).signal(
            "batch_finished", BatchFinished(bouncer_batch_id, DONE_AT_API))
    except RPCError as exc:  # no scheduler running: a fresh one adopts from the database
        log.warning("scheduler of lane %s not signalled for batch %s: %s", lane, bouncer_batch_id, exc)


async def _record(pool: AsyncConnectionPool, bouncer_batch_id: int, verified: bool) -> None:
    """The callback on the batch's row; verified, it is also seen completed at the API, which wakes
    the standby batch following it (activities/bouncer_api.py) to take its slot."""
    done = ", completed_at = coalesce(completed_at, now())" if verified else ""
    try:
        async with pool.connection() as conn:
            await conn.execute(
                f"with b as (update bouncer_batches set callback_at = coalesce(callback_at, now()){done}"
                f" where id = %s returning id) select pg_notify('{SLOTS_CHANNEL}', id::text) from b",
                (bouncer_batch_id,),
            )
    except psycopg.Error as exc:  # a standby follower looks again within a second of the batch's end
        log.warning("callback of batch %s not recorded: %s", bouncer_batch_id, exc)


def create_app(pool: AsyncConnectionPool, client: Client) -> Starlette:
    counts = {"accepted": 0, "refused": 0, "stale": 0, "unverified": 0, "ignored": 0}

    async def batch_row(bb: int) -> tuple | None:
        async with pool.connection() as conn:
            return await (
                await conn.execute(
                    "select lane, callback_token, state, provider_batch_id, ambiguous_creates from bouncer_batches"
                    " where id = %s", (bb,)
                )
            ).fetchone()

    async def receive(request: Request) -> JSONResponse:
        try:
            bb = int(request.path_params["bouncer_batch_id"])
        except ValueError:
            counts["refused"] += 1
            return JSONResponse({"error": "unknown batch"}, status_code=404)
        row = await batch_row(bb)
        if row is None or not _same_token(row[1], request.query_params.get("token", "")):
            counts["refused"] += 1
            return JSONResponse({"error": "forbidden"}, status_code=403)
        lane, _token, state, provider_id, ambiguous = row
        posted, says_completed = _posted(await request.body())
        if not says_completed:
            counts["ignored"] += 1
            return JSONResponse({"status": "ignored: not completed"}, status_code=202)
        # Sent before the create's answer was stored: it may be this batch's (a small one) or the
        # copy an earlier, unanswered create made (chaos run finding). Compared once it lands.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CREATE_ANSWER_WAIT_S
        while provider_id is None and state not in ("stored", "failed") and loop.time() < deadline:
            await asyncio.sleep(_CREATE_ANSWER_LOOK_S)
            _lane, _token, state, provider_id, ambiguous = await batch_row(bb) or row
        if state in ("stored", "failed"):
            counts["refused"] += 1  # a replay after the batch is done
            return JSONResponse({"status": "already done"}, status_code=409)
        if posted is None and provider_id is not None and not ambiguous:
            posted = provider_id  # one create, answered: the URL's batch has one copy at the API, this one
        if posted is None or provider_id is None:
            # Nothing to tell which batch at the API it is about (a create left unanswered may have
            # made a copy with this URL): a completion signal could start the download of a batch
            # still processing and free its slot early. Noted (callbacks reach us: the lane's next
            # batches poll sparsely); the batch's polls decide.
            counts["unverified"] += 1
            await _record(pool, bb, verified=False)
            return JSONResponse({"status": "unverified: left to polling"}, status_code=202)
        if posted != provider_id:
            # A copy created by an ambiguous create (request sent, answer lost, then retried) carries
            # the same URL; its completion says nothing about the batch we track (chaos run finding).
            counts["stale"] += 1
            return JSONResponse({"status": "not the tracked batch"}, status_code=409)
        # Verified done at the API: the lane's scheduler hears it now, not one workflow task later
        # from the batch workflow, which is told so and does not repeat it (one scheduler workflow
        # task less per batch). Both at once: sent one after the other, the completion reached
        # the batch workflow 172–215 ms after the API finished in `bench fairness`, against ~100
        # ms. Should the scheduler's signal fail, the batch's end signal (after its store) frees
        # the slot instead. Recorded with the signals: the standby batch following it refills the
        # slot. A signal that fails (the workflow ended) leaves the bookkeeping done and a 2xx:
        # the sender would retry it forever.
        DISPATCH.heard()  # this process's stores wait for the refill (activities/dispatch_gate.py)
        await asyncio.gather(_signal_completed(client, lane, bb), _free_slot(client, lane, bb), _record(pool, bb, True))
        counts["accepted"] += 1
        return JSONResponse({"status": "ok"})

    async def stats(_request: Request) -> JSONResponse:
        return JSONResponse(counts)

    return Starlette(
        routes=[
            Route("/callbacks/bouncer/{bouncer_batch_id}", receive, methods=["POST"]),
            Route("/callbacks/stats", stats, methods=["GET"]),
        ]
    )

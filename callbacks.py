"""HTTP receiver for Bouncer's completion callbacks: checks the per-batch token, signals the workflow.

The callback URL carries an unguessable token stored on the batch row; anything else is
refused (403) and counted, so a forged or replayed call cannot complete a batch early.
"""

from __future__ import annotations

import hmac

from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.client import Client

from workflows.models import bouncer_batch_workflow_id


def create_app(pool: AsyncConnectionPool, client: Client) -> Starlette:
    counts = {"accepted": 0, "refused": 0}

    async def receive(request: Request) -> JSONResponse:
        try:
            bb = int(request.path_params["bouncer_batch_id"])
        except ValueError:
            counts["refused"] += 1
            return JSONResponse({"error": "unknown batch"}, status_code=404)
        token = request.query_params.get("token", "")
        async with pool.connection() as conn:
            row = await (
                await conn.execute(
                    "select lane, callback_token, state from bouncer_batches where id = %s", (bb,)
                )
            ).fetchone()
        if row is None or not hmac.compare_digest(row[1], token):
            counts["refused"] += 1
            return JSONResponse({"error": "forbidden"}, status_code=403)
        lane, _token, state = row
        if state in ("stored", "failed"):
            counts["refused"] += 1  # a replay after the batch is done
            return JSONResponse({"status": "already done"}, status_code=409)
        await client.get_workflow_handle(bouncer_batch_workflow_id(lane, bb)).signal("completed")
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

"""The worker's operations endpoint (METRICS_LISTEN): /metrics, /healthz, /readyz.

/metrics is ours (prometheus_client) followed by the SDK's (fetched from its loopback
exporter): one port to scrape and to probe. /healthz (liveness) fails when a worker task has
died (not during a drain: the process is stopping on purpose); /readyz (readiness) also fails
while draining or when Postgres does not answer (on a connection of its own, not the pool's).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(
    pool: AsyncConnectionPool, sdk_metrics_url: str | None, alive: Callable[[], bool], draining: Callable[[], bool]
) -> Starlette:
    async def metrics(_request: Request) -> Response:
        body = generate_latest()
        if sdk_metrics_url:
            try:
                async with httpx.AsyncClient(timeout=2.0) as http:  # one scrape every few seconds: no pool
                    sdk = await http.get(sdk_metrics_url)
                body += b"\n" + sdk.content
            except httpx.HTTPError as exc:
                body += f"# the SDK's metrics at {sdk_metrics_url} did not answer: {type(exc).__name__}\n".encode()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request: Request) -> JSONResponse:
        ok = alive()
        return JSONResponse({"alive": ok}, status_code=200 if ok else 503)

    async def readyz(_request: Request) -> JSONResponse:
        if not alive() or draining():
            return JSONResponse({"ready": False, "reason": "draining" if draining() else "a worker stopped"}, 503)
        # A connection of its own: a busy worker's pool may have none free for seconds (every one in
        # a store), and a probe that waited for one would take a healthy worker out of service.
        try:
            async with asyncio.timeout(2.0), await psycopg.AsyncConnection.connect(
                    pool.conninfo, **(pool.kwargs or {})) as conn:
                await conn.execute("select 1")
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return JSONResponse({"ready": False, "reason": f"postgres: {type(exc).__name__}"}, 503)
        return JSONResponse({"ready": True})

    return Starlette(
        routes=[Route("/metrics", metrics), Route("/healthz", healthz), Route("/readyz", readyz)]
    )

"""The sandbox HTTP server: Bouncer's batch API (BOUNCER_API.md) plus `/_sandbox/*` admin.

Every `/v1.1` request passes, in order: fault injection, the `x-api-key` check, the rate
limit of its kind (creations, or everything else), then the handler. Admin endpoints under
`/_sandbox/` need no key, draw no faults and count toward no limit.

Behaviour the public docs leave open, chosen here:
- `Retry-After` is in real seconds, a decimal string ("0.35") because windows shrink with
  `time_scale`; a 429 is not counted in the window.
- Duplicates within a batch (same address ignoring case and surrounding blanks) are
  charged once and appear once in the download, with the first entry's properties.
- `/finish` keeps the credits charged; unverified addresses come back `unknown`/`unknown`.
- Timestamps are real wall-clock times (not scaled), ISO 8601 UTC.
- A dropped connection is a TCP abort before any byte of the answer (see DroppedConnection).
- An injected 5xx (`/_sandbox/faults`, status `error_5xx_status`) comes before the request is
  handled, or with `error_5xx_when: "after"` in place of the answer of a handled request.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hmac
import io
import logging
import math
import os
import pickle
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from sandbox.account import Account, Batch, Clock, iso
from sandbox.callbacks import CallbackSender
from sandbox.faults import FaultConfig, FaultInjector
from sandbox.ratelimit import SlidingWindow
from sandbox.verdicts import STATUSES, decide_catchall

log = logging.getLogger("sandbox")

MAX_BATCH = 100_000
TICK_SECONDS = 0.02
ENDPOINTS = ("create", "status", "download", "finish", "delete", "credits", "other")
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


@dataclass
class SandboxConfig:
    api_key: str
    host: str = "127.0.0.1"
    port: int = 8299
    credits: int = 1_000_000
    time_scale: float = 1.0  # 10.0 = ten times faster: processing, windows, Retry-After
    speed: float = 50.0  # addresses per (scaled) second per processing batch; <= 0: instant
    max_processing: int = 25
    create_per_minute: int = 60
    requests_per_minute: int = 200
    no_limits: bool = False  # lifts rate limits and max_processing
    state_file: str | None = None  # loaded at start, saved at shutdown and on /_sandbox/save


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # The docs show 402's status as a string and 429's as a number; kept as documented.
    code: int | str = str(status) if status == 402 else status
    return _json({"status": code, "error": _REASONS.get(status, "Error"), "message": message}, status, headers)


def _retry_after(seconds: float) -> str:
    return f"{max(0.01, math.ceil(seconds * 100) / 100):.2f}"


class DroppedConnection(Response):
    """Close the client's connection without answering.

    Under uvicorn, the ASGI `send` is a bound method of the request cycle that owns the
    transport; aborting it resets the TCP connection before any byte is written. Elsewhere,
    fall back to headers promising a body that never comes (the server then closes).
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = getattr(scope.get("sandbox.raw_send"), "__self__", None)
        transport = getattr(cycle, "transport", None)
        if transport is not None:
            transport.abort()
            for _ in range(10):  # let connection_lost run so the server skips its own 500
                await asyncio.sleep(0)
                if getattr(cycle, "disconnected", True):
                    break
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"64")]})
        await send({"type": "http.response.body", "body": b"[", "more_body": True})


class Sandbox:
    """Everything a running sandbox knows; one per app."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.clock = Clock()
        window = 60.0 / config.time_scale
        unlimited = config.no_limits
        self.account = Account(
            credits=config.credits,
            speed=config.speed,
            time_scale=config.time_scale,
            max_processing=None if unlimited else config.max_processing,
        )
        self.create_window = SlidingWindow(math.inf if unlimited else config.create_per_minute, window)
        self.request_window = SlidingWindow(math.inf if unlimited else config.requests_per_minute, window)
        self.faults = FaultInjector()
        self.callbacks = CallbackSender()
        self.requests: dict[str, Counter[str]] = {}
        self.batches_created = 0

    def reset(self) -> None:
        self.account.reset()
        self.create_window.clear()
        self.request_window.clear()
        self.faults.configure(FaultConfig())
        self.callbacks.reset()
        self.requests.clear()
        self.batches_created = 0

    def tick(self) -> float:
        """Bring the account up to now and dispatch due callbacks; returns now."""
        now = self.clock.now()
        self.account.advance(now)
        if self.account.completed_since:
            for batch in self.account.completed_since:
                assert batch.callback_url is not None
                self.callbacks.send(batch.callback_url, batch.batch_id, batch.quantity)
            self.account.completed_since.clear()
        return now

    def until_next_tick(self) -> float:
        """Seconds until the ticker should run again: at the next completion, so its callback
        leaves when the batch completes (not up to a tick later), and at least every
        TICK_SECONDS (batches created meanwhile, faults, the catch-all account)."""
        due = self.account.next_due()
        if due is None:
            return TICK_SECONDS
        return min(TICK_SECONDS, max(0.0, due - self.clock.now()))

    def count(self, endpoint: str, status: int | str) -> None:
        self.requests.setdefault(endpoint, Counter())[str(status)] += 1

    # ---- persistence --------------------------------------------------------------------

    def load(self, path: str) -> None:
        with open(path, "rb") as f:
            saved = pickle.load(f)
        account: Account = saved["account"]
        # Rules come from this run's flags; state from the file.
        account.rate, account.max_processing = self.account.rate, self.account.max_processing
        self.account = account
        self.requests = saved["requests"]
        self.batches_created = saved["batches_created"]
        self.callbacks.sent, self.callbacks.failed = saved["callbacks"]

    def save(self, path: str) -> None:
        saved = {
            "account": self.account,
            "requests": self.requests,
            "batches_created": self.batches_created,
            "callbacks": (self.callbacks.sent, self.callbacks.failed),
        }
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(saved, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)


Handler = Callable[[Request, Sandbox, float], Awaitable[Response]]


def api_endpoint(name: str, *, creation: bool = False) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Wrap a /v1.1 handler with faults, auth, the rate limit of its kind and counting."""

    def wrap(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            sandbox: Sandbox = request.app.state.sandbox
            fault, config = sandbox.faults.draw(), sandbox.faults.config
            drop_after = fault.kind == "drop" and config.drop_when == "after"
            error_after = fault.kind == "5xx" and config.error_5xx_when == "after"
            if fault.kind == "drop" and not drop_after:
                sandbox.count(name, "dropped")
                return DroppedConnection()
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.kind == "5xx" and not error_after:
                response = _error(config.error_5xx_status, "injected fault: server error")
            elif fault.kind == "429":
                retry = _retry_after(config.retry_after)
                response = _error(429, "injected fault: rate limited", {"Retry-After": retry})
            else:
                response = await _authorized(request, sandbox, handler, creation)
            if drop_after:
                sandbox.count(name, "dropped")
                return DroppedConnection()
            if error_after:  # handled (a batch made and charged), but the answer is an error
                response = _error(config.error_5xx_status, "injected fault: server error after handling")
            sandbox.count(name, response.status_code)
            return response

        return endpoint

    return wrap


async def _authorized(request: Request, sandbox: Sandbox, handler: Handler, creation: bool) -> Response:
    key = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(key.encode(), sandbox.config.api_key.encode()):
        return _error(401, "missing or invalid API key")
    now = sandbox.tick()
    window = sandbox.create_window if creation else sandbox.request_window
    wait = window.admit(now)
    if wait is not None:
        kind = "batch creations" if creation else "requests"
        limit = int(window.limit)
        return _error(
            429,
            f"more than {limit} {kind} per minute; retry after {_retry_after(wait)} s",
            {"Retry-After": _retry_after(wait)},
        )
    return await handler(request, sandbox, now)


# ---- the Bouncer API ------------------------------------------------------------------------


@api_endpoint("create", creation=True)
async def create_batch(request: Request, sandbox: Sandbox, now: float) -> Response:
    callback = request.query_params.get("callback")
    if callback is not None and not callback.startswith(("http://", "https://")):
        return _error(400, "callback must be an http(s) URL")
    raw = await request.body()
    if request.headers.get("content-type", "").startswith("text/plain"):
        lines = raw.decode("utf-8", "replace").splitlines()
        entries: list[dict[str, Any]] = [{"email": line.strip()} for line in lines if line.strip()]
    else:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "malformed JSON body")
        if not isinstance(body, list):
            return _error(400, "body must be a JSON array of objects with an email property")
        for index, entry in enumerate(body):
            if not isinstance(entry, dict) or not isinstance(entry.get("email"), str):
                return _error(400, f"entry {index} is not an object with a string email property")
        entries = body
    if not entries:
        return _error(400, "no emails in the batch")
    if len(entries) > MAX_BATCH:
        return _error(400, f"too many emails: {len(entries)} > {MAX_BATCH}")
    result = sandbox.account.create(entries, callback, now)
    if isinstance(result, int):
        return _error(402, f"{result} credits left")
    sandbox.batches_created += 1
    sandbox.tick()  # instant batches may already be done: send their callbacks
    return _json(
        {
            "batchId": result.batch_id,
            "created": iso(result.created),
            "status": "queued",
            "quantity": result.quantity,
            "duplicates": result.duplicates,
        }
    )


def _batch_or_404(request: Request, sandbox: Sandbox) -> Batch | Response:
    batch = sandbox.account.get(request.path_params["batch_id"])
    return batch if batch is not None else _error(404, "batch not found")


@api_endpoint("status")
async def batch_status(request: Request, sandbox: Sandbox, now: float) -> Response:
    batch = _batch_or_404(request, sandbox)
    if isinstance(batch, Response):
        return batch
    body: dict[str, Any] = {
        "batchId": batch.batch_id,
        "created": iso(batch.created),
        "started": iso(batch.started),
        "completed": iso(batch.completed),
        "status": batch.status,
        "quantity": batch.quantity,
        "duplicates": batch.duplicates,
    }
    if request.query_params.get("with-stats", "").lower() in ("true", "1", "yes"):
        body["processed"] = sandbox.account.processed(batch, now)
        body["stats"] = sandbox.account.stats_of(batch, now)
    if batch.status == "completed":
        body["credits"] = batch.credits
    return _json(body)


CSV_COLUMNS = ("email", "name", "status", "reason", "score")


@api_endpoint("download")
async def download(request: Request, sandbox: Sandbox, now: float) -> Response:
    which = request.query_params.get("download", "all")
    if which != "all" and which not in STATUSES:
        return _error(400, f"download must be one of all, {', '.join(STATUSES)}")
    batch = _batch_or_404(request, sandbox)
    if isinstance(batch, Response):
        return batch
    if batch.status != "completed":
        return _error(400, "batch not completed")
    records = sandbox.account.records(batch)
    if which == "all":
        sandbox.account.mark_delivered(batch)
    else:
        records = [r for r in records if r["status"] == which]
    if "text/csv" in request.headers.get("accept", ""):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for r in records:
            writer.writerow([r.get(column, "") for column in CSV_COLUMNS])
        return Response(out.getvalue(), media_type="text/csv")
    return _json(records)


@api_endpoint("finish")
async def finish(request: Request, sandbox: Sandbox, now: float) -> Response:
    batch = _batch_or_404(request, sandbox)
    if isinstance(batch, Response):
        return batch
    sandbox.account.finish(batch, now)
    sandbox.tick()
    return Response(status_code=202)


@api_endpoint("delete")
async def delete(request: Request, sandbox: Sandbox, now: float) -> Response:
    batch = _batch_or_404(request, sandbox)
    if isinstance(batch, Response):
        return batch
    sandbox.account.delete(batch, now)
    return Response(status_code=200)


@api_endpoint("credits")
async def credits(request: Request, sandbox: Sandbox, now: float) -> Response:
    return _json({"credits": sandbox.account.credits})


@api_endpoint("other")
async def unknown_call(request: Request, sandbox: Sandbox, now: float) -> Response:
    return _error(404, f"no such endpoint: {request.method} {request.url.path}")


# ---- /_sandbox admin --------------------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ValueError("malformed JSON body") from exc


async def admin_stats(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    sandbox.tick()
    account = sandbox.account
    return _json(
        {
            "requests": {name: dict(counts) for name, counts in sandbox.requests.items()},
            "batches_created": sandbox.batches_created,
            "batches": account.counts(),
            "addresses_received": account.addresses_received,
            "unique_addresses_received": len(account.seen),
            "addresses_sent_twice": len(account.seen_twice),
            "addresses_sent_after_result": len(account.sent_after_result),
            "credits": account.credits,
            "credits_charged": account.credits_charged,
            "max_processing_seen": account.max_processing_seen,
            "callbacks_sent": sandbox.callbacks.sent,
            "callbacks_failed": sandbox.callbacks.failed,
        }
    )


async def admin_batches(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    sandbox.tick()
    return _json(
        [
            {
                "batchId": b.batch_id,
                "status": b.status,
                "quantity": b.quantity,
                "duplicates": b.duplicates,
                "created": iso(b.created),
                "started": iso(b.started),
                "completed": iso(b.completed),
                "callback": b.callback_url is not None,
            }
            for b in sandbox.account.batches.values()
        ]
    )


async def admin_faults(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    if request.method == "POST":
        try:
            sandbox.faults.configure(FaultConfig.parse(await _json_body(request)))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
    return _json(sandbox.faults.config.as_json())


async def admin_credits(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    if request.method == "POST":
        try:
            body = await _json_body(request)
        except ValueError as exc:
            return _error(400, str(exc))
        value = body.get("credits") if isinstance(body, dict) else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return _error(400, "credits must be a non-negative integer")
        sandbox.account.credits = value
    return _json({"credits": sandbox.account.credits})


async def admin_reset(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    sandbox.reset()
    for linked in getattr(request.app.state, "linked", ()):  # the top-level reset also resets /catchall
        linked.reset()
    return _json({"reset": True})


async def admin_save(request: Request) -> Response:
    sandbox: Sandbox = request.app.state.sandbox
    if not sandbox.config.state_file:
        return _error(400, "no state file configured")
    sandbox.save(sandbox.config.state_file)
    return _json({"saved": sandbox.config.state_file})


# ---- assembly ---------------------------------------------------------------------------------


class SandboxApp(Starlette):
    """Starlette, plus the server's own `send` kept in the scope for DroppedConnection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["sandbox.raw_send"] = send
        await super().__call__(scope, receive, send)


async def _ticker(sandbox: Sandbox) -> None:
    while True:
        await asyncio.sleep(sandbox.until_next_tick())
        try:
            sandbox.tick()
        except Exception:  # keep ticking; a bug here must not freeze every batch
            log.exception("sandbox tick failed")


ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


CATCHALL_PREFIX = "/catchall"


def create_app(config: SandboxConfig) -> Starlette:
    """A Starlette app serving the sandbox described by `config` (host/port unused here).

    Under `/catchall` a second, independent account (own credits, limits, stats, faults)
    speaks the same API and answers with `catchall_verdict`: the catchall lane's endpoint.
    """
    sandbox = Sandbox(config)
    catchall = Sandbox(dataclasses.replace(config, state_file=None))
    catchall.account.decide = decide_catchall

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if config.state_file and os.path.exists(config.state_file):
            sandbox.load(config.state_file)
        tickers = [asyncio.get_running_loop().create_task(_ticker(sb)) for sb in (sandbox, catchall)]
        try:
            yield
        finally:
            for ticker in tickers:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            await sandbox.callbacks.aclose()
            await catchall.callbacks.aclose()
            if config.state_file:
                sandbox.save(config.state_file)

    catchall_app = SandboxApp(routes=_routes())
    catchall_app.state.sandbox = catchall
    app = SandboxApp(routes=[Mount(CATCHALL_PREFIX, app=catchall_app), *_routes()], lifespan=lifespan)
    app.state.sandbox = sandbox
    app.state.linked = [catchall]
    return app


def _routes() -> list[Route]:
    batch = "/v1.1/email/verify/batch"
    return [
        Route(batch, create_batch, methods=["POST"]),
        Route(batch + "/{batch_id}", batch_status, methods=["GET"]),
        Route(batch + "/{batch_id}", delete, methods=["DELETE"]),
        Route(batch + "/{batch_id}/download", download, methods=["GET"]),
        Route(batch + "/{batch_id}/finish", finish, methods=["POST"]),
        Route("/v1.1/credits", credits, methods=["GET"]),
        Route("/v1.1/{rest:path}", unknown_call, methods=ALL_METHODS),
        Route("/_sandbox/stats", admin_stats, methods=["GET"]),
        Route("/_sandbox/batches", admin_batches, methods=["GET"]),
        Route("/_sandbox/faults", admin_faults, methods=["GET", "POST"]),
        Route("/_sandbox/credits", admin_credits, methods=["GET", "POST"]),
        Route("/_sandbox/reset", admin_reset, methods=["POST"]),
        Route("/_sandbox/save", admin_save, methods=["POST"]),
    ]

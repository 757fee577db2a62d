"""The HTTP API: submit lists, follow them, fetch results, pause/resume/cancel, dead letters, lanes, health.

Starlette, not FastAPI: the two endpoints that matter most stream their bodies (uploads into
COPY, results out of COPY or a server-side cursor), so they take the raw request and response anyway,
and FastAPI's generated schema would have to be overridden for exactly those. The OpenAPI
document is written out in `api/openapi.py` and the tests check the running server against it.

Every route but /healthz and /openapi.json needs `Authorization: Bearer <key>`; a key sees only
its user's batches (others' answer 404, as unknown ones do). Errors are JSON: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import parse_qsl

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

import db
import schedules
from db import outcomes
import temporal_client
from activities.events import record_event
from activities.ingest import IngestStats, UnreadableInput, copy_rows
from activities.user_batches import in_lane_order, lane_problem
from api import keys, openapi
from api.uploads import BadBody, arriving, charset_codec, csv_rows, decoded, gunzipped, json_rows, limited
from api.uploads import multipart_file, part_decoded, pull
from settings import LANES, Settings
from workflows import search
from workflows.models import FINISHED_STATES, PRIORITIES, LanePause, SchedulerStatus, UserBatchInput
from workflows.models import scheduler_id, user_batch_workflow_id

MAX_BIGINT = 2**63 - 1
SUBMISSIONS_LOCK = 74_211_003  # advisory lock, with hashtext(user): one user's hourly-limit claims at a time
log = logging.getLogger("api")
UPDATE_TIMEOUT = timedelta(seconds=20)  # pause/resume wait for a worker to run the update
BUSY_RETRY_AFTER_S = 5  # Retry-After of a request refused because its slots are taken
HEALTH_TIMEOUT_S = 0.8  # /healthz's Postgres check: inside the 1 s of a Kubernetes probe (deploy/k8s/api.yaml)
SEND_PIECE = 64 * 1024  # a result download is sent in pieces this big: a stalled client pins at most ~2 of them


class ApiError(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Slots:
    """Admission of requests that hold a thread or a Postgres connection for as long as their client
    takes: at most `total` at once in this process, `per_user` of them one user's, so one tenant's
    slow clients cannot take what every tenant needs. Over either the request is refused at once
    (429 for the user's own cap, 503 for the process's), with Retry-After: a queue would only move
    the wait. Used from the event loop only, so plain counters do."""

    def __init__(self, what: str, total: int, per_user: int, total_setting: str, per_user_setting: str) -> None:
        self.what, self.total, self.per_user = what, total, per_user
        self.total_setting, self.per_user_setting = total_setting, per_user_setting
        self.by_user: Counter[str] = Counter()

    def take(self, user: str) -> Callable[[], None]:
        """A slot for `user` (ApiError 429 or 503 if none is free); call what is returned, once, to give it back."""
        if self.by_user[user] >= self.per_user:
            raise ApiError(429, f"{self.per_user} {self.what} of this user already in progress "
                                f"({self.per_user_setting}); retry once one ends", retry_after=BUSY_RETRY_AFTER_S)
        if self.by_user.total() >= self.total:
            raise ApiError(503, f"{self.total} {self.what} already in progress on this server ({self.total_setting});"
                                " retry later", retry_after=BUSY_RETRY_AFTER_S)
        self.by_user[user] += 1

        def give_back() -> None:
            self.by_user[user] -= 1
            if not self.by_user[user]:
                del self.by_user[user]

        return give_back


class Services:
    """What the routes share: settings, the Postgres pool, and a Temporal client made on first use
    (the API starts, and /healthz answers, even while Temporal is unreachable).

    Work that lasts as long as its client takes never holds what every request needs: uploads run on
    threads of their own (each COPYs on a connection of its own), never the default executor that the
    dead-letter routes and DNS lookups use; result downloads stream from a pool of their own, never
    `pool`, which authenticates every request; /healthz has a connection of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: AsyncConnectionPool = db.open_pool(settings.database_url, settings.api_db_pool_size)
        self.upload_threads = ThreadPoolExecutor(settings.api_uploads, thread_name_prefix="upload")
        self.uploads = Slots("uploads", settings.api_uploads, settings.api_uploads_per_user,
                             "API_UPLOADS", "API_UPLOADS_PER_USER")
        self.export_pool = db.open_pool(settings.database_url, settings.api_exports)
        self.exports = Slots("result downloads", settings.api_exports, settings.api_exports_per_user,
                             "API_EXPORTS", "API_EXPORTS_PER_USER")
        self.health_pool = db.open_pool(settings.database_url, 1)
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def temporal(self) -> Client:
        async with self._lock:
            if self._client is None:
                s = self.settings
                try:  # with the workers' payload codec: queries and updates answer in ciphertext
                    self._client = await temporal_client.connect(s)
                except (RuntimeError, ValueError) as exc:
                    log.warning("cannot reach Temporal at %s: %s", s.temporal_address, exc)
                    raise ApiError(503, f"cannot reach Temporal at {s.temporal_address}: {exc}") from None
            return self._client


class KeyAuth:
    """ASGI middleware: resolve the bearer key to its user before any /v1 route runs."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        found = None
        if scheme.lower() == "bearer" and token.strip():
            try:
                async with self.services.pool.connection(timeout=10) as conn:
                    found = await keys.lookup(conn, token.strip())
            except (psycopg.OperationalError, PoolTimeout) as exc:
                await error(503, f"Postgres unreachable: {type(exc).__name__}; retry later")(scope, receive, send)
                return
        if found is None:
            resp = error(401, "missing or unknown API key: send `Authorization: Bearer <key>` "
                              "(create one with `starter.py apikeys create --user U`)")
            resp.headers["WWW-Authenticate"] = "Bearer"
            await resp(scope, receive, send)
            return
        scope.setdefault("state", {})["key"] = found
        await self.app(scope, receive, send)


def create_app(settings: Settings) -> Starlette:
    services = Services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        pools = (services.pool, services.export_pool, services.health_pool)
        for pool in pools:
            await pool.open()
        try:
            yield
        finally:
            services.upload_threads.shutdown(wait=False)  # the server has let running uploads end
            for pool in pools:
                await pool.close()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi_doc, methods=["GET"]),
        Route("/v1/batches", _by_method(POST=submit_batch, GET=list_batches), methods=["GET", "POST"]),
        Route("/v1/batches/{id}", _by_method(GET=get_batch, DELETE=cancel_batch), methods=["GET", "DELETE"]),
        Route("/v1/batches/{id}/results", get_results, methods=["GET"]),
        Route("/v1/batches/{id}/pause", pause_batch, methods=["POST"]),
        Route("/v1/batches/{id}/resume", resume_batch, methods=["POST"]),
        Route("/v1/batches/{id}/dead-letters", list_batch_dead_letters, methods=["GET"]),
        Route("/v1/batches/{id}/dead-letters/retry", retry_batch_dead_letters, methods=["POST"]),
        Route("/v1/lanes", get_lanes, methods=["GET"]),
        Route("/v1/lanes/{lane}/pause", pause_lane, methods=["POST"]),
        Route("/v1/lanes/{lane}/resume", resume_lane, methods=["POST"]),
    ]

    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        messages = {404: "no such route", 405: "method not allowed on this route"}
        message = messages.get(exc.status_code, exc.detail)
        path = request.url.path
        if exc.status_code == 404 and path != "/" and path.endswith("/"):
            message += f" (routes have no trailing slash: {path.rstrip('/') or '/'})"
        resp = error(exc.status_code, message)
        resp.headers.update(exc.headers or {})  # 405: Allow names the route's methods
        return resp

    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        resp = error(exc.status, str(exc))
        if exc.retry_after is not None:
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp

    async def on_db_down(_request: Request, exc: Exception) -> JSONResponse:
        return error(503, f"Postgres unreachable: {type(exc).__name__}; retry later")

    async def on_client_gone(request: Request, _exc: ClientDisconnect) -> Response:
        # The upload's transaction rolled back: nothing was stored, and nobody is left to answer.
        log.info("%s %s: the client disconnected before its request was read", request.method, request.url.path)
        return Response(status_code=400)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal error (logged); retry later or report it")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(KeyAuth, services=services)],
        # Handlers by class answer and are done; the `Exception` one answers 500 and the server
        # logs the traceback as well.
        exception_handlers={HTTPException: on_http_error, ApiError: on_api_error, ClientDisconnect: on_client_gone,
                            psycopg.OperationalError: on_db_down, PoolTimeout: on_db_down,
                            Exception: on_unexpected},
    )
    # No redirect of `/v1/batches/` to `/v1/batches`: Starlette's is an absolute URL of the scheme the
    # API sees, plain http behind a TLS ingress, and a client following it re-sends its key and list
    # there (or cannot replay a streamed body at all). A 404 that names the route instead.
    app.router.redirect_slashes = False
    app.state.services = services
    return app


def _by_method(**endpoints):
    """One route for a path's methods, so a 405 there names all of them in `Allow`."""
    async def endpoint(request: Request) -> Response:
        return await endpoints["GET" if request.method == "HEAD" else request.method](request)

    return endpoint


def _services(request: Request) -> Services:
    return request.app.state.services


def _user(request: Request) -> str:
    return request.state.key.user_id


def _batch_id(request: Request) -> int:
    """A user batch id from the path; anything that cannot be one is simply not found."""
    raw = request.path_params["id"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_BIGINT:
        raise ApiError(404, f"no user batch {raw!r}")
    return int(raw)


async def _owned_batch(request: Request, ub: int | None = None) -> dict:
    """The caller's user batch row (the path's id by default), or 404 (an id of another user's batch looks unknown)."""
    ub = _batch_id(request) if ub is None else ub
    async with _services(request).pool.connection() as conn:
        cur = await conn.execute(
            "select id, user_id, name, priority, lanes, state, rows_total, invalid, duplicates, workflow_id,"
            " created_at, finished_at, summary from user_batches where id = %s and user_id = %s",
            (ub, _user(request)),
        )
        row = await cur.fetchone()
        if row is None:
            raise ApiError(404, f"no user batch {ub}")
        lanes = await (await conn.execute(outcomes.LANE_QUERY, (ub,))).fetchall()
    return batch_doc(row, lanes)


def batch_doc(row: tuple, lanes: list | None) -> dict:
    doc = {
        "id": row[0], "user": row[1], "name": row[2], "priority": PRIORITIES[row[3]], "lanes": list(row[4]),
        "state": row[5], "rows": row[6], "invalid": row[7], "duplicates": row[8], "workflow_id": row[9],
        "created_at": row[10].isoformat(), "finished_at": row[11].isoformat() if row[11] else None,
        "summary": row[12],
    }
    if lanes is not None:
        doc |= outcomes.lane_progress(lanes)
    return doc


# ---- health and schema ------------------------------------------------------------------


async def _select_1(pool: AsyncConnectionPool) -> None:
    async with pool.connection() as conn:
        await conn.execute("select 1")


async def healthz(request: Request) -> JSONResponse:
    """Postgres and Temporal reachable: 200; otherwise 503 naming what is down (unauthenticated: no
    address or error text, those go to the log)."""
    services = _services(request)
    checks: dict[str, str] = {}
    try:  # on a connection of its own: busy requests must not make a replica look down
        await asyncio.wait_for(_select_1(services.health_pool), HEALTH_TIMEOUT_S)
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "down"; the log says why
        log.warning("/healthz: Postgres check failed: %r", exc)
        checks["postgres"] = "down: Postgres unreachable"
    try:
        client = await services.temporal()  # logs why it cannot connect
        await asyncio.wait_for(client.service_client.check_health(), timeout=5)
        checks["temporal"] = "ok"
    except Exception as exc:  # noqa: BLE001
        if not isinstance(exc, ApiError):
            log.warning("/healthz: Temporal health check failed: %r", exc)
        checks["temporal"] = "down: Temporal unreachable"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", **checks}, status_code=200 if ok else 503)


async def openapi_doc(_request: Request) -> JSONResponse:
    return JSONResponse(openapi.DOCUMENT)


# ---- batches ----------------------------------------------------------------------------


def _only_params(request: Request, *known: str) -> None:
    """Refuse query parameters the route does not know (a typo must not be silently ignored), and
    a query string whose percent-escapes are not UTF-8 (they would be read as U+FFFD)."""
    try:
        pairs = parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, "the query string's percent-escapes are not UTF-8: encode values as UTF-8") from None
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise ApiError(400, f"unknown query parameter {', '.join(map(repr, unknown))}; "
                            f"this route takes: {', '.join(known) or 'none'}")
    # `?status=deliverable&status=risky` would be read as its last value alone, silently.
    if repeated := sorted(name for name, n in Counter(name for name, _ in pairs).items() if n > 1):
        raise ApiError(400, f"query parameter {', '.join(map(repr, repeated))} given more than once; give it once"
                            " (a list: comma-separated, as status=deliverable,risky)")


def _submit_options(request: Request, settings: Settings) -> dict:
    q = request.query_params
    _only_params(request, "name", "priority", "lanes", "column", "max_age")
    priority = q.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ApiError(400, f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
    lanes = [x.strip() for x in q.get("lanes", "deliverability").split(",") if x.strip()]
    bad = [x for x in lanes if x not in LANES]
    if bad or not lanes:
        raise ApiError(400, f"unknown lane {', '.join(bad) or '(none)'}; lanes are: {', '.join(LANES)}")
    if problem := lane_problem(lanes, settings):
        raise ApiError(400, problem)
    name = q.get("name", "")
    if len(name) > 200 or "\x00" in name:
        raise ApiError(400, "name must be at most 200 characters, without NUL")
    column = q.get("column") or None
    if column is not None and ("\x00" in column or len(column) > 200):
        raise ApiError(400, "column must be a header name or a 1-based number")
    max_age_s = None
    if "max_age" in q:
        try:
            max_age_s = schedules.parse_max_age(q["max_age"])
        except ValueError as exc:
            raise ApiError(400, f"max_age: {exc}") from None
    return {"name": name, "priority": priority, "lanes": in_lane_order(lanes), "column": column,
            "max_age_s": max_age_s}


class KeyUsed(Exception):
    """An Idempotency-Key this user sent before (a concurrent request stored its batch first)."""


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 200 and key.isprintable()):
        raise ApiError(400, "Idempotency-Key must be 1 to 200 printable characters")
    return key


async def _replay(request: Request, key: str) -> JSONResponse | None:
    """The batch an earlier request with this Idempotency-Key created, if any (200, not 201)."""
    async with _services(request).pool.connection() as conn:
        row = await (await conn.execute(
            "select id from user_batches where user_id = %s and idempotency_key = %s", (_user(request), key)
        )).fetchone()
    if row is None:
        return None
    return JSONResponse(await _owned_batch(request, row[0]), headers={"Location": f"/v1/batches/{row[0]}",
                                                              "Idempotent-Replayed": "true"})


def _ingest(settings: Settings, user: str, opts: dict, source: str, rows,
            key: str | None = None, claim: int | None = None) -> tuple[int, IngestStats]:
    """In a worker thread: one transaction creates the user batch, COPYs its rows and deletes the
    upload's `claim` (`_claim_submission`): the batch takes the claim's place in the user's hour.

    Any failure (bad body, client gone) rolls the whole submission back: nothing half-stored.
    """
    with psycopg.connect(settings.database_url) as conn, conn.transaction():
        try:
            (ub,) = conn.execute(
                "insert into user_batches (user_id, name, priority, lanes, source, idempotency_key, max_result_age_s)"
                " values (%s, %s, %s, %s, %s, %s, %s) returning id",
                (user, opts["name"] or "api upload", PRIORITIES.index(opts["priority"]), opts["lanes"], source, key,
                 opts["max_age_s"]),
            ).fetchone()
        except psycopg.errors.UniqueViolation:
            raise KeyUsed() from None
        stats = copy_rows(conn, ub, rows)
        if stats.rows == 0:
            raise BadBody("the list has no rows")
        conn.execute(
            "update user_batches set rows_total = %s, invalid = %s, workflow_id = %s where id = %s",
            (stats.rows, stats.invalid, user_batch_workflow_id(ub), ub),
        )
        if claim is not None:
            conn.execute("delete from api_upload_claims where id = %s", (claim,))
    return ub, stats


# The user's newest `limit` submissions younger than an hour: batches (the (user_id, id) index) and
# uploads in progress, those sent with one Idempotency-Key counted once (they store one batch at
# most), and none with the request's own key (the request is the one it may store).
_RECENT_SUBMISSIONS = """
    select extract(epoch from min(t) + interval '1 hour' - now()), count(*) from (
        select t from (
            (select created_at as t from user_batches where user_id = %(user)s order by id desc limit %(limit)s)
            union all
            (select min(claimed_at) from api_upload_claims
             where user_id = %(user)s and coalesce(idempotency_key <> %(key)s, true)
             group by idempotency_key, case when idempotency_key is null then id end)
        ) submitted where t > now() - interval '1 hour' order by t desc limit %(limit)s) recent
"""


async def _claim_submission(request: Request, limit: int, key: str | None) -> int | None:
    """API_SUBMISSIONS_PER_HOUR: take a place in the user's hour before the body is read, or refuse
    (429) with the seconds until the oldest submission counted is an hour old.

    Stored batches and uploads in progress count alike, and the count and the claim are one step
    under a per-user lock: uploads that arrive together cannot all pass. Returns the claim's id
    (None: no limit), which `_ingest` deletes with the batch it stores and `_release` otherwise;
    one left by a crashed API counts until its hour is over.
    """
    if not limit:
        return None
    user = _user(request)
    async with _services(request).pool.connection() as conn, conn.transaction():
        await conn.execute("select pg_advisory_xact_lock(%s::int, hashtext(%s))", (SUBMISSIONS_LOCK, user))
        await conn.execute(  # left by a crash; no longer counted
            "delete from api_upload_claims where user_id = %s and claimed_at < now() - interval '1 hour'", (user,))
        wait_s, recent = await (await conn.execute(
            _RECENT_SUBMISSIONS, {"user": user, "limit": limit, "key": key})).fetchone()
        if recent >= limit and wait_s is not None and wait_s > 0:
            raise ApiError(429, f"{limit} lists submitted in the last hour (API_SUBMISSIONS_PER_HOUR); "
                                f"the next is accepted in {math.ceil(wait_s)} s", retry_after=math.ceil(wait_s))
        (claim,) = await (await conn.execute(
            "insert into api_upload_claims (user_id, idempotency_key) values (%s, %s) returning id", (user, key),
        )).fetchone()
    return claim


async def _release(request: Request, claim: int) -> None:
    """Give back the place of an upload that stored nothing (refused, broken, or a replay)."""
    try:
        async with _services(request).pool.connection(timeout=10) as conn:
            await conn.execute("delete from api_upload_claims where id = %s", (claim,))
    except (psycopg.OperationalError, PoolTimeout) as exc:  # it counts until its hour is over
        log.warning("upload claim %s not released: %s", claim, type(exc).__name__)


async def submit_batch(request: Request) -> JSONResponse:
    """Stream the body into Postgres (COPY, in one transaction) and start the UserBatchWorkflow."""
    services = _services(request)
    settings = services.settings
    opts = _submit_options(request, settings)
    key = _idempotency_key(request)
    if key is not None and (replayed := await _replay(request, key)):
        return replayed  # a retried submission: nothing stored twice
    client = await services.temporal()  # first: an unreachable Temporal must not leave rows behind
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    max_bytes = settings.api_max_upload_mb * 1024 * 1024
    body = limited(arriving(request.stream(), settings.api_client_idle_timeout_s), max_bytes)
    loop = asyncio.get_running_loop()
    if ctype not in ("multipart/form-data", "text/csv", "text/plain", "application/json"):
        raise ApiError(415, f"unsupported Content-Type {ctype or '(none)'}: send multipart/form-data with a "
                            "`file` part, text/csv, or application/json (an array of address strings)")
    # Only gzip is decompressed (told by its magic bytes); a deflate or br body would be read as text.
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise ApiError(415, f"unsupported Content-Encoding {encoding!r}: send the body as is, or gzip")
    if ctype == "application/json" and opts["column"] is not None:
        raise ApiError(400, "column applies to CSV bodies; a JSON body is an array of address strings")
    try:
        codec = None if ctype == "multipart/form-data" else charset_codec(content_type)
    except BadBody as exc:
        raise ApiError(exc.status, str(exc)) from None
    # A gzip body (or `file` part) is decompressed first, then its charset applies.
    if ctype == "multipart/form-data":
        part: dict[str, str] = {}  # the `file` part's own Content-Type, its charset read as a body's
        chunks = gunzipped(pull(multipart_file(body, content_type, part), loop), "the `file` part", max_bytes)
        rows, source = csv_rows(part_decoded(chunks, part), opts["column"]), "api: multipart upload"
    elif ctype == "application/json":
        chunks = gunzipped(pull(body, loop), "the request body", max_bytes)
        rows, source = json_rows(decoded(chunks, codec)), "api: json list"
    else:
        chunks = gunzipped(pull(body, loop), "the request body", max_bytes)
        rows, source = csv_rows(decoded(chunks, codec), opts["column"]), "api: csv body"
    claim = await _claim_submission(request, settings.api_submissions_per_hour, key)
    stored = False
    give_back = None
    try:
        give_back = services.uploads.take(_user(request))
        ub, stats = await loop.run_in_executor(
            services.upload_threads,
            functools.partial(_ingest, settings, _user(request), opts, source, rows, key, claim))
        stored = True
    except KeyUsed:
        return await _replay(request, key)
    except BadBody as exc:
        raise ApiError(exc.status, str(exc)) from None
    except UnreadableInput as exc:
        raise ApiError(400, str(exc)) from None
    finally:
        if give_back is not None:
            give_back()
        if claim is not None and not stored:
            await _release(request, claim)
    from workflows.user_batch import UserBatchWorkflow

    try:
        await client.start_workflow(
            UserBatchWorkflow.run, UserBatchInput(ub), id=user_batch_workflow_id(ub), task_queue=settings.task_queue,
            search_attributes=search.at_start(_user(request), opts["priority"], opts["lanes"][0], "preparing"),
            static_summary=f"user batch {ub} of {_user(request)}: {stats.rows:,} rows, priority {opts['priority']}"
                           " (HTTP API)",
        )
    except RPCError as exc:
        # The answer says "retry": the batch gives its Idempotency-Key back, so a retry with the same
        # key stores the list anew instead of replaying this failed batch for good.
        async with services.pool.connection() as conn, conn.transaction():
            await conn.execute("update user_batches set state = 'failed', finished_at = now(), idempotency_key = null"
                               " where id = %s", (ub,))
            await record_event(conn, "user_batch.failed", ub, _user(request),
                               {"user_batch_id": ub, "reason": "workflow did not start"})
        raise ApiError(503, f"user batch {ub} stored but its workflow did not start: {exc.message}; retry (with the"
                            " same Idempotency-Key, if any: it was not used up)") from None
    doc = {"id": ub, "workflow_id": user_batch_workflow_id(ub), "state": "receiving", "rows": stats.rows,
           "invalid": stats.invalid, "invalid_rows": stats.invalid_rows, "header": stats.header}
    return JSONResponse(doc, status_code=201, headers={"Location": f"/v1/batches/{ub}"})


async def list_batches(request: Request) -> JSONResponse:
    """The caller's most recent user batches (newest first)."""
    _only_params(request, "limit", "before")
    raw = request.query_params.get("limit", "50")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise ApiError(400, "limit must be a whole number from 1 to 500")
    before = request.query_params.get("before", str(MAX_BIGINT))  # the next page: the last id of this one
    if not before.isascii() or not before.isdigit() or not 1 <= int(before) <= MAX_BIGINT:
        raise ApiError(400, "before must be a batch id (a whole number from 1): the last id of the previous page")
    async with _services(request).pool.connection() as conn:
        rows = await (await conn.execute(
            "select id, user_id, name, priority, lanes, state, rows_total, invalid, duplicates, workflow_id,"
            " created_at, finished_at, summary from user_batches where user_id = %s and id < %s"
            " order by id desc limit %s",
            (_user(request), int(before), int(raw)),
        )).fetchall()
    return JSONResponse({"batches": [batch_doc(r, None) for r in rows]})


async def get_batch(request: Request) -> JSONResponse:
    """Counts and per-lane progress, from Postgres (the source of truth the workflow reads too)."""
    _only_params(request)
    return JSONResponse(await _owned_batch(request))


async def get_results(request: Request) -> Response:
    """Per-row results in input order, streamed as Postgres renders them (CSV by COPY, JSON by a cursor)."""
    _only_params(request, "format", "status", "columns")
    doc = await _owned_batch(request)
    fmt = request.query_params.get("format", "csv")
    if fmt not in ("csv", "json", "jsonl"):
        raise ApiError(400, f"format {fmt!r} is not csv, json or jsonl")
    try:
        status_filter = outcomes.status_filter(request.query_params.get("status"))
        columns = outcomes.chosen_columns(request.query_params.get("columns"), outcomes.columns(doc["lanes"]))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    services = _services(request)
    give_back = services.exports.take(_user(request))
    return ResultDownload(
        _result_stream(services.export_pool, doc["id"], status_filter, fmt, columns),
        services.settings.api_client_idle_timeout_s, give_back,
        media_type={"csv": "text/csv; charset=utf-8", "json": "application/json", "jsonl": "application/jsonl"}[fmt],
        headers={"Content-Disposition": f'attachment; filename="user-batch-{doc["id"]}.{fmt}"'},
    )


class ClientStalled(Exception):
    """The client of a result download read nothing for API_CLIENT_IDLE_TIMEOUT_S."""


class ResultDownload(StreamingResponse):
    """A result download: its Postgres connection and transaction are held while the client reads,
    so a client that reads nothing for `idle_s` is cut off (the connection closed, the download
    incomplete), and the connection and the export slot go back as the response ends, however it
    ends. The first chunk is read before the status line: Postgres down is still a 503."""

    def __init__(self, chunks: AsyncIterator[bytes], idle_s: float, give_back: Callable[[], None],
                 **kwargs) -> None:
        super().__init__(chunks, **kwargs)
        self.chunks, self.idle_s, self.give_back = chunks, idle_s, give_back
        self.head = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.head = scope.get("method") == "HEAD"  # the status and headers only: no export for nobody
        try:
            await super().__call__(scope, receive, send)
        except ClientStalled:
            # The server logs the response as incomplete and closes the connection: the client sees
            # a truncated body, never one that looks whole.
            log.warning("GET %s: the client read nothing for %g s (API_CLIENT_IDLE_TIMEOUT_S): download cut off",
                        scope["path"], self.idle_s)
        finally:
            try:
                await self.chunks.aclose()  # the transaction ends, the connection goes back to the export pool
            finally:
                self.give_back()

    async def stream_response(self, send: Send) -> None:
        chunk = await anext(self.chunks, b"")
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        while not self.head:
            for at in range(0, len(chunk), SEND_PIECE):
                try:
                    await asyncio.wait_for(send({"type": "http.response.body", "body": chunk[at:at + SEND_PIECE],
                                                 "more_body": True}), self.idle_s)
                except TimeoutError:
                    raise ClientStalled() from None
            if (chunk := await anext(self.chunks, None)) is None:
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _result_stream(pool: AsyncConnectionPool, ub: int, status_filter: list[str] | None, fmt: str,
                         columns: tuple[str, ...]) -> AsyncIterator[bytes]:
    params = {"ub": ub, "f": status_filter}
    async with pool.connection() as conn, conn.transaction():
        if fmt == "csv":
            buf = bytearray(outcomes.csv_header(columns))
            async with conn.cursor().copy(outcomes.csv_copy(columns), params) as copy:
                async for data in copy:
                    buf += data
                    if len(buf) > 64 * 1024:
                        yield bytes(buf)
                        buf.clear()
            yield bytes(buf)
        else:
            async with conn.cursor(name="results") as cur:  # server-side: never the whole list in memory
                await cur.execute(outcomes.json_query(columns), params)
                opening, closing = outcomes.JSON_FRAMES[fmt]
                yield opening
                first = True
                while docs := await cur.fetchmany(5_000):
                    yield outcomes.json_chunk([d for (d,) in docs], first, fmt)
                    first = False
                yield closing


async def _batch_update(request: Request, name: str) -> JSONResponse:
    _only_params(request)
    doc = await _owned_batch(request)
    if doc["state"] in FINISHED_STATES:
        raise ApiError(409, f"user batch {doc['id']} is {doc['state']}; it cannot be {name}d")
    client = await _services(request).temporal()
    handle = client.get_workflow_handle(doc["workflow_id"])
    if due := await temporal_client.not_started_before(handle):
        raise ApiError(409, f"user batch {doc['id']} starts at {due.isoformat()}; nothing to {name} before then "
                            "(DELETE it to drop it)")
    try:
        await handle.execute_update(name, rpc_timeout=UPDATE_TIMEOUT)
    except WorkflowUpdateFailedError as exc:
        raise ApiError(409, f"user batch {doc['id']} cannot be {name}d: {exc.cause}") from None
    except RPCError as exc:
        if exc.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.UNAVAILABLE):
            raise ApiError(503, f"user batch {doc['id']}: no worker answered the {name} request within "
                                f"{UPDATE_TIMEOUT.seconds}s; are workers running (`python worker.py`)?") from None
        raise ApiError(409, f"user batch {doc['id']} cannot be {name}d: {exc.message}") from None
    return JSONResponse(await _owned_batch(request))


async def pause_batch(request: Request) -> JSONResponse:
    """Pause: queued addresses are skipped, in-flight ones finish."""
    return await _batch_update(request, "pause")


async def resume_batch(request: Request) -> JSONResponse:
    return await _batch_update(request, "resume")


async def cancel_batch(request: Request) -> JSONResponse:
    """Cancel the workflow: queued addresses are withdrawn, unresolved rows end `cancelled`."""
    _only_params(request)
    doc = await _owned_batch(request)
    if doc["state"] in FINISHED_STATES:
        raise ApiError(409, f"user batch {doc['id']} is already {doc['state']}")
    client = await _services(request).temporal()
    try:
        await client.get_workflow_handle(doc["workflow_id"]).cancel()
    except RPCError as exc:
        raise ApiError(409, f"user batch {doc['id']} cannot be cancelled: {exc.message}") from None
    return JSONResponse({**doc, "cancel_requested": True}, status_code=202)


# ---- dead letters -------------------------------------------------------------------------
# The module's functions are synchronous (shared with the CLI): they run in a thread of the default
# executor (uploads have threads of their own), each on a connection of its own. Both routes act
# only on the caller's batch (`Selection.user`).


def _dead_letter_selection(request: Request, doc: dict):
    from activities.dead_letters import Selection

    return Selection(user_batch_id=doc["id"], user=_user(request))


async def list_batch_dead_letters(request: Request) -> JSONResponse:
    """The addresses of this batch that got no result, each with why and how often it was sent."""
    from activities.dead_letters import count_dead_letters, list_dead_letters

    _only_params(request, "limit")
    raw = request.query_params.get("limit", "100")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise ApiError(400, f"limit {raw!r} is not a whole number from 1 to 10000")
    doc = await _owned_batch(request)
    sel = _dead_letter_selection(request, doc)

    def read() -> tuple[int, list[dict]]:
        with psycopg.connect(_services(request).settings.database_url) as conn:
            return count_dead_letters(conn, sel), list_dead_letters(conn, sel, int(raw))

    total, rows = await asyncio.to_thread(read)
    return JSONResponse({"total": total, "dead_letters": [
        {"id": r["id"], "lane": r["lane"], "email": r["email"], "reason": r["reason"], "attempts": r["attempts"],
         "bouncer_batch_id": r["bouncer_batch_id"], "created_at": r["created_at"].isoformat()} for r in rows]})


async def retry_batch_dead_letters(request: Request) -> JSONResponse:
    """Send this batch's dead-lettered addresses again (each costs a credit); a completed batch is
    reopened and completes again with a fresh summary."""
    from activities.dead_letters import requeue_dead_letters, wake_after_retry

    _only_params(request)
    doc = await _owned_batch(request)
    if doc["state"] in ("cancelled", "failed"):
        raise ApiError(409, f"user batch {doc['id']} is {doc['state']}; its dead letters cannot be retried")
    services = _services(request)
    client = await services.temporal()  # before changing anything: a retry must not strand rows
    sel = _dead_letter_selection(request, doc)

    def requeue():
        with psycopg.connect(services.settings.database_url) as conn:
            return requeue_dead_letters(conn, sel)

    retried, touched, lanes = await asyncio.to_thread(requeue)
    try:
        await wake_after_retry(client, services.settings, touched, lanes)
    except (RuntimeError, RPCError) as exc:
        raise ApiError(503, f"user batch {doc['id']}: {retried} dead letters re-queued, but its workflow "
                            f"did not restart: {exc}; retry the request") from None
    return JSONResponse({"retried": retried, "batch": await _owned_batch(request)})


# ---- lanes ------------------------------------------------------------------------------


async def _lane_docs(services: Services) -> list[dict]:
    async with services.pool.connection() as conn:
        queued = dict(await (await conn.execute(
            "select q.lane, count(*) from queue q join user_batch_lanes l"
            " on l.user_batch_id = q.user_batch_id and l.lane = q.lane where q.seq >= l.cursor group by 1"
        )).fetchall())
    client = await services.temporal()
    docs = []
    for lane in LANES:
        doc = {"lane": lane, "running": False, "paused": False, "pause_reason": "", "in_flight": 0,
               "free_slots": 0, "dispatched_batches": 0, "queued": queued.get(lane, 0)}
        try:
            st = await client.get_workflow_handle(scheduler_id(lane)).query(
                "status", result_type=SchedulerStatus, rpc_timeout=timedelta(seconds=3))
            doc.update(running=True, paused=st.paused, pause_reason=st.pause_reason, in_flight=st.in_flight,
                       free_slots=st.free_slots, dispatched_batches=st.dispatched_batches)
        except RPCError:
            pass  # no scheduler yet (or it is between runs): nothing in flight
        docs.append(doc)
    return docs


async def get_lanes(request: Request) -> JSONResponse:
    _only_params(request)
    return JSONResponse({"lanes": await _lane_docs(_services(request))})


async def _lane_control(request: Request, pause: bool) -> JSONResponse:
    _only_params(request)
    lane = request.path_params["lane"]
    if lane not in LANES:
        raise ApiError(404, f"no lane {lane!r}; lanes are: {', '.join(LANES)}")
    if not request.state.key.admin:
        raise ApiError(403, "pausing or resuming a lane needs an admin key (`starter.py apikeys create --admin`)")
    services = _services(request)
    client = await services.temporal()
    from activities.user_batches import scheduler_input
    from workflows.scheduler import GreedySchedulerWorkflow

    try:  # signal-with-start: a lane can be paused before its scheduler ever ran
        await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(services.settings, lane), id=scheduler_id(lane),
            task_queue=services.settings.task_queue, start_signal="pause" if pause else "resume",
            start_signal_args=[LanePause(f"paused through the API by {_user(request)}")] if pause else [],
        )
    except RPCError as exc:
        raise ApiError(503, f"lane {lane} could not be {'paused' if pause else 'resumed'}: {exc.message}") from None
    for _ in range(50):  # the signal is applied on the scheduler's next workflow task
        doc = next(d for d in await _lane_docs(services) if d["lane"] == lane)
        if doc["paused"] == pause:
            break
        await asyncio.sleep(0.1)
    return JSONResponse(doc)


async def pause_lane(request: Request) -> JSONResponse:
    """Admin keys only: the lane dispatches nothing new; in-flight Bouncer batches finish."""
    return await _lane_control(request, True)


async def resume_lane(request: Request) -> JSONResponse:
    return await _lane_control(request, False)


"""Worker host: `python worker.py`.

Runs, in one process: the workflow worker (plus the database activities) on TASK_QUEUE, the
batch-creation API activities on API_CREATE_TASK_QUEUE and the other API activities on
API_TASK_QUEUE. The two API queues carry `max_task_queue_activities_per_second`, which the
Temporal server enforces across every worker process (the global API budget). Also serves
the completion-callback receiver when CALLBACK_LISTEN is set, and /metrics, /healthz and
/readyz when METRICS_LISTEN is set. With CATCHALL_BASE_URL set, the catchall lane's two API
queues (its own budgets, its own client) run here too. Starts the event dispatcher if it is
not running. SIGTERM/SIGINT drain and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from datetime import timedelta

import uvicorn
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.worker import Worker

import callbacks
import db
import schedules
import temporal_client
from activities.bouncer_api import BouncerApiActivities
from activities.events import EventActivities, ensure_dispatcher
from activities.cleanup import CleanupActivities
from activities.ingest import IngestActivities
from activities.packing import PackingActivities
from activities.recurring import RecurringActivities
from activities.user_batches import UserBatchActivities
from bouncer.client import BouncerClient
from ops import metrics, telemetry
from ops import server as ops_server
from settings import CATCHALL, DELIVERABILITY, LaneApi, Settings
from workflows.bouncer_batch import BouncerBatchWorkflow
from workflows.events import EventDispatcherWorkflow
from workflows.cleanup import CleanupWorkflow
from workflows.recurring import RecurringListWorkflow
from workflows.scheduler import GreedySchedulerWorkflow
from workflows.search import KEYS
from workflows.user_batch import UserBatchWorkflow

WORKFLOWS = [
    UserBatchWorkflow, GreedySchedulerWorkflow, BouncerBatchWorkflow, EventDispatcherWorkflow, RecurringListWorkflow,
    CleanupWorkflow,
]
log = logging.getLogger("worker")


def build_workers(
    settings: Settings, client: Client, pool, bouncer: BouncerClient, catchall: BouncerClient | None = None
) -> list[Worker]:
    """The workers of a host; shared by worker.py and the tests. `catchall` is the catchall
    lane's API client (its two task queues are served only when it is given)."""
    user_batches = UserBatchActivities(settings, pool, client)
    ingest = IngestActivities(settings.database_url, settings.ingest_chunk_rows)
    packing = PackingActivities(pool, settings.max_in_flight_per_user, client)
    events = EventActivities(settings, pool)
    recurring = RecurringActivities(pool)
    cleanup = CleanupActivities(pool)
    drain = timedelta(seconds=settings.shutdown_grace_s)
    workers = [
        Worker(
            client,
            task_queue=settings.task_queue,
            graceful_shutdown_timeout=drain,
            workflows=WORKFLOWS,
            # Sync activities (ingest parses CPU-bound) run here, off the event loop.
            activity_executor=ThreadPoolExecutor(max_workers=4),
            activities=[
                ingest.ingest_source,
                user_batches.register_user_batch,
                user_batches.prepare_user_batch,
                user_batches.read_progress,
                user_batches.advance_user_batch,
                user_batches.set_paused,
                user_batches.cancel_user_batch,
                user_batches.finalize_user_batch,
                user_batches.nudge_scheduler,
                packing.pack_batches,
                packing.unfinished_batches,
                packing.hold_lane,
                packing.refresh_standby,
                events.fetch_deliveries,
                events.deliver,
                events.fail_delivery,
                events.record_lane_paused,
                events.record_lane_resumed,
                events.record_credits_exhausted,
                events.fail_user_batch,
                recurring.copy_user_batch,
                cleanup.results_cutoff,
                cleanup.delete_chunk,
            ],
        ),
    ]
    lanes = [(DELIVERABILITY, bouncer)] + ([(CATCHALL, catchall)] if catchall is not None else [])
    for lane, lane_client in lanes:
        workers += api_workers(client, settings, settings.lane_api(lane),
                               BouncerApiActivities(settings, pool, lane_client, client))
    return workers


def api_workers(client: Client, settings: Settings, lane: LaneApi, api: BouncerApiActivities) -> list[Worker]:
    """A lane's two API queues; their rate limits are that lane's budgets, held by the server."""
    drain = timedelta(seconds=settings.shutdown_grace_s)
    return [
        Worker(
            client,
            task_queue=lane.create_task_queue,
            graceful_shutdown_timeout=drain,
            activities=[api.submit_batch, api.submit_standby_batch],
            max_task_queue_activities_per_second=lane.creations_per_minute / 60.0,
        ),
        Worker(
            client,
            task_queue=lane.api_task_queue,
            graceful_shutdown_timeout=drain,
            activities=[api.await_batch_completion, api.store_results, api.finish_batch, api.abandon_batch, api.read_credits],
            max_task_queue_activities_per_second=lane.requests_per_minute / 60.0,
        ),
    ]


def bouncer_client(settings: Settings, lane: str = DELIVERABILITY, on_response=None) -> BouncerClient:
    api = settings.lane_api(lane)
    return BouncerClient(
        api.base_url,
        api.api_key.get_secret_value(),
        timeout=settings.bouncer_timeout_s,
        max_concurrency=api.max_concurrency,
        create_per_minute=api.creations_per_minute,
        requests_per_minute=api.requests_per_minute,
        on_response=on_response,
    )


class _Server(uvicorn.Server):
    """A uvicorn server on a socket bound at start (`listening`) that leaves SIGTERM/SIGINT to the
    worker: the drain decides when each server stops (the callbacks' at once, the ops endpoint's
    last, answering /readyz "draining")."""

    def __init__(self, app, sock: socket.socket) -> None:
        super().__init__(uvicorn.Config(app, log_level="warning"))
        self.sock = sock

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super().serve(sockets=[self.sock])

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listening(listen: str, setting: str) -> socket.socket:
    """A socket bound to `listen` (host:port) before anything else starts: a port in use stops the
    worker at once with its setting named, before it polls any work (uvicorn binding later exited
    the process from inside a task, past the drain, with activities already taken)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except (OSError, ValueError) as exc:
        sock.close()
        raise SystemExit(f"worker: cannot listen on {listen} ({setting}): {getattr(exc, 'strerror', None) or exc};"
                         f" stop what listens there, or set {setting} to a free host:port") from None
    return sock


async def require_search_attributes(client: Client, settings: Settings) -> None:
    """Workflows upsert UserId, Lane, BatchState, Priority: unregistered, every workflow task would fail."""
    try:
        found = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=settings.temporal_namespace)
        )
    except Exception as exc:  # noqa: BLE001 - e.g. not permitted with this key: the workflows will tell
        log.warning("could not list search attributes (%s); make sure %s exist", exc, ", ".join(k.name for k in KEYS))
        return
    missing = [k.name for k in KEYS if k.name not in found.custom_attributes]
    if missing:
        raise SystemExit(
            f"search attributes {', '.join(missing)} are not registered in namespace {settings.temporal_namespace}: "
            "create them with `temporal operator search-attribute create` (README, Operations), then start again"
        )


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    callback_sock = listening(settings.callback_listen, "CALLBACK_LISTEN") if settings.callback_listen else None
    ops_sock = listening(settings.metrics_listen, "METRICS_LISTEN") if settings.metrics_listen else None
    db.migrate(settings.database_url)
    sdk = telemetry.sdk_metrics(telemetry.free_port()) if settings.metrics_listen else None
    tracing = telemetry.tracing(settings)
    try:
        client = await temporal_client.connect(
            settings,
            runtime=sdk.runtime if sdk else None,
            interceptors=[tracing.interceptor] if tracing else [],
        )
    except ValueError as exc:  # a TLS setting (the message names it)
        raise SystemExit(f"worker: {exc}") from None
    await require_search_attributes(client, settings)
    usage = metrics.ApiUsage()
    if settings.cleanup_schedule:
        log.info("cleanup schedule %s (%s)", await schedules.install_cleanup_schedule(client, settings),
                 settings.cleanup_cron)
    async with AsyncExitStack() as stack:
        pool = db.open_pool(settings.database_url, settings.db_pool_size)
        await pool.open()
        stack.push_async_callback(pool.close)
        if tracing:
            stack.callback(tracing.shutdown)  # flushes the last spans
        bouncer = await stack.enter_async_context(bouncer_client(settings, on_response=usage.hook(DELIVERABILITY)))
        catchall = None
        if CATCHALL in settings.lanes_enabled():
            catchall = await stack.enter_async_context(bouncer_client(settings, CATCHALL, usage.hook(CATCHALL)))
        workers = build_workers(settings, client, pool, bouncer, catchall)
        servers = []
        tasks = [asyncio.create_task(w.run()) for w in workers]
        worker_tasks = list(tasks)
        await ensure_dispatcher(client, settings)  # delivers events to subscribers; one per namespace
        if callback_sock is not None:
            servers.append(_Server(callbacks.create_app(pool, client), callback_sock))
            if not settings.callback_base_url:
                log.warning("CALLBACK_LISTEN %s binds every interface and CALLBACK_PUBLIC_URL is unset: Bouncer is"
                            " given no callback address, so completions are found by polling; set"
                            " CALLBACK_PUBLIC_URL to the URL Bouncer can reach", settings.callback_listen)
        sampling = asyncio.Event()
        sampler = asyncio.create_task(metrics.sample_forever(settings, pool, usage, bouncer, sampling))
        ops = None
        if ops_sock is not None:
            ops = _Server(
                # A draining worker is alive (its workers stop one by one, on purpose); one whose
                # worker stopped on its own is not.
                ops_server.create_app(pool, sdk.url, draining=stop.is_set,
                                      alive=lambda: stop.is_set() or not any(t.done() for t in worker_tasks)),
                ops_sock,
            )
        tasks += [asyncio.create_task(s.serve()) for s in (*servers, *([ops] if ops else []))]
        log.info("worker up: queues %s, %s, %s", settings.task_queue, settings.api_create_task_queue,
                 settings.api_task_queue)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        # A worker whose pollers gave up (e.g. Temporal unreachable too long) must not leave a
        # process that looks alive and does nothing: drain the rest and exit non-zero (restart).
        broken = [t for t in tasks if t.done()]
        for t in broken:
            log.error("a worker stopped on its own: %r; shutting down to be restarted",
                      t.exception() if not t.cancelled() else "cancelled")
        log.info("draining: finishing running activities and workflow tasks")
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
        sampling.set()
        await asyncio.gather(sampler, return_exceptions=True)
        if ops is not None:  # up until the end: readiness says draining, liveness holds
            ops.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        stopping.cancel()
        if broken and not stop.is_set():
            raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every URL at INFO, and callback URLs carry their per-batch token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = Settings()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()

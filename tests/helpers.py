"""Shared test helpers: run the pipeline's workers in-process and submit lists the way the CLI does."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import uvicorn
from temporalio.client import Client, WorkflowHandle

import callbacks
import db
from activities.events import DISPATCHER_ID
from activities.ingest import copy_items
from bouncer.client import BouncerClient
from devstack import free_port
from sandbox.app import CATCHALL_PREFIX
from settings import CATCHALL, LANES, Settings
from worker import bouncer_client, build_workers
from workflows import search
from workflows.models import PRIORITIES, UserBatchInput, scheduler_id, user_batch_workflow_id
from workflows.user_batch import UserBatchWorkflow


def make_settings(db_url: str, sandbox, **overrides) -> Settings:
    """Settings for one test: its own task queues, the sandbox, generous budgets, fast polling."""
    tag = uuid.uuid4().hex[:8]
    values = dict(
        database_url=db_url,
        bouncer_base_url=sandbox.url,
        bouncer_api_key=sandbox.api_key,
        task_queue=f"verify-{tag}",
        api_create_task_queue=f"verify-api-create-{tag}",
        api_task_queue=f"verify-api-{tag}",
        creations_per_minute=6000,
        requests_per_minute=60000,
        catchall_base_url=sandbox.url + CATCHALL_PREFIX,
        catchall_api_key=sandbox.api_key,
        catchall_api_create_task_queue=f"verify-catchall-api-create-{tag}",
        catchall_api_task_queue=f"verify-catchall-api-{tag}",
        catchall_creations_per_minute=6000,
        catchall_requests_per_minute=60000,
        poll_interval_s=0.5,
        pack_linger_s=0.2,
        callback_listen="",
        event_fetch_wait_s=1.0,
        event_retry_initial_s=0.1,
        event_retry_max_s=0.5,
        event_max_attempts=4,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


@dataclass
class Pipeline:
    client: Client
    settings: Settings
    bouncer: BouncerClient | None = None  # the deliverability lane's client of the API workers

    async def submit_file(
        self, path: Path, user: str, priority: str = "normal", lanes: tuple[str, ...] = ("deliverability",),
        **workflow_input,
    ) -> WorkflowHandle:
        """Ingest like `starter.py submit` (COPY) and start the user batch workflow."""
        with psycopg.connect(self.settings.database_url) as conn, conn.transaction():
            (ub,) = conn.execute(
                "insert into user_batches (user_id, name, priority, lanes, source) values (%s, %s, %s, %s, %s)"
                " returning id",
                (user, path.name, PRIORITIES.index(priority), list(lanes), str(path)),
            ).fetchone()
            stats = copy_items(conn, ub, path)
            conn.execute(
                "update user_batches set rows_total = %s, workflow_id = %s where id = %s",
                (stats.rows, user_batch_workflow_id(ub), ub),
            )
        return await self.client.start_workflow(
            UserBatchWorkflow.run, UserBatchInput(ub, **{"progress_recheck_s": 5.0, **workflow_input}),
            id=user_batch_workflow_id(ub), task_queue=self.settings.task_queue,
            search_attributes=search.at_start(user, priority, lanes[0], "preparing"),
        )

    def sql(self, query: str, params=None) -> list[tuple]:
        with psycopg.connect(self.settings.database_url) as conn:
            return conn.execute(query, params).fetchall()


@contextlib.asynccontextmanager
async def running_pipeline(
    client: Client, settings: Settings, callbacks_on: bool = False, catchall_lane: bool = False
) -> AsyncIterator[Pipeline]:
    """The workers of worker.py (and optionally the callback receiver), in this process. The
    catchall lane's two API workers run only when asked for (fewer pollers for the other tests)."""
    if callbacks_on:
        settings = settings.model_copy(update={"callback_listen": f"127.0.0.1:{free_port()}"})
    # Schedulers are named per lane: one left by another test (on its own task queue) would
    # swallow this test's signals. Tests run one at a time, so end any that is still running.
    for wid in (*map(scheduler_id, LANES), DISPATCHER_ID):
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(wid).terminate("a new test starts")
    pool = db.open_pool(settings.database_url, 6)
    await pool.open()
    server = None
    async with bouncer_client(settings) as bouncer, bouncer_client(settings, CATCHALL) as catchall:
        workers = build_workers(settings, client, pool, bouncer, catchall if catchall_lane else None)
        tasks = [asyncio.create_task(w.run()) for w in workers]
        if callbacks_on:
            host, _, port = settings.callback_listen.rpartition(":")
            server = uvicorn.Server(uvicorn.Config(callbacks.create_app(pool, client), host=host, port=int(port),
                                                   log_level="warning"))
            tasks.append(asyncio.create_task(server.serve()))
            while not server.started:
                await asyncio.sleep(0.02)
        try:
            yield Pipeline(client, settings, bouncer)
        finally:
            for wid in (*map(scheduler_id, LANES), DISPATCHER_ID):
                with contextlib.suppress(Exception):
                    await client.get_workflow_handle(wid).terminate("test finished")
            if server is not None:
                server.should_exit = True
            await asyncio.gather(*(w.shutdown() for w in workers), return_exceptions=True)
            await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()


ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings, temporal_address: str | None = None) -> dict[str, str]:
    """The settings as the env vars a worker or CLI process reads (every field, by its upper-case name)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "DATABASE_", "BOUNCER_"))}
    for name, value in settings.model_dump().items():
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    if temporal_address is not None:
        env["TEMPORAL_ADDRESS"] = temporal_address
    return env


async def starter(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """`python starter.py ARGS` in a subprocess (it owns its event loop): exit code, stdout, stderr."""
    def run():
        proc = subprocess.run([sys.executable, "starter.py", *args], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout, check=False)
        return proc.returncode, proc.stdout, proc.stderr

    return await asyncio.to_thread(run)


def write_list(path: Path, emails: list[str], header: str | None = "email") -> Path:
    with path.open("w") as f:
        if header:
            f.write(header + "\n")
        for e in emails:
            f.write(e + "\n")
    return path


async def eventually(check: Callable, what: str, timeout: float = 30.0, interval: float = 0.05):
    """Poll `check` (sync or async) in real time until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)

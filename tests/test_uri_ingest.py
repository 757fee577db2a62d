"""SDK submissions by URI: the worker streams the list itself, and resumes after being killed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import psycopg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError

from devstack import ROOT, free_port
from helpers import eventually, make_settings, running_pipeline, write_list
from workflows.models import SourceSpec, UserBatchInput
from workflows.user_batch import UserBatchWorkflow


def _emails(tag: str, n: int) -> list[str]:
    return [f"{tag}.{i}@company{i % 53}.example" for i in range(n)]


async def _start(client, settings, source: SourceSpec, **kw):
    return await client.start_workflow(
        UserBatchWorkflow.run,
        UserBatchInput(source=source, progress_recheck_s=2.0, **kw),
        id=f"sdk-{uuid.uuid4().hex[:8]}",
        task_queue=settings.task_queue,
    )


async def test_an_sdk_client_submits_a_file_path_and_an_http_url(dev_env, db_url, sandbox, tmp_path):
    rows = _emails("path", 1500) + ["not-an-address", "path.1@company1.example"]
    path = write_list(tmp_path / "list.csv", rows)
    served = write_list(tmp_path / "served.csv", _emails("url", 800), header="Email")
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    settings = make_settings(db_url, sandbox, batch_size=1000)
    try:
        async with running_pipeline(dev_env.client, settings) as p:
            by_path = await _start(dev_env.client, settings, SourceSpec(uri=str(path), user_id="sdk-user"))
            by_url = await _start(dev_env.client, settings, SourceSpec(
                uri=f"http://127.0.0.1:{port}/{served.name}", user_id="sdk-user", priority="high"))
            a, b = await asyncio.wait_for(asyncio.gather(by_path.result(), by_url.result()), timeout=120)
            assert (a.rows, a.by_state) == (1502, {"verified": 1500, "invalid": 1, "duplicate": 1})
            assert (b.rows, b.by_state) == (800, {"verified": 800})
            # The rows are registered under the workflow that read them, with line numbers.
            assert sorted(p.sql("select workflow_id, user_id, priority from user_batches")) == sorted([
                (by_path.id, "sdk-user", 2), (by_url.id, "sdk-user", 1)])
            assert p.sql("select i.row_no, i.reason from items i join user_batches b on b.id = i.user_batch_id"
                         " where i.state = 'invalid' and b.workflow_id = %s", (by_path.id,)) == [(1502, "missing @")]
    finally:
        httpd.shutdown()


async def test_a_bad_sdk_input_fails_at_once_with_the_reason(dev_env, db_url, sandbox, tmp_path):
    settings = make_settings(db_url, sandbox)
    async with running_pipeline(dev_env.client, settings) as p:
        bad = await _start(dev_env.client, settings, SourceSpec(uri="x.csv", user_id="u", priority="urgent",
                                                                 lanes=["nope"]))
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(bad.result(), timeout=30)
        message = str(failure.value.cause.cause)
        assert "priority 'urgent'" in message and "lanes" in message
        missing = await _start(dev_env.client, settings, SourceSpec(uri=str(tmp_path / "absent.csv"), user_id="u"))
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(missing.result(), timeout=30)
        assert "cannot read" in str(failure.value.cause.cause) and "absent.csv" in str(failure.value.cause.cause)
        assert p.sql("select count(*) from items") == [(0,)]


def _worker(dev_env, settings, **extra_env: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
        "DATABASE_URL": settings.database_url,
        "BOUNCER_BASE_URL": settings.bouncer_base_url,
        "BOUNCER_API_KEY": settings.bouncer_api_key.get_secret_value(),
        "TASK_QUEUE": settings.task_queue,
        "API_CREATE_TASK_QUEUE": settings.api_create_task_queue,
        "API_TASK_QUEUE": settings.api_task_queue,
        "CREATIONS_PER_MINUTE": "6000",
        "REQUESTS_PER_MINUTE": "60000",
        "POLL_INTERVAL_S": "0.5",
        "CALLBACK_LISTEN": "",
        "BATCH_SIZE": "50000",  # few, large batches: this test is about ingest, keep it quick
        **extra_env,
    }
    return subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_ingest_resumes_after_the_worker_is_killed_mid_file(dev_env, db_url, sandbox, tmp_path):
    total = 200_000
    path = write_list(tmp_path / "big.csv", _emails("big", total))
    settings = make_settings(db_url, sandbox)
    chunks = {"INGEST_CHUNK_ROWS": "10000"}  # 20 chunks: the kill lands mid-file even on a loaded machine
    first = _worker(dev_env, settings, **chunks)
    second = None
    try:
        handle = await _start(dev_env.client, settings, SourceSpec(uri=str(path), user_id="big"),
                              ingest_heartbeat_s=3.0)
        deadline = time.monotonic() + 60
        with psycopg.connect(db_url, autocommit=True) as conn:
            while True:  # kill once some chunks are committed, well before the end
                (n,) = conn.execute("select count(*) from items").fetchone()
                if n >= 20_000:
                    break
                assert time.monotonic() < deadline, "ingest did not start"
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert n < total, "the worker finished the file before it could be killed"
        second = _worker(dev_env, settings, **chunks)
        summary = await asyncio.wait_for(handle.result(), timeout=240)

        assert summary.rows == total and summary.by_state == {"verified": total}
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select count(*), count(distinct row_no), min(row_no), max(row_no) from items"
                                ).fetchone() == (total, total, 2, total + 1)
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == total and stats["addresses_sent_twice"] == 0
        history = await handle.fetch_history()
        attempts = [e.activity_task_started_event_attributes.attempt for e in history.events
                    if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]
        assert max(attempts) >= 2  # the ingest ran again, on the second worker
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        with contextlib.suppress(Exception):  # its scheduler would outlive the workers otherwise
            await dev_env.client.get_workflow_handle("scheduler-deliverability").terminate("test finished")


def _status(url: str) -> tuple[int, dict] | None:
    try:
        resp = httpx.get(url, timeout=3)
    except httpx.TransportError:
        return None
    return resp.status_code, resp.json()


async def test_sigterm_mid_ingest_drains_while_readyz_says_draining_and_healthz_holds(
    dev_env, db_url, sandbox, tmp_path
):
    """A list arriving slowly keeps the ingest activity running; SIGTERM then drains the worker
    for up to SHUTDOWN_GRACE_S, and all that time its ops endpoint answers: /readyz 503
    "draining" (take it out of rotation), /healthz 200 (do not kill it)."""
    asked = threading.Event()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.set()
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                for i in range(600):  # 30 s of list, 50 rows every 50 ms
                    self.wfile.write(b"".join(b"slow.%d.%d@drain.example\n" % (i, j) for j in range(50)))
                    self.wfile.flush()
                    time.sleep(0.05)

        def log_message(self, *_args) -> None:
            pass

    port, metrics = free_port(), free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    settings = make_settings(db_url, sandbox)
    proc = _worker(dev_env, settings, METRICS_LISTEN=f"127.0.0.1:{metrics}", SHUTDOWN_GRACE_S="10")
    ops = f"http://127.0.0.1:{metrics}"
    handle = None
    try:
        await eventually(lambda: _status(f"{ops}/readyz") == (200, {"ready": True}), "the worker ready", 60)
        handle = await _start(dev_env.client, settings, SourceSpec(uri=f"http://127.0.0.1:{port}/l.csv", user_id="d"))
        await eventually(asked.is_set, "the ingest reading the list")
        proc.send_signal(signal.SIGTERM)
        answers, watch_until = set(), time.monotonic() + 3  # of the 10 s drain (a slow answer takes ≤ 3 s)
        while time.monotonic() < watch_until:
            await asyncio.sleep(0.1)
            answers.add((repr(_status(f"{ops}/readyz")), repr(_status(f"{ops}/healthz"))))
        assert proc.poll() is None  # still draining: the ingest has up to 10 s
        assert answers == {(repr((503, {"ready": False, "reason": "draining"})), repr((200, {"alive": True})))}
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        httpd.shutdown()
        if proc.poll() is None:
            proc.kill()
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.terminate("test finished")

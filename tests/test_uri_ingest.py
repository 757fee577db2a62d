"""SDK submissions by URI: the worker streams the list itself, and resumes after being killed."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gzip
import http.server
import os
import signal
import subprocess
import sys
import threading
import tracemalloc
import time
import uuid
from datetime import timedelta

import httpx
import psycopg
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.ingest import SOURCE_ATTEMPTS, IngestActivities
from devstack import ROOT, free_port
from helpers import eventually, make_settings, running_pipeline, write_list
from workflows.models import IngestRequest, SourceSpec, UserBatchInput
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


@pytest.mark.parametrize("packed", [False, True], ids=["csv", "gzip"])
async def test_ingest_resumes_after_the_worker_is_killed_mid_file(dev_env, db_url, sandbox, tmp_path, packed):
    total = 200_000
    path = write_list(tmp_path / "big.csv", _emails("big", total))
    if packed:  # a gzip cannot be sought: the second worker reads it again from the start, skipping what is stored
        path = tmp_path / "big.csv.gz"
        path.write_bytes(gzip.compress((tmp_path / "big.csv").read_bytes()))
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


# ---- the ingest activity on its own: what is retried, what fails at once ------------------------


class _FileServer:
    """Serves `body` over HTTP; `answers` scripts each request in turn (then the last repeats):
    an int is that status, "drop" sends the headers and half the body then closes the connection."""

    def __init__(self, body: bytes, answers: list, headers: dict[str, str] | None = None) -> None:
        server = self
        self.body, self.answers, self.headers, self.requests = body, answers, headers or {}, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                answer = server.answers[min(server.requests, len(server.answers) - 1)]
                server.requests += 1
                if isinstance(answer, int) and answer != 200:
                    self.send_response(answer)
                    for k, v in server.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                for k, v in server.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                if answer == "drop":
                    self.wfile.write(server.body[: len(server.body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(server.body)

            def log_message(self, *_args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/list.csv"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def _ingest(db_url: str, uri: str, attempt: int = 1, chunk_rows: int = 1000):
    """One attempt of `ingest_source` on user batch 1 (made if missing): its outcome, or the
    ApplicationError it raised."""
    with psycopg.connect(db_url) as conn:
        conn.execute("insert into user_batches (id, user_id, lanes, source) values (1, 'u', '{deliverability}', %s)"
                     " on conflict do nothing", (uri,))
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt)
    try:
        return env.run(IngestActivities(db_url, chunk_rows).ingest_source, IngestRequest(1, uri))
    except ApplicationError as exc:
        return exc


def _items(db_url: str) -> list[tuple]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("select count(*), count(distinct row_no), min(row_no), max(row_no),"
                            " count(*) filter (where state = 'pending') from items").fetchone()


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_a_download_that_drops_midway_is_retried_and_resumes_after_the_committed_rows(db_url, gzipped):
    n = 200_000 if gzipped else 60_000  # gzip: enough rows that some chunks commit before the drop
    body = ("email\n" + "".join(f"drop.{i}@x{i % 7}.example\n" for i in range(n))).encode()
    server = _FileServer(gzip.compress(body) if gzipped else body, ["drop", 200])
    try:
        first = _ingest(db_url, server.url)
        assert isinstance(first, ApplicationError) and not first.non_retryable, first
        assert first.type == "SourceUnavailable" and server.url in str(first)
        committed = _items(db_url)[0]
        assert 0 < committed < n  # the chunks before the drop stay
        second = _ingest(db_url, server.url, attempt=2)
        assert (second.rows, second.invalid) == (n, 0)
        with psycopg.connect(db_url) as conn:
            assert conn.execute("select rows_total, invalid from user_batches").fetchone() == (n, 0)
        assert _items(db_url) == (n, n, 2, n + 1, n)  # rows in = rows out, none twice
    finally:
        server.close()


def test_a_gzip_path_or_url_is_read_decompressed_and_a_broken_one_fails_at_once_naming_it(db_url, tmp_path):
    packed = gzip.compress(b"email\na@x.example\nnot-an-address\n")
    (tmp_path / "list.csv.gz").write_bytes(packed)
    first = _ingest(db_url, str(tmp_path / "list.csv.gz"))
    assert (first.rows, first.invalid) == (2, 1), first
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select row_no, reason from items where state = 'invalid'").fetchall() == [
            (3, "missing @")]
        conn.execute("delete from items")
    server = _FileServer(packed, [200])
    try:
        assert _ingest(db_url, server.url).rows == 2
    finally:
        server.close()
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(packed[:-6])
    with psycopg.connect(db_url) as conn:
        conn.execute("delete from items")
    failure = _ingest(db_url, cut.as_uri())
    assert isinstance(failure, ApplicationError) and failure.non_retryable, failure
    assert failure.type == "UnreadableInput" and str(cut) in str(failure) and "ends early" in str(failure)


def test_gzip_in_transit_is_inflated_a_block_at_a_time_and_an_unknown_coding_is_refused(db_url):
    from activities.ingest import open_source

    # 64 MiB of one character: ~64 KiB on the wire, a zip bomb's shape.
    bomb = gzip.compress(b"email\na@x.example\n" + b"b" * (64 * 1024 * 1024) + b"\nc@x.example\n")
    server = _FileServer(bomb, [200], {"Content-Encoding": "gzip"})
    try:
        tracemalloc.start()
        try:
            with open_source(server.url) as (head, raw):
                assert head.startswith(b"email\na@x.example\n")
                total = sum(len(block) for block in iter(lambda: raw.read(1024 * 1024), b""))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert total == len(gzip.decompress(bomb))
        assert peak < 16 * 1024 * 1024, f"{peak:,} bytes held at once"
        result = _ingest(db_url, server.url)
        assert (result.rows, result.invalid) == (3, 1), result  # the 64 MiB line: one invalid row
    finally:
        server.close()
    with psycopg.connect(db_url) as conn:
        conn.execute("delete from items")
    # A .csv.gz sent gzip-encoded as well: both layers are read.
    twice = _FileServer(gzip.compress(gzip.compress(b"email\nd@x.example\ne@x.example\n")), [200],
                        {"Content-Encoding": "gzip"})
    brotli = _FileServer(b"\x0b\x02\x80email\n\x03", [200], {"Content-Encoding": "br"})
    try:
        assert _ingest(db_url, twice.url).rows == 2
        refused = _ingest(db_url, brotli.url)
        assert isinstance(refused, ApplicationError) and refused.non_retryable, refused
        assert "Content-Encoding 'br'" in str(refused) and brotli.url in str(refused)
    finally:
        twice.close()
        brotli.close()


@pytest.mark.parametrize(("answer", "retryable", "words"), [
    (503, True, "HTTP 503"), (429, True, "HTTP 429"), (404, False, "HTTP 404"), (403, False, "HTTP 403")])
def test_http_5xx_and_429_are_retried_and_4xx_fail_at_once(db_url, answer, retryable, words):
    server = _FileServer(b"email\na@x.example\n", [answer], {"Retry-After": "7"})
    try:
        failure = _ingest(db_url, server.url)
        assert isinstance(failure, ApplicationError) and words in str(failure), failure
        assert failure.non_retryable is not retryable
        if answer == 429:
            assert failure.next_retry_delay == timedelta(seconds=7)
        last = _ingest(db_url, server.url, attempt=SOURCE_ATTEMPTS)  # a source down for good fails the list
        assert last.non_retryable and (not retryable or "gave up after" in str(last))
    finally:
        server.close()


@pytest.mark.parametrize("text", ["", "email\n", "\n\n"])
def test_an_empty_or_header_only_source_fails_at_once_naming_it(db_url, tmp_path, text):
    path = tmp_path / "empty.csv"
    path.write_text(text)
    failure = _ingest(db_url, str(path))
    assert isinstance(failure, ApplicationError) and failure.non_retryable, failure
    assert failure.message == f"{path} has no rows (empty, or a header only): nothing to verify"


def test_file_uris_are_percent_decoded_and_may_name_localhost(db_url, tmp_path):
    path = tmp_path / "my list é.csv"
    path.write_text("email\na@x.example\nb@x.example\nnot-an-address\n")
    assert _ingest(db_url, path.as_uri()).rows == 3
    with psycopg.connect(db_url) as conn:  # counted as the list is read, not only by prepare
        assert conn.execute("select rows_total, invalid from user_batches").fetchone() == (3, 1)
    with psycopg.connect(db_url) as conn:
        conn.execute("delete from items")
    assert _ingest(db_url, "file://localhost" + path.as_uri().removeprefix("file://")).rows == 3
    failure = _ingest(db_url, "file://fileserver" + path.as_uri().removeprefix("file://"))
    assert failure.non_retryable and "not on host 'fileserver'" in str(failure)


async def test_a_list_whose_source_fails_for_good_midway_ends_failed_with_no_row_left_pending(
    dev_env, db_url, sandbox
):
    body = ("email\n" + "".join(f"gone.{i}@x{i % 7}.example\n" for i in range(60_000))).encode()
    server = _FileServer(body, ["drop", 404])
    settings = make_settings(db_url, sandbox, ingest_chunk_rows=1000)
    try:
        async with running_pipeline(dev_env.client, settings) as p:
            handle = await _start(dev_env.client, settings, SourceSpec(uri=server.url, user_id="gone"))
            with pytest.raises(WorkflowFailureError) as failure:
                await asyncio.wait_for(handle.result(), timeout=60)
            assert "HTTP 404" in str(failure.value.cause.cause)
            assert p.sql("select state from user_batches") == [("failed",)]
            states = p.sql("select state, count(*) from items group by 1")
            assert len(states) == 1 and states[0][0] == "failed" and states[0][1] > 0, states
            (reason,), = p.sql("select distinct reason from items")
            assert reason.startswith("the list failed: ") and "HTTP 404" in reason
    finally:
        server.close()


async def test_an_sdk_input_of_the_wrong_type_fails_the_workflow_at_once_naming_the_fields(dev_env, db_url, sandbox):
    """A start input the SDK cannot decode (a field of the wrong type, a misspelled one) used to fail
    the workflow *task*, retried for ever: the workflow stayed running and `result()` never came."""
    import temporal_client

    settings = make_settings(db_url, sandbox, temporal_address=dev_env.client.service_client.config.target_host)
    client = await temporal_client.connect(settings)  # as worker.py connects
    async with running_pipeline(client, settings) as p:
        # Untyped starts, as a client of another language (or a dict) would send them.
        bad = {
            "types": {"source": {"uri": "x.csv", "user_id": None, "priority": 1, "max_result_age_s": "7d"}},
            "misspelled": {"source": {"url": "x.csv", "user_id": "u"}, "progres_recheck_s": 5},
            "not an object": "https://files.example.com/leads.csv",
        }
        handles = {case: await dev_env.client.start_workflow(
            "UserBatchWorkflow", arg, id=f"sdk-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue)
            for case, arg in bad.items()}
        messages = {}
        for case, handle in handles.items():
            with pytest.raises(WorkflowFailureError) as failure:
                await asyncio.wait_for(handle.result(), timeout=30)
            cause = failure.value.cause
            assert isinstance(cause, ApplicationError) and cause.type == "InvalidInput" and cause.non_retryable
            messages[case] = cause.message
        assert all(m.startswith("invalid UserBatchInput: ") for m in messages.values()), messages
        for words in ("source.user_id None", "source.priority 1", "source.max_result_age_s '7d'"):
            assert words in messages["types"], messages["types"]
        for words in ("source.url", "Extra inputs are not permitted", "source.uri: Field required",
                      "progres_recheck_s"):
            assert words in messages["misspelled"], messages["misspelled"]
        assert messages["not an object"].endswith("input 'https://files.example.com/leads.csv': Input should be a"
                                                  " valid dictionary or instance of UserBatchInput"), messages
        assert p.sql("select count(*) from user_batches") == [(0,)]


async def test_a_workflow_id_reused_for_another_list_is_refused_and_the_first_list_keeps_its_rows(
    dev_env, db_url, sandbox, tmp_path
):
    """The user batch row is keyed by workflow id. A second run under an id (Temporal allows one once
    the first closed) took the first run's row over: a finished list answered `BatchEnded`, and a
    list whose run was terminated mid-file got the new list's rows from its own last line on
    (another user's rows appended to it, the new list's first rows lost; all of them when none
    was committed)."""
    first = write_list(tmp_path / "first.csv", _emails("first", 300))
    second = write_list(tmp_path / "second.csv", _emails("second", 500))
    server = _FileServer(b"email\nx@y.example\n", [503])  # unavailable: the ingest retries (for 15 minutes)
    settings = make_settings(db_url, sandbox, batch_size=1000)
    try:
        async with running_pipeline(dev_env.client, settings) as p:
            done = await _start(dev_env.client, settings, SourceSpec(uri=str(first), user_id="ann"))
            await asyncio.wait_for(done.result(), timeout=60)
            cut = await _start(dev_env.client, settings, SourceSpec(uri=server.url, user_id="ann"))
            await eventually(lambda: server.requests >= 2, "the unavailable list's retries", timeout=30)
            await cut.terminate("operator")  # no workflow code runs: the row stays `receiving`
            kept = {wid: p.sql("select user_id, state, (select count(*) from items i where i.user_batch_id = b.id)"
                               " from user_batches b where workflow_id = %s", (wid,)) for wid in (done.id, cut.id)}
            assert kept == {done.id: [("ann", "completed", 300)], cut.id: [("ann", "receiving", 0)]}
            for wid in (done.id, cut.id):
                again = await dev_env.client.start_workflow(
                    UserBatchWorkflow.run, UserBatchInput(source=SourceSpec(uri=str(second), user_id="bob")),
                    id=wid, task_queue=settings.task_queue)
                with pytest.raises(WorkflowFailureError) as failure:
                    await asyncio.wait_for(again.result(), timeout=30)
                cause = failure.value.cause.cause
                assert isinstance(cause, ApplicationError) and cause.type == "WorkflowIdReused", cause
                assert f"workflow id {wid!r}" in str(cause) and "new workflow id" in str(cause)
                assert p.sql("select user_id, state, (select count(*) from items i where i.user_batch_id = b.id)"
                             " from user_batches b where workflow_id = %s", (wid,)) == kept[wid]
            assert p.sql("select count(*) from items where email like 'second.%%'") == [(0,)]
            # The CLI's and the HTTP API's workflow ids are theirs.
            clash = await dev_env.client.start_workflow(
                UserBatchWorkflow.run, UserBatchInput(source=SourceSpec(uri=str(second), user_id="bob")),
                id="user-batch-999", task_queue=settings.task_queue)
            with pytest.raises(WorkflowFailureError) as failure:
                await asyncio.wait_for(clash.result(), timeout=30)
            assert "user-batch-<n>" in str(failure.value.cause.cause)
            # Under an id of its own, the list is verified as usual.
            fresh = await _start(dev_env.client, settings, SourceSpec(uri=str(second), user_id="bob"))
            assert (await asyncio.wait_for(fresh.result(), timeout=60)).by_state == {"verified": 500}
    finally:
        server.close()


async def test_a_url_s_credentials_stay_out_of_failures_names_events_and_rows(dev_env, db_url, sandbox):
    """A URL's userinfo and query (`https://user:pw@host/list.csv`, a presigned URL's signature) were
    copied into the failure message (Temporal's history), the `user_batch.failed` event sent to
    subscribers, every failed row's `reason` (the results export) and the list's name."""
    body = ("email\n" + "".join(f"cred.{i}@x{i % 7}.example\n" for i in range(60_000))).encode()
    server = _FileServer(body, ["drop", 404])  # some chunks committed, then gone
    url = server.url.replace("http://", "http://ann:pw-SECRET1@") + "?X-Amz-Signature=SECRET2"
    settings = make_settings(db_url, sandbox, ingest_chunk_rows=1000)
    try:
        async with running_pipeline(dev_env.client, settings) as p:
            handle = await _start(dev_env.client, settings, SourceSpec(uri=url, user_id="cred"))
            with pytest.raises(WorkflowFailureError) as failure:
                await asyncio.wait_for(handle.result(), timeout=60)
            message = str(failure.value.cause.cause)
            assert "HTTP 404" in message and "http://***@127.0.0.1:" in message and "?(query hidden)" in message
            seen = [message, *map(str, p.sql("select name, state from user_batches")),
                    *map(str, p.sql("select distinct reason from items")), *map(str, p.sql("select * from events"))]
            async for event in handle.fetch_history_events():
                if event.event_type in (EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
                                        EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED):
                    seen.append(str(event))
            assert p.sql("select name, state from user_batches") == [("list.csv", "failed")]
            assert any("the list failed: " in s for s in seen) and any("user_batch.failed" in s for s in seen)
            leaks = [s for s in seen if "SECRET" in s]
            assert not leaks, leaks
    finally:
        server.close()

"""The HTTP API as a real process (`python -m api`) on the dev server, embedded Postgres and the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import itertools
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import hypothesis
import psycopg
import pytest
import schemathesis
from typer.testing import CliRunner
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

import starter
from api import keys, uploads
from api.uploads import BadBody, json_rows
from devstack import free_port
from helpers import eventually, make_settings, running_pipeline
from sandbox.verdicts import verdict

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def api_process(settings, temporal_address: str, log: Path | None = None, **extra_env: str) -> Iterator[str]:
    """`python -m api` on a free port, configured through its environment like in production
    (its stderr into `log` if given)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": settings.database_url, "TEMPORAL_ADDRESS": temporal_address,
           "TASK_QUEUE": settings.task_queue, "API_CREATE_TASK_QUEUE": settings.api_create_task_queue,
           "API_TASK_QUEUE": settings.api_task_queue, "API_LISTEN": f"127.0.0.1:{port}", "API_MAX_UPLOAD_MB": "2",
           **extra_env}
    proc = subprocess.Popen([sys.executable, "-m", "api"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=log.open("w") if log else subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                why = log.read_text() if log else proc.stderr.read() if proc.poll() is not None else ""
                raise RuntimeError(f"the API did not come up: {why}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def api_db(pg_server) -> str:
    name = f"api{os.getpid()}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"create database {name} template pipeline_template")
    return pg_server.replace("/postgres?", f"/{name}?")


@pytest.fixture(scope="module")
async def api_settings(api_db, sandbox_process, dev_env):
    settings = make_settings(api_db, sandbox_process, batch_size=500)
    yield settings
    # Workflow ids (user-batch-N) restart at 1 in every test database: end whatever the fuzzing
    # left running on this module's task queue, or a later test's start would collide with it.
    query = f"TaskQueue = '{settings.task_queue}' AND ExecutionStatus = 'Running'"
    async for wf in dev_env.client.list_workflows(query):
        with contextlib.suppress(Exception):
            await dev_env.client.get_workflow_handle(wf.id, run_id=wf.run_id).terminate("the API tests are done")


@pytest.fixture(scope="module")
def api_url(dev_env, api_settings) -> Iterator[str]:
    with api_process(api_settings, dev_env.client.service_client.config.target_host) as url:
        yield url


def new_key(settings, user: str, admin: bool = False) -> dict[str, str]:
    with psycopg.connect(settings.database_url) as conn:
        _id, key = keys.create_key(conn, user, admin=admin)
    return {"Authorization": f"Bearer {key}"}


async def wait_finished(client: httpx.AsyncClient, url: str, auth: dict, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        doc = (await client.get(url, headers=auth)).json()
        if doc["state"] in ("completed", "cancelled", "failed"):
            return doc
        assert time.monotonic() < deadline, f"still {doc['state']} after {timeout}s: {doc}"
        await asyncio.sleep(0.3)


async def test_upload_runs_to_completion_and_results_carry_the_sandboxs_verdicts(
    dev_env, api_settings, api_url, sandbox
):
    auth = new_key(api_settings, "alice")
    emails = [f"lead{i}@firm{i % 13}.example" for i in range(1200)]
    body = "Name,Email\n" + "".join(f"n{i},{e}\n" for i, e in enumerate(emails)) + "broken,not-an-address\nx,a@b\n"
    async with running_pipeline(dev_env.client, api_settings), httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        resp = await http.post("/v1/batches?name=leads&priority=high&max_age=7d", headers=auth,
                               files={"file": ("leads.csv", body.encode(), "text/csv")})
        assert resp.status_code == 201, resp.text
        sub = resp.json()
        assert resp.headers["location"] == f"/v1/batches/{sub['id']}"
        assert (sub["rows"], sub["invalid"]) == (1202, 2)
        # Malformed rows are reported by line number (header = line 1), never sent.
        assert [r["row"] for r in sub["invalid_rows"]] == [1202, 1203]

        json_resp = await http.post("/v1/batches", headers=auth, json=[emails[0], "lead1@FIRM1.EXAMPLE", 7])
        assert json_resp.status_code == 201, json_resp.text
        assert json_resp.json()["invalid_rows"] == [{"row": 3, "reason": "not a string (JSON number)"}]

        done = await wait_finished(http, f"/v1/batches/{sub['id']}", auth)
        assert done["state"] == "completed" and done["priority"] == "high" and done["name"] == "leads"
        with psycopg.connect(api_settings.database_url) as conn:
            assert conn.execute("select max_result_age_s from user_batches where id = %s",
                                (sub["id"],)).fetchone() == (7 * 86400.0,)
        assert done["addresses_settled"] == done["addresses_total"] == 1200
        json_done = await wait_finished(http, f"/v1/batches/{json_resp.json()['id']}", auth)
        assert json_done["summary"]["by_state"] == {"verified": 2, "invalid": 1}

        rows = list(csv.DictReader(io.StringIO((await http.get(f"/v1/batches/{sub['id']}/results",
                                                                headers=auth)).text)))
        assert len(rows) == 1202
        for row in rows[:1200]:
            v = verdict(row["email"])
            assert row["state"] == "verified"
            assert (row["status"], row["reason"]) == (v["status"], v["reason"])
            # Bouncer's flags, provider, suggestion and toxicity come through from its record.
            assert (row["disposable"], row["free"], row["role"], row["full_mailbox"]) == (
                v["domain"]["disposable"], v["domain"]["free"], v["account"]["role"], v["account"]["fullMailbox"])
            assert (row["provider"], row["did_you_mean"], row["toxicity"]) == (
                v.get("provider") or "", v.get("didYouMean") or "", str(v["toxicity"]))
        assert [(r["row"], r["state"]) for r in rows[1200:]] == [("1202", "invalid"), ("1203", "invalid")]

        as_json = (await http.get(f"/v1/batches/{sub['id']}/results?format=json&status=deliverable",
                                  headers=auth)).json()
        expected = [e for e in emails if verdict(e)["status"] == "deliverable"]
        assert [r["email"] for r in as_json] == expected and expected
        assert [r["toxicity"] for r in as_json] == [verdict(e)["toxicity"] for e in expected]  # a number in JSON
        lines = await http.get(f"/v1/batches/{sub['id']}/results?format=jsonl&status=deliverable", headers=auth)
        assert lines.headers["content-type"] == "application/jsonl"
        assert [json.loads(line) for line in lines.text.splitlines()] == as_json
        # Several statuses (any matches) and chosen columns, in the order asked.
        picked = (await http.get(f"/v1/batches/{sub['id']}/results?status=undeliverable,invalid&columns=email,row,status",
                                 headers=auth)).text.splitlines()
        assert picked[0] == "email,row,status"
        rowless = await http.get(f"/v1/batches/{sub['id']}/results?format=jsonl&columns=email,state", headers=auth)
        assert rowless.status_code == 200
        assert [json.loads(line) for line in rowless.text.splitlines()] == [
            {"email": e, "state": "verified"} for e in emails] + [
            {"email": None, "state": "invalid"}] * 2
        assert picked[1:] == [f"{e},{i + 2},undeliverable" for i, e in enumerate(emails)
                              if verdict(e)["status"] == "undeliverable"] + [",1202,", ",1203,"]
    # Pay once: the JSON list's addresses were already verified by the CSV upload.
    stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
    assert stats["addresses_received"] == 1200


async def test_uploads_stream_into_copy_while_the_body_is_still_arriving(api_settings, api_url):
    """The client stops half-way; Postgres must already be COPYing the first half (nothing buffered)."""
    auth = new_key(api_settings, "gina")

    def copying() -> int:
        with psycopg.connect(api_settings.database_url) as conn:
            row = conn.execute("select max(tuples_processed) from pg_stat_progress_copy").fetchone()
        return row[0] or 0

    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for kind in ("multipart", "json"):
            first_half_seen = asyncio.Event()

            async def body():
                if kind == "multipart":
                    yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="l.csv"\r\n\r\nemail\n'
                    yield b"".join(b"s%d@stream.example\n" % i for i in range(20_000))
                else:
                    yield b"[" + b",".join(b'"s%d@stream.example"' % i for i in range(20_000))
                deadline = time.monotonic() + 20
                while copying() < 10_000:
                    assert time.monotonic() < deadline, f"{kind}: no COPY progress while the body was incomplete"
                    await asyncio.sleep(0.05)
                first_half_seen.set()
                if kind == "multipart":
                    yield b"".join(b"t%d@stream.example\n" % i for i in range(20_000)) + b"\r\n--B--\r\n"
                else:
                    yield b"," + b",".join(b'"t%d@stream.example"' % i for i in range(20_000)) + b"]"

            ctype = "multipart/form-data; boundary=B" if kind == "multipart" else "application/json"
            resp = await http.post("/v1/batches", headers={**auth, "Content-Type": ctype}, content=body())
            assert resp.status_code == 201, resp.text
            assert first_half_seen.is_set() and resp.json()["rows"] == 40_000


async def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_no_traceback(dev_env, api_settings, tmp_path):
    auth = new_key(api_settings, "hugo")
    log = tmp_path / "api.log"
    with api_process(api_settings, dev_env.client.service_client.config.target_host, log=log) as url:
        host, port = url.removeprefix("http://").split(":")
        _reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"POST /v1/batches HTTP/1.1\r\nHost: api\r\nAuthorization: {auth['Authorization']}\r\n"
                     "Content-Type: text/csv\r\nContent-Length: 100000000\r\n\r\n".encode())
        writer.write(b"".join(b"h%d@gone.example\n" % i for i in range(20_000)))
        await writer.drain()
        await eventually(lambda: _copying(api_settings), "the upload's COPY")
        writer.close()  # half-way: the transaction must roll back
        await eventually(lambda: "disconnected" in log.read_text(), "the API noticing the disconnect")
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from user_batches where user_id = 'hugo'").fetchone() == (0,)
    assert "Traceback" not in log.read_text() and "ERROR" not in log.read_text(), log.read_text()


class RawUpload:
    """A `POST /v1/batches` over a socket of its own: headers now, the body as the test sends it,
    the status line of the answer whenever it comes."""

    def __init__(self, url: str, auth: dict[str, str]) -> None:
        self.url, self.auth = url, auth
        self.status: int | None = None
        self.head = ""

    async def start(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.writer.write(f"POST /v1/batches HTTP/1.1\r\nHost: api\r\nAuthorization: {self.auth['Authorization']}\r\n"
                          "Content-Type: text/csv\r\nContent-Length: 100000000\r\n\r\nemail\n".encode())
        await self.writer.drain()
        self.answer = asyncio.create_task(self._read_answer())

    async def _read_answer(self) -> None:
        with contextlib.suppress(ConnectionError):
            self.head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
            self.status = int(self.head.split()[1])

    async def send(self, data: bytes) -> bool:
        """False once the server has stopped listening."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:
            return False
        return not self.writer.is_closing()

    async def trickle(self) -> None:
        """One byte every 0.5 s, for as long as the server takes them."""
        while self.status is None and await self.send(b"x"):
            await asyncio.sleep(0.5)

    def close(self) -> None:
        self.answer.cancel()
        self.writer.close()


async def test_uploads_trickled_by_one_user_delay_no_other_users_upload_or_dead_letters(dev_env, api_settings):
    """Eight uploads of one user, sent a byte every half second (each would hold a thread and a
    Postgres transaction as long as it lasts): two are read, the rest refused at once (429), and
    another user's upload and dead-letter listing answer as usual. (Uploads used to share the
    default executor, 6 threads here, with the dead-letter routes: both waited until timeout.)"""
    mallory, alice = new_key(api_settings, "mallory"), new_key(api_settings, "alys")
    with api_process(api_settings, dev_env.client.service_client.config.target_host, API_UPLOADS="4") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            first = await http.post("/v1/batches", headers=alice, json=["first@alys.example"])
            assert first.status_code == 201, first.text
            slow = [RawUpload(url, mallory) for _ in range(8)]
            for upload in slow:
                await upload.start()
            trickling = [asyncio.create_task(upload.trickle()) for upload in slow]
            try:
                await asyncio.sleep(3)
                started = time.monotonic()
                listed = await http.get(f"/v1/batches/{first.json()['id']}/dead-letters", headers=alice, timeout=10)
                assert listed.status_code == 200, listed.text
                resp = await http.post("/v1/batches", headers=alice, json=["second@alys.example"], timeout=10)
                assert resp.status_code == 201, resp.text
                assert time.monotonic() - started < 5
                refused = [u for u in slow if u.status is not None]
                assert [u.status for u in refused] == [429] * 6, [u.head for u in slow]
                assert all("retry-after: 5" in u.head.lower() for u in refused)
                assert all(not t.done() for u, t in zip(slow, trickling) if u.status is None)  # still being read
            finally:
                for upload, task in zip(slow, trickling):
                    task.cancel()
                    upload.close()
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from user_batches where user_id = 'mallory'").fetchone() == (0,)


async def test_an_upload_whose_client_goes_quiet_gets_a_408_and_stores_nothing(dev_env, api_settings):
    """API_CLIENT_IDLE_TIMEOUT_S=2: a client that sends part of a list and then nothing is answered
    408 and its transaction rolled back (it used to hold a thread and a transaction for as long as
    the client kept the connection open)."""
    auth = new_key(api_settings, "quentin")
    with api_process(api_settings, dev_env.client.service_client.config.target_host,
                     API_CLIENT_IDLE_TIMEOUT_S="2") as url:
        upload = RawUpload(url, auth)
        await upload.start()
        try:
            assert await upload.send(b"".join(b"q%d@quiet.example\n" % i for i in range(1000)))
            await asyncio.wait_for(asyncio.shield(upload.answer), 10)
            assert upload.status == 408, upload.head
            body = await asyncio.wait_for(upload.reader.read(1000), 5)
            assert b"API_CLIENT_IDLE_TIMEOUT_S" in body
        finally:
            upload.close()
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from user_batches where user_id = 'quentin'").fetchone() == (0,)


async def test_an_upload_trickled_slower_than_the_least_rate_gets_a_408_and_stores_nothing(dev_env, api_settings):
    """API_CLIENT_IDLE_TIMEOUT_S=2: a byte every 0.2 s never goes quiet for 2 s, but it is far below
    1 KiB a second; it is refused after 2 s of waiting (it used to hold its upload slot, and a
    Postgres transaction, for as long as the client kept trickling)."""
    auth = new_key(api_settings, "tricia")
    with api_process(api_settings, dev_env.client.service_client.config.target_host,
                     API_CLIENT_IDLE_TIMEOUT_S="2") as url:
        upload = RawUpload(url, auth)
        await upload.start()
        started = time.monotonic()
        try:
            assert await upload.send(b"t0@trickle.example\n")
            while upload.status is None and time.monotonic() - started < 10 and await upload.send(b"x"):
                await asyncio.sleep(0.2)
            await asyncio.wait_for(asyncio.shield(upload.answer), 5)
            assert upload.status == 408, upload.head
            assert time.monotonic() - started < 4
            body = await asyncio.wait_for(upload.reader.read(1000), 5)
            assert b"at least 1,024 a second" in body and b"API_CLIENT_IDLE_TIMEOUT_S" in body
        finally:
            upload.close()
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from user_batches where user_id = 'tricia'").fetchone() == (0,)


def _stalled_download(url: str, auth: dict[str, str], ub: int) -> tuple[socket.socket, str]:
    """`GET /v1/batches/{ub}/results?format=json` on a socket with a tiny receive buffer, of which
    only the start of the answer is read: the server's sends block once the buffers are full."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(20)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /v1/batches/{ub}/results?format=json HTTP/1.1\r\nHost: api\r\n"
                 f"Authorization: {auth['Authorization']}\r\n\r\n".encode())
    return sock, sock.recv(1024).decode("latin-1")


async def test_stalled_result_downloads_leave_requests_and_healthz_their_connections(dev_env, api_settings, tmp_path):
    """Downloads whose clients read nothing used to hold a connection of the one pool (and a
    transaction) for as long as the client liked: with API_DB_POOL_SIZE of them, every request
    waited 10 s to authenticate and answered 503, and /healthz waited past a probe's 1 s. Now
    downloads stream from a pool of their own, capped per user and per process (429/503 with
    Retry-After), and are cut off after API_CLIENT_IDLE_TIMEOUT_S without a read."""
    readers = [new_key(api_settings, "reader0"), new_key(api_settings, "reader1")]
    bystander = new_key(api_settings, "bystander")
    log = tmp_path / "api.log"
    with api_process(api_settings, dev_env.client.service_client.config.target_host, log=log, API_DB_POOL_SIZE="3",
                     API_EXPORTS="2", API_CLIENT_IDLE_TIMEOUT_S="5", API_MAX_UPLOAD_MB="8") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            batches = []
            for i, auth in enumerate(readers):
                resp = await http.post("/v1/batches", headers=auth,
                                       json=[f"r{i}.{n}@export.example" for n in range(60_000)])
                assert resp.status_code == 201, resp.text
                batches.append(resp.json()["id"])
            opened = [_stalled_download(url, readers[i], batches[i]) for i in (0, 0, 0, 1)]
            try:
                started = time.monotonic()
                listed = await http.get("/v1/batches", headers=bystander)
                assert listed.status_code == 200 and time.monotonic() - started < 2, listed.text
                started = time.monotonic()
                health = await http.get("/healthz", timeout=1)
                assert health.status_code == 200 and time.monotonic() - started < 1, health.text
                heads = [head.lower() for _sock, head in opened]
                assert [int(head.split()[1]) for head in heads] == [200, 200, 429, 503], heads
                assert all("retry-after: 5" in head for head in heads[2:])

                def stalled_transactions() -> int:
                    with psycopg.connect(api_settings.database_url) as conn:
                        return conn.execute("select count(*) from pg_stat_activity where datname = current_database()"
                                            " and state = 'idle in transaction'").fetchone()[0]

                await eventually(lambda: stalled_transactions() == 2, "both downloads waiting for their clients")
                await eventually(lambda: stalled_transactions() == 0, "the stalled downloads cut off", timeout=15)
            finally:
                for sock, _head in opened:
                    sock.close()
            # Their slots came back: a whole download again.
            again = await http.get(f"/v1/batches/{batches[0]}/results?format=json", headers=readers[0])
            assert again.status_code == 200 and len(again.json()) == 60_000
    assert "read nothing for 5 s (API_CLIENT_IDLE_TIMEOUT_S)" in log.read_text()


async def _healthz(settings, **update) -> httpx.Response:
    """`GET /healthz` of an API app in this process, on `settings` changed by `update`."""
    from api.app import create_app

    app = create_app(settings.model_copy(update=update))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        return await http.get("/healthz")


async def test_healthz_names_no_address_or_error_when_temporal_is_down(api_settings, caplog):
    """/healthz is unauthenticated: it says what is down, the log says why."""
    resp = await _healthz(api_settings, temporal_address="127.0.0.1:1")
    assert resp.status_code == 503
    assert resp.json() == {"status": "degraded", "postgres": "ok", "temporal": "down: Temporal unreachable"}
    assert "127.0.0.1:1" in caplog.text


async def test_healthz_names_no_error_when_postgres_is_down_and_logs_why(dev_env, api_settings, caplog, tmp_path):
    """The same for Postgres: the answer names it, the log has the error (it had neither the log
    line nor a fixed text: the exception's class name was the answer)."""
    resp = await _healthz(api_settings, database_url=f"postgresql://postgres@/postgres?host={tmp_path}&connect_timeout=1",
                          temporal_address=dev_env.client.service_client.config.target_host)
    assert resp.status_code == 503
    assert resp.json() == {"status": "degraded", "postgres": "down: Postgres unreachable", "temporal": "ok"}
    assert "/healthz: Postgres check failed" in caplog.text


def _copying(settings) -> int:
    """COPYs running in this test's database (the view lists every database's)."""
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute("select count(*) from pg_stat_progress_copy where datname = current_database()"
                            ).fetchone()[0]


async def test_a_key_sees_only_its_users_batches(dev_env, api_settings, api_url):
    alice, bob = new_key(api_settings, "alice"), new_key(api_settings, "bob")
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        mine = (await http.post("/v1/batches", headers=alice, json=["x@firm.example"])).json()["id"]
        for method, path in (("GET", ""), ("GET", "/results"), ("POST", "/pause"), ("POST", "/resume"),
                             ("DELETE", "")):
            resp = await http.request(method, f"/v1/batches/{mine}{path}", headers=bob)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json() == {"error": f"no user batch {mine}"}
        assert mine not in [b["id"] for b in (await http.get("/v1/batches", headers=bob)).json()["batches"]]
        assert mine in [b["id"] for b in (await http.get("/v1/batches", headers=alice)).json()["batches"]]
        assert (await http.get(f"/v1/batches/{mine}", headers=alice)).status_code == 200

        # The CLI's key: printed once, works, listed without the key, stored only as a hash, revocable.
        cli, env = CliRunner(), {"DATABASE_URL": api_settings.database_url}
        created = cli.invoke(starter.app, ["apikeys", "create", "--user", "alice"], env=env)
        assert created.exit_code == 0, created.output
        key = created.stdout.strip().splitlines()[-1]
        assert (await http.get(f"/v1/batches/{mine}", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        listed = json.loads(cli.invoke(starter.app, ["apikeys", "list", "--user", "alice", "--json"], env=env).stdout)
        assert key not in json.dumps(listed) and listed[-1]["prefix"] == key[:10]
        with psycopg.connect(api_settings.database_url) as conn:
            (stored,) = conn.execute("select key_hash from api_keys where id = %s", (listed[-1]["id"],)).fetchone()
            stored = bytes(stored)
        assert stored == keys.digest(key) and key.encode() not in stored
        assert cli.invoke(starter.app, ["apikeys", "revoke", str(listed[-1]["id"])], env=env).exit_code == 0

        # No key, a wrong key, a revoked key: 401 with a JSON error.
        for headers in ({}, {"Authorization": "Bearer bk_nope"}, {"Authorization": f"Bearer {key}"}):
            resp = await http.get(f"/v1/batches/{mine}", headers=headers)
            assert resp.status_code == 401 and "API key" in resp.json()["error"]
        # Cancelling through the owner's key works (no worker runs here: the workflow is just started).
        resp = await http.delete(f"/v1/batches/{mine}", headers=alice)
        assert resp.status_code == 202 and resp.json()["cancel_requested"] is True


async def test_a_repeated_idempotency_key_returns_the_first_batch_and_stores_nothing(api_settings, api_url):
    """A client whose answer was lost retries with the same Idempotency-Key: one batch, not two."""
    dora, erik = new_key(api_settings, "dora"), new_key(api_settings, "erik")
    body = [f"idem.{i}@firm{i % 3}.example" for i in range(5)]
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        first = await http.post("/v1/batches", headers={**dora, "Idempotency-Key": "order-1"}, json=body)
        assert first.status_code == 201, first.text
        ub = first.json()["id"]
        again = await asyncio.gather(*(
            http.post("/v1/batches", headers={**dora, "Idempotency-Key": "order-1"}, json=body) for _ in range(3)))
        for resp in again:
            assert resp.status_code == 200 and resp.headers["idempotent-replayed"] == "true", resp.text
            assert resp.json()["id"] == ub and resp.headers["location"] == f"/v1/batches/{ub}"
        # Another key, or another user with the same key: a new batch each.
        other = await http.post("/v1/batches", headers={**dora, "Idempotency-Key": "order-2"}, json=body)
        erik_s = await http.post("/v1/batches", headers={**erik, "Idempotency-Key": "order-1"}, json=body)
        assert (other.status_code, erik_s.status_code) == (201, 201)
        assert len({ub, other.json()["id"], erik_s.json()["id"]}) == 3
        # Sent together (no answer yet to either): still one batch. (Two: API_UPLOADS_PER_USER.)
        racing = await asyncio.gather(*(
            http.post("/v1/batches", headers={**dora, "Idempotency-Key": "order-3"}, json=body) for _ in range(2)))
        assert sorted(r.status_code for r in racing) == [200, 201], [r.text for r in racing]
        assert len({r.json()["id"] for r in racing}) == 1
        bad = await http.post("/v1/batches", headers={**dora, "Idempotency-Key": "x" * 201}, json=body)
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from items where user_batch_id = %s", (ub,)).fetchone() == (5,)
        assert conn.execute("select count(*) from user_batches where user_id = 'dora'").fetchone() == (3,)


async def test_a_user_over_api_submissions_per_hour_gets_a_429_with_retry_after(dev_env, api_settings):
    """API_SUBMISSIONS_PER_HOUR=2: a user's third list within the hour is refused and nothing is
    stored; a replayed Idempotency-Key still answers; another user is not limited by it."""
    fay, gus = new_key(api_settings, "fay"), new_key(api_settings, "gus")
    with api_process(api_settings, dev_env.client.service_client.config.target_host,
                     API_SUBMISSIONS_PER_HOUR="2") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for i in range(2):
                ok = await http.post("/v1/batches", headers={**fay, "Idempotency-Key": f"f{i}"}, json=[f"f{i}@x.example"])
                assert ok.status_code == 201, ok.text
            third = await http.post("/v1/batches", headers=fay, json=["f2@x.example"])
            assert third.status_code == 429, third.text
            assert "API_SUBMISSIONS_PER_HOUR" in third.json()["error"]
            assert 3500 <= int(third.headers["retry-after"]) <= 3600
            replay = await http.post("/v1/batches", headers={**fay, "Idempotency-Key": "f0"}, json=["f0@x.example"])
            assert replay.status_code == 200  # a retry of an accepted list is not a new one
            assert (await http.post("/v1/batches", headers=gus, json=["g@x.example"])).status_code == 201
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select count(*) from user_batches where user_id = 'fay'").fetchone() == (2,)
        # An hour later (the batches aged), fay may submit again: the limit counts a rolling hour.
        conn.execute("update user_batches set created_at = created_at - interval '61 minutes' where user_id = 'fay'")
    with api_process(api_settings, dev_env.client.service_client.config.target_host,
                     API_SUBMISSIONS_PER_HOUR="2") as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            assert (await http.post("/v1/batches", headers=fay, json=["f2@x.example"])).status_code == 201


async def test_uploads_that_arrive_together_cannot_pass_api_submissions_per_hour(dev_env, api_settings):
    """API_SUBMISSIONS_PER_HOUR=2 and five uploads whose bodies take a second: exactly two are stored,
    three get 429 before their body is read. (The count used to see only committed batches, so all
    five passed it.) An upload refused for its body gives its place back; uploads sent with one
    Idempotency-Key take one place between them."""
    ida, jon, kim = new_key(api_settings, "ida"), new_key(api_settings, "jon"), new_key(api_settings, "kim")

    async def slow(body: bytes):
        yield body[:2]
        await asyncio.sleep(1)
        yield body[2:]

    def post(http: httpx.AsyncClient, auth: dict, body: bytes, key: str | None = None):
        headers = {**auth, "Content-Type": "application/json", **({"Idempotency-Key": key} if key else {})}
        return http.post("/v1/batches", headers=headers, content=slow(body))

    with api_process(api_settings, dev_env.client.service_client.config.target_host,
                     API_SUBMISSIONS_PER_HOUR="2", API_UPLOADS_PER_USER="10") as url:  # the hourly limit alone
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            racing = await asyncio.gather(*(post(http, ida, b'["i%d@x.example"]' % i) for i in range(5)))
            assert sorted(r.status_code for r in racing) == [201, 201, 429, 429, 429], [r.text for r in racing]
            assert all(3500 <= int(r.headers["retry-after"]) <= 3600 for r in racing if r.status_code == 429)

            assert (await post(http, jon, b'["j0@x.example",')).status_code == 400  # stores nothing, counts not
            assert (await post(http, jon, b"[]")).status_code == 400
            assert [(await post(http, jon, b'["j%d@x.example"]' % i)).status_code for i in (1, 2, 3)] == [201, 201, 429]

            keyed = await asyncio.gather(post(http, kim, b'["k1@x.example"]', "k1"),
                                         post(http, kim, b'["k1@x.example"]', "k1"),
                                         post(http, kim, b'["k2@x.example"]'))
            assert sorted(r.status_code for r in keyed) == [200, 201, 201], [r.text for r in keyed]
            assert (await post(http, kim, b'["k3@x.example"]')).status_code == 429
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select user_id, count(*) from user_batches where user_id in ('ida', 'jon', 'kim')"
                            " group by 1 order by 1").fetchall() == [("ida", 2), ("jon", 2), ("kim", 2)]
        assert conn.execute("select count(*) from api_upload_claims").fetchone() == (0,)  # none left behind


async def test_bad_input_gets_a_4xx_with_a_json_error_and_stores_nothing(api_settings, api_url):
    auth = new_key(api_settings, "carol")
    admin = new_key(api_settings, "ops", admin=True)

    def batches() -> int:
        with psycopg.connect(api_settings.database_url) as conn:
            return conn.execute("select count(*) from user_batches where user_id = 'carol'").fetchone()[0]

    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        cases = [
            (http.post("/v1/batches", headers={**auth, "Content-Type": "application/xml"}, content=b"<xml/>"),
             415, "Content-Type"),
            (http.post("/v1/batches", headers={**auth, "Content-Type": "application/json"}, content=b'["a@b.example",'),
             400, "not valid JSON"),
            (http.post("/v1/batches", headers=auth, json={"emails": ["a@b.example"]}), 400, "JSON array"),
            (http.post("/v1/batches", headers=auth, json=[]), 400, "no rows"),
            (http.post("/v1/batches?priority=urgent", headers=auth, json=["a@b.example"]), 400, "priority"),
            (http.post("/v1/batches?lanes=deliverability,sms", headers=auth, json=["a@b.example"]), 400, "lane sms"),
            (http.post("/v1/batches?colour=red", headers=auth, json=["a@b.example"]), 400, "colour"),
            (http.post("/v1/batches?max_age=30s", headers=auth, json=["a@b.example"]), 400, "max_age: '30s' is shorter"),
            (http.post("/v1/batches?max_age=soon", headers=auth, json=["a@b.example"]), 400, "cannot read duration"),
            (http.get("/v1/lanes?verbose=1", headers=auth), 400, "unknown query parameter"),
            (http.post("/v1/batches", headers=auth, files={"list": ("l.csv", b"a@b.example\n")}), 400, "`file`"),
            # Two lists in one request: the first's last line would run into the second's header.
            (http.post("/v1/batches", headers=auth, files=[("file", ("a.csv", b"email\nx1@a.example")),
                                                            ("file", ("b.csv", b"email\ny1@b.example\n"))]),
             400, "more than one part named `file`"),
            (http.post("/v1/batches", headers={**auth, "Content-Type": "text/csv; charset=klingon"},
                       content=b"a@b.example\n"), 415, "charset 'klingon' is unknown"),
            *((http.post("/v1/batches", headers={**auth, "Content-Type": f"{ctype}; charset={charset}"},
                         content=body), 415, f"charset {charset!r} is not a text encoding")
              for charset in ("base64", "hex", "zlib", "rot13", "undefined", "idna")
              for ctype, body in (("text/csv", b"a@b.example\n"), ("application/json", b'["a@b.example"]'))),
            (http.post("/v1/batches", headers={**auth, "Content-Type": "text/csv; charset=utf-32"},
                       content=b"a@b.example\n"), 400, "cannot read the list as utf-32: UTF-32 stream does not start"),
            (http.post("/v1/batches?lanes=deliverability,deliverability", headers=auth, json=["a@b.example"]),
             400, "named more than once"),
            (http.post("/v1/batches?column=Email", headers=auth, json=["a@b.example"]), 400, "column applies to CSV"),
            (http.post("/v1/batches?name=%ff%fe", headers=auth, json=["a@b.example"]), 400, "not UTF-8"),
            (http.post("/v1/batches", headers={**auth, "Content-Type": "application/json"},
                       content=b'["a@b.example", "\xff@b.example"]'), 400, "(after element 1): lexical error: invalid"
                                                                          " bytes in UTF8 string."),
            (http.post("/v1/batches?column=Work", headers={**auth, "Content-Type": "text/csv"},
                       content=b"Name,Email\nx,a@b.example\n"), 400, "column 'Work' not found"),
            (http.post("/v1/batches", headers={**auth, "Content-Type": "text/csv"}, content=b"a@b.example\n" * 300_000),
             413, "API_MAX_UPLOAD_MB"),
            (http.get("/v1/batches/999999", headers=auth), 404, "no user batch"),
            (http.get("/v1/batches/abc", headers=auth), 404, "no user batch"),
            (http.get("/v1/batches/99999999999999999999999", headers=auth), 404, "no user batch"),
            (http.get("/v1/batches?limit=0", headers=auth), 400, "limit"),
            (http.get("/v1/nothing", headers=auth), 404, "no such route"),
            (http.put("/v1/batches", headers=auth), 405, "method not allowed"),
            (http.post("/v1/lanes/deliverability/pause", headers=auth), 403, "admin key"),
            (http.post("/v1/lanes/sms/pause", headers=admin), 404, "no lane"),
        ]
        for request, status, words in cases:
            resp = await request
            assert resp.status_code == status, (status, resp.text)
            assert words in resp.json()["error"], resp.text
            assert not re.search(r"(?<![a-z])b'", resp.json()["error"]), resp.text  # no bytes repr ('zlib' is fine)
        assert batches() == 0  # refused submissions left nothing behind
        allowed = (await http.put("/v1/batches", headers=auth)).headers["allow"]
        assert set(allowed.split(", ")) == {"GET", "HEAD", "POST"}

        ok = (await http.post("/v1/batches", headers=auth, json=["a@b.example"])).json()["id"]
        for query, words in (("format=xml", "format"), ("status=great", "status"),
                             ("status=risky,great", "status 'great' is not one of"),
                             ("columns=email,catchall_status", "column 'catchall_status' is not one of row,"),
                             ("columns=email,email", "named twice")):
            resp = await http.get(f"/v1/batches/{ok}/results?{query}", headers=auth)
            assert resp.status_code == 400 and words in resp.json()["error"]


async def test_a_declared_charset_and_byte_order_marks_are_read_as_the_text_they_stand_for(api_settings, api_url):
    auth = new_key(api_settings, "dora")

    def stored(ub: int) -> list[tuple]:
        with psycopg.connect(api_settings.database_url) as conn:
            return conn.execute("select row_no, email, state from items where user_batch_id = %s order by row_no",
                                (ub,)).fetchall()

    latin1 = "email\nann@bücher.example\nbob@example.com\n".encode("latin-1")
    bodies = [
        ("text/csv; charset=iso-8859-1", latin1, [(2, "ann@xn--bcher-kva.example"), (3, "bob@example.com")]),
        ("text/csv", latin1, [(2, None), (3, "bob@example.com")]),  # undeclared: not UTF-8, so reported
        ("application/json", b"\xef\xbb\xbf" + json.dumps(["ann@bücher.example"]).encode(),
         [(1, "ann@xn--bcher-kva.example")]),
        ("application/json", json.dumps(["bob@example.com", 5]).encode("utf-16"), [(1, "bob@example.com"), (2, None)]),
    ]
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for ctype, body, expected in bodies:
            resp = await http.post("/v1/batches", headers={**auth, "Content-Type": ctype}, content=body)
            assert resp.status_code == 201, (ctype, resp.text)
            assert [(r[0], r[1]) for r in stored(resp.json()["id"])] == expected, ctype


async def test_a_json_element_over_16_mib_is_one_invalid_row_as_a_csv_line_over_it_is(dev_env, api_settings):
    """The element is reported with its position and its first 1,000 characters kept. It used to be
    read whole and stored whole in items.raw (yajl re-scans a string at every read: quadratic)."""
    auth = {**new_key(api_settings, "lev"), "Content-Type": "application/json"}
    body = b'["ann@x.example", "' + b"a" * (20 * 2**20) + b'@x.example", "cid@y.example"]'
    with api_process(api_settings, dev_env.client.service_client.config.target_host, API_MAX_UPLOAD_MB="64") as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            resp = await http.post("/v1/batches", headers=auth, content=body)
    assert resp.status_code == 201, resp.text
    doc = resp.json()
    assert (doc["rows"], doc["invalid"], doc["invalid_rows"]) == (
        3, 1, [{"row": 2, "reason": "element longer than 16 MiB (20,971,530 bytes): not read"}]), doc
    with psycopg.connect(api_settings.database_url) as conn:
        assert conn.execute("select row_no, length(raw), email from items where user_batch_id = %s order by row_no",
                            (doc["id"],)).fetchall() == [(1, 13, "ann@x.example"), (2, 1000, None),
                                                         (3, 13, "cid@y.example")]


def test_a_json_element_over_16_mib_is_skipped_without_being_held():
    """The parse of a 20 MiB element, alone: the old code took ~1.2 s and ~80 MiB (Python's share;
    yajl's buffer besides) here, growing with the square of the length."""
    def chunks():
        yield b'["ann@x.example", "'
        yield from itertools.repeat(b"a" * 65536, 20 * 16)
        yield b'@x.example"]'

    tracemalloc.start()
    try:
        started = time.monotonic()
        rows = list(json_rows(chunks()))
        elapsed, peak = time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(n, len(raw), reason[:28] if reason else None) for n, raw, _email, reason in rows] == [
        (1, 13, None), (2, 1000, "element longer than 16 MiB (")]
    assert peak < 4 * 2**20 and elapsed < 1.0, (peak, elapsed)


def test_an_over_long_json_string_is_cut_whole_wherever_the_chunks_end(monkeypatch):
    """Cut to its first bytes, a string must stay JSON: no escape or UTF-8 sequence split in two,
    whether the body's chunks end inside it or not; strings at the limit are read whole."""
    monkeypatch.setattr(uploads, "_MAX_FIELD", 40)
    monkeypatch.setattr(uploads, "_HEAD_BYTES", 12)
    rng = random.Random(7)
    alphabet = ["a", "@", '"', "\\", "/", "\n", "ü", "😀", "\u2028"]
    for _ in range(2000):
        elements = ["".join(rng.choices(alphabet, k=rng.randint(0, 50))) for _ in range(rng.randint(1, 5))]
        elements.insert(rng.randint(0, len(elements)), {"k" * rng.randint(30, 60): "v"})  # not a row's string
        ascii_only = rng.random() < 0.5
        encoded = [json.dumps(e, ensure_ascii=ascii_only).encode() for e in elements]
        body = b"[" + b",".join(encoded) + b"]"
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(0, 6))))
        rows = list(json_rows(body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])))
        assert len(rows) == len(elements)
        for (_n, raw, _email, reason), element, text in zip(rows, elements, encoded):
            if isinstance(element, dict):
                assert reason == "not a string (JSON start_map)"
            elif len(text) - 2 > 40:
                assert reason == f"element longer than 0 MiB ({len(text) - 2} bytes): not read", body
                assert raw and element.startswith(raw.rstrip("?")), (body, raw)  # a lone surrogate half reads "?"
            else:
                assert raw == element and not (reason or "").startswith("element longer"), body


async def test_a_gzip_body_or_file_part_is_read_decompressed_and_a_broken_or_bomb_one_is_refused(
    api_settings, api_url
):
    auth = new_key(api_settings, "gzip-user")
    plain = "email\nann@bücher.example\nnot-an-address\nbob@example.com\n"
    packed = gzip.compress(plain.encode())

    def stored(ub: int) -> list[tuple]:
        with psycopg.connect(api_settings.database_url) as conn:
            return conn.execute("select row_no, email, reason from items where user_batch_id = %s order by row_no",
                                (ub,)).fetchall()

    def batches() -> int:
        with psycopg.connect(api_settings.database_url) as conn:
            return conn.execute("select count(*) from user_batches where user_id = 'gzip-user'").fetchone()[0]

    expected = [(2, "ann@xn--bcher-kva.example", None), (3, None, "missing @"), (4, "bob@example.com", None)]
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for kw in ({"headers": {**auth, "Content-Type": "text/csv"}, "content": packed},
                   {"headers": {**auth, "Content-Type": "text/csv", "Content-Encoding": "gzip"}, "content": packed},
                   {"headers": {**auth, "Content-Type": "text/csv; charset=iso-8859-1"},  # decompressed, then decoded
                    "content": gzip.compress(plain.encode("latin-1"))},
                   {"headers": auth, "files": {"file": ("list.csv.gz", packed, "application/gzip")}}):
            resp = await http.post("/v1/batches", **kw)
            assert resp.status_code == 201, resp.text
            doc = resp.json()
            assert (doc["rows"], doc["invalid"], doc["invalid_rows"]) == (3, 1, [{"row": 3, "reason": "missing @"}])
            assert stored(doc["id"]) == expected
        resp = await http.post("/v1/batches", headers={**auth, "Content-Type": "application/json"},
                               content=gzip.compress(json.dumps(["ann@example.com", 5]).encode()))
        assert (resp.status_code, resp.json()["rows"], resp.json()["invalid"]) == (201, 2, 1), resp.text
        before = batches()
        bomb = gzip.compress(b"a@b.example\n" * 300_000)  # 3.6 MB once decompressed, API_MAX_UPLOAD_MB is 2
        assert len(bomb) < 100_000
        for kw, status, words in [
            ({"headers": {**auth, "Content-Type": "text/csv"}, "content": packed[:-10]}, 400,
             "cannot read the request body: its gzip data ends early"),
            ({"headers": auth, "files": {"file": ("x.gz", packed[:30] + b"\xff" * 20 + packed[50:])}}, 400,
             "cannot read the `file` part: it is gzip (starts with bytes 1f 8b) but its data is corrupt"),
            ({"headers": {**auth, "Content-Type": "text/csv"}, "content": bomb}, 413,
             "once decompressed (API_MAX_UPLOAD_MB)"),
            ({"headers": auth, "files": {"file": ("bomb.gz", bomb)}}, 413, "once decompressed (API_MAX_UPLOAD_MB)"),
        ]:
            resp = await http.post("/v1/batches", **kw)
            assert resp.status_code == status, resp.text
            assert words in resp.json()["error"], resp.text
        assert batches() == before  # refused bodies left nothing behind


async def test_a_bad_first_row_is_a_reported_row_and_a_header_is_named_in_the_answer(api_settings, api_url):
    auth = {**new_key(api_settings, "rhea"), "Content-Type": "text/csv"}
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for body in (b"Ann,not-an-address\nBob,bob@example.com\nCid,cid@example.com\n",
                     b'"Doe, Ann";not-an-address\nBob;bob@example.com\nCid;cid@example.com\n'):
            doc = (await http.post("/v1/batches", headers=auth, content=body)).json()
            assert (doc["rows"], doc["invalid"], doc["invalid_rows"], doc["header"]) == (
                3, 1, [{"row": 1, "reason": "missing @"}], None), doc
            with psycopg.connect(api_settings.database_url) as conn:  # counted at once, not only by prepare
                assert conn.execute("select rows_total, invalid from user_batches where id = %s",
                                    (doc["id"],)).fetchone() == (3, 1)
        doc = (await http.post("/v1/batches?column=1", headers=auth, content=b"not-an-address\na@example.com\n")).json()
        assert (doc["rows"], doc["invalid"]) == (2, 1), doc
        doc = (await http.post("/v1/batches", headers=auth, content=b"Name,E-Mail\nBob,bob@example.com\n")).json()
        assert (doc["rows"], doc["header"]) == (1, {"line": 1, "names": ["Name", "E-Mail"], "column": 2}), doc


async def test_a_batchs_dead_letters_are_listed_and_retried_through_the_api(dev_env, api_settings, api_url):
    auth = new_key(api_settings, "dina")
    emails = [f"dead{i}@firm{i % 5}.example" for i in range(30)]
    # The API refuses every creation (400: the callback URL is not http): all 30 addresses dead-letter.
    broken = api_settings.model_copy(update={"callback_public_url": "ftp://callbacks.invalid"})
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        async with running_pipeline(dev_env.client, broken):
            resp = await http.post("/v1/batches", headers=auth, json=emails)
            assert resp.status_code == 201, resp.text
            ub = resp.json()["id"]
            done = await wait_finished(http, f"/v1/batches/{ub}", auth)
            assert done["summary"]["by_state"] == {"failed": 30}
            await dev_env.client.get_workflow_handle(done["workflow_id"]).result()  # not cut short by the workers' stop

        url = f"/v1/batches/{ub}/dead-letters"
        assert (await http.get(url, headers=new_key(api_settings, "ollie"))).status_code == 404  # not ollie's
        assert (await http.post(url + "/retry", headers=new_key(api_settings, "ollie"))).status_code == 404
        assert (await http.get(url + "?limit=0", headers=auth)).status_code == 400
        listed = (await http.get(url + "?limit=5", headers=auth)).json()
        assert listed["total"] == 30 and len(listed["dead_letters"]) == 5
        first = listed["dead_letters"][0]
        assert first["email"] in emails and first["attempts"] == 1 and first["lane"] == "deliverability"
        assert "BadRequest" in first["reason"] and "callback" in first["reason"]

        async with running_pipeline(dev_env.client, api_settings):  # the callback URL fixed
            retried = await http.post(url + "/retry", headers=auth)
            assert retried.status_code == 200, retried.text
            assert retried.json()["retried"] == 30 and retried.json()["batch"]["state"] == "queued"  # reopened
            again = await wait_finished(http, f"/v1/batches/{ub}", auth)
            assert again["state"] == "completed" and again["summary"]["by_state"] == {"verified": 30}
        assert (await http.get(url, headers=auth)).json() == {"total": 0, "dead_letters": []}
        # Nothing left to retry: 0, and the batch stays completed.
        nothing = (await http.post(url + "/retry", headers=auth)).json()
        assert nothing["retried"] == 0 and nothing["batch"]["state"] == "completed"


async def test_a_batchs_dead_letters_are_its_own_not_another_users_of_the_same_address(
        dev_env, api_settings, api_url):
    """bob's address dead-letters; alice's list names it too and fails on its own. alice's
    dead-letter routes used to pick every dead letter of an address in her list: she read bob's
    (his bouncer batch, time and reason), and her retry deleted it, so bob's retry found nothing
    and his row stayed failed."""
    bob, alice = new_key(api_settings, "bob"), new_key(api_settings, "alice")
    secret = "ceo.private@victim-corp.example"
    broken = api_settings.model_copy(update={"callback_public_url": "ftp://callbacks.invalid"})
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        async with running_pipeline(dev_env.client, broken):
            bob_ub = (await http.post("/v1/batches", headers=bob, json=[secret])).json()["id"]
            assert (await wait_finished(http, f"/v1/batches/{bob_ub}", bob))["summary"]["by_state"] == {"failed": 1}
            alices_list = [secret, "ann.other@firm.example"]
            alice_ub = (await http.post("/v1/batches", headers=alice, json=alices_list)).json()["id"]
            done = await wait_finished(http, f"/v1/batches/{alice_ub}", alice)
            assert done["summary"]["by_state"] == {"failed": 2}
            await dev_env.client.get_workflow_handle(done["workflow_id"]).result()
        bob_url, alice_url = f"/v1/batches/{bob_ub}/dead-letters", f"/v1/batches/{alice_ub}/dead-letters"
        (bobs,) = (await http.get(bob_url, headers=bob)).json()["dead_letters"]
        assert bobs["email"] == secret

        # alice sees her own two dead letters, not bob's row of the same address.
        alices = (await http.get(alice_url, headers=alice)).json()
        assert alices["total"] == 2, alices
        assert bobs["id"] not in {d["id"] for d in alices["dead_letters"]}
        assert bobs["bouncer_batch_id"] not in {d["bouncer_batch_id"] for d in alices["dead_letters"]}

        async with running_pipeline(dev_env.client, api_settings):  # the callback URL fixed
            retried = (await http.post(alice_url + "/retry", headers=alice)).json()
            assert retried["retried"] == 2, retried
            again = await wait_finished(http, f"/v1/batches/{alice_ub}", alice)
            assert again["summary"]["by_state"] == {"verified": 2}
            # bob's dead letter is still his: listed, and his retry sends his row again.
            assert (await http.get(bob_url, headers=bob)).json()["dead_letters"] == [bobs]
            assert (await http.get(alice_url, headers=alice)).json() == {"total": 0, "dead_letters": []}
            retried = (await http.post(bob_url + "/retry", headers=bob)).json()
            assert retried["retried"] == 1 and retried["batch"]["state"] == "queued", retried
            again = await wait_finished(http, f"/v1/batches/{bob_ub}", bob)
            assert again["state"] == "completed" and again["summary"]["by_state"] == {"verified": 1}
        assert (await http.get(bob_url, headers=bob)).json() == {"total": 0, "dead_letters": []}


async def test_admin_key_pauses_and_resumes_a_lane(dev_env, api_settings, api_url):
    admin = new_key(api_settings, "ops", admin=True)
    async with running_pipeline(dev_env.client, api_settings), httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        paused = await http.post("/v1/lanes/deliverability/pause", headers=admin)
        assert paused.status_code == 200 and paused.json()["paused"] is True
        assert "ops" in paused.json()["pause_reason"]
        lanes = {d["lane"]: d for d in (await http.get("/v1/lanes", headers=admin)).json()["lanes"]}
        assert lanes["deliverability"]["paused"] and lanes["deliverability"]["running"]
        resumed = await http.post("/v1/lanes/deliverability/resume", headers=admin)
        assert resumed.status_code == 200 and resumed.json()["paused"] is False


async def test_a_query_parameter_given_twice_is_refused_not_read_as_its_last_value(api_settings, api_url):
    """`?status=deliverable&status=risky` was read as `status=risky` alone, and `?priority=high&priority=low`
    stored a low-priority batch: a 200 or 201 that silently dropped what the client asked for."""
    auth = new_key(api_settings, "ivan")
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        ub = (await http.post("/v1/batches", headers=auth, json=["a@b.example"])).json()["id"]
        for method, url in (("GET", f"/v1/batches/{ub}/results?status=deliverable&status=risky"),
                            ("GET", "/v1/batches?limit=1&limit=2"),
                            ("GET", f"/v1/batches/{ub}/dead-letters?limit=5&limit=6"),
                            ("POST", "/v1/batches?priority=high&priority=low")):
            resp = await http.request(method, url, headers=auth, json=["c@d.example"] if method == "POST" else None)
            assert resp.status_code == 400, (url, resp.status_code, resp.text)
            assert "given more than once" in resp.json()["error"], resp.text
        listed = (await http.get("/v1/batches", headers=auth)).json()["batches"]
        assert [b["id"] for b in listed] == [ub]  # the refused POST stored nothing
        ok = await http.get(f"/v1/batches/{ub}/results?status=deliverable,risky&format=json", headers=auth)
        assert ok.status_code == 200, ok.text


async def test_the_batch_listing_pages_past_its_limit_with_before(api_settings, api_url):
    """Only the newest `limit` (at most 500) batches could be listed: older ones were out of reach."""
    auth = new_key(api_settings, "mona")
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        ids = [(await http.post("/v1/batches", headers=auth, json=[f"p{i}@b.example"])).json()["id"] for i in range(5)]
        seen, url = [], "/v1/batches?limit=2"
        while True:
            resp = await http.get(url, headers=auth)
            assert resp.status_code == 200, resp.text
            if not (page := [b["id"] for b in resp.json()["batches"]]):
                break
            seen += page
            url = f"/v1/batches?limit=2&before={page[-1]}"
        assert seen == ids[::-1]
        for bad in ("0", "x", "-1", "99999999999999999999"):
            resp = await http.get(f"/v1/batches?before={bad}", headers=auth)
            assert resp.status_code == 400 and "before" in resp.json()["error"], (bad, resp.text)


async def test_a_content_encoding_other_than_gzip_is_a_415_and_stores_nothing(api_settings, api_url):
    """A deflate (or br) body was read as text: 201, its addresses lost as a few garbage invalid rows."""
    import zlib

    auth = new_key(api_settings, "jana")
    body = "".join(f"user{i}@example.com\n" for i in range(50)).encode()
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for encoding, content in (("deflate", zlib.compress(body)), ("br", body), ("gzip, deflate", body)):
            resp = await http.post("/v1/batches", headers={**auth, "Content-Type": "text/csv",
                                                           "Content-Encoding": encoding}, content=content)
            assert resp.status_code == 415, (encoding, resp.status_code, resp.text)
            assert "Content-Encoding" in resp.json()["error"]
        assert (await http.get("/v1/batches", headers=auth)).json()["batches"] == []
        for encoding, content in (("gzip", gzip.compress(body)), ("identity", body)):
            resp = await http.post("/v1/batches", headers={**auth, "Content-Type": "text/csv",
                                                           "Content-Encoding": encoding}, content=content)
            assert resp.status_code == 201 and (resp.json()["rows"], resp.json()["invalid"]) == (50, 0), resp.text


async def test_a_trailing_slash_is_a_json_404_not_a_redirect_to_plain_http(api_settings, api_url):
    """`/v1/batches/` answered 307 with an absolute `Location: http://...` (the scheme the API sees,
    plain http behind a TLS ingress), an empty body, and for POST a body the client must send again."""
    auth = new_key(api_settings, "karl")
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        for method, path in (("GET", "/v1/batches/"), ("POST", "/v1/batches/"), ("GET", "/v1/lanes/")):
            resp = await http.request(method, path, headers={**auth, "Host": "api.example.com"},
                                      json=["a@b.example"] if method == "POST" else None)
            assert resp.status_code == 404 and "location" not in resp.headers, (path, resp.status_code, resp.headers)
            assert resp.json() == {"error": f"no such route (routes have no trailing slash: {path.rstrip('/')})"}
        assert (await http.get("/v1/batches", headers=auth)).json()["batches"] == []


async def test_a_multipart_file_parts_own_charset_is_read_as_such(api_settings, api_url):
    """`-F 'file=@list.csv;type=text/csv; charset=windows-1252'`: the part's charset was ignored and
    its rows read as UTF-8, so an address with a non-ASCII letter was an invalid row."""
    auth = new_key(api_settings, "lena")
    body = "name,email\nJosé,josé@exámple.com\nRené,rene@example.com\n".encode("windows-1252")
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        resp = await http.post("/v1/batches", headers=auth,
                               files={"file": ("l.csv", body, "text/csv; charset=windows-1252")})
        assert resp.status_code == 201 and resp.json()["invalid"] == 0, resp.text
        rows = (await http.get(f"/v1/batches/{resp.json()['id']}/results?format=json&columns=input,email",
                               headers=auth)).json()
        assert rows == [{"input": "josé@exámple.com", "email": "josé@xn--exmple-qta.com"},
                        {"input": "rene@example.com", "email": "rene@example.com"}]
        gz = await http.post("/v1/batches", headers=auth,  # decompressed first, then decoded
                             files={"file": ("l.csv.gz", gzip.compress(body), "text/csv; charset=windows-1252")})
        assert gz.status_code == 201 and gz.json()["invalid"] == 0, gz.text
        bad = await http.post("/v1/batches", headers=auth, files={"file": ("l.csv", body, "text/csv; charset=klingon")})
        assert bad.status_code == 415 and "charset 'klingon' is unknown" in bad.json()["error"], bad.text
        plain = await http.post("/v1/batches", headers=auth, files={"file": ("l.csv", b"x@y.example\n")})
        assert plain.status_code == 201 and plain.json()["invalid"] == 0, plain.text


async def test_a_head_of_results_answers_the_headers_without_running_the_export():
    """HEAD streamed the whole export from Postgres (and held an export slot and connection for it)
    only for the server to drop the body."""
    from api.app import ResultDownload

    pulled, sent, given_back = [], [], []

    async def chunks():
        for i in range(100):
            pulled.append(i)
            yield b"x" * 1000

    async def send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    scope = {"type": "http", "method": "HEAD", "path": "/v1/batches/1/results", "asgi": {"spec_version": "2.4"}}
    resp = ResultDownload(chunks(), 5.0, lambda: given_back.append(1), media_type="text/csv")
    await resp(scope, receive, send)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"" and sent[-1]["more_body"] is False
    assert len(pulled) == 1 and given_back == [1]  # the first chunk only (a 503 if Postgres is down)
    pulled.clear(), sent.clear()
    resp = ResultDownload(chunks(), 5.0, lambda: given_back.append(1), media_type="text/csv")
    await resp({**scope, "method": "GET"}, receive, send)
    assert len(pulled) == 100 and len(b"".join(m.get("body", b"") for m in sent[1:])) == 100_000


def test_the_openapi_document_declares_the_bodies_and_headers_the_api_answers_with():
    """text/plain bodies were accepted but not in the document; Location, Idempotent-Replayed and
    Content-Disposition were sent but not declared."""
    from api.openapi import DOCUMENT

    post = DOCUMENT["paths"]["/v1/batches"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "text/csv", "text/plain",
                                                    "application/json"}
    assert set(post["responses"]["201"]["headers"]) == {"Location"}
    assert set(post["responses"]["200"]["headers"]) == {"Location", "Idempotent-Replayed"}
    results = DOCUMENT["paths"]["/v1/batches/{id}/results"]["get"]
    assert "Content-Disposition" in results["responses"]["200"]["headers"]


# ---- the running server against its OpenAPI document (schemathesis) ---------------------


@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")  # inside schemathesis
async def test_every_answer_matches_the_openapi_document(dev_env, api_url, api_settings):
    """Generated requests, valid and invalid, against the served document, with workers running:
    never a 5xx, and every status, content type and body is one the document declares.

    schemathesis's pytest plugin (`from_fixture`) does not run on pytest 9.2 yet (it reads a
    removed `Node._nodeid`), so each operation's Hypothesis strategy is driven directly, in a
    thread (its HTTP calls block) while this event loop runs the workers.
    """
    auth = new_key(api_settings, "fuzz")
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 13

    def fuzz() -> None:
        for operation in operations:
            has_inputs = bool(len(operation.path_parameters) or len(operation.query) or len(operation.body))
            modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_inputs else (GenerationMode.POSITIVE,)
            for mode in modes:

                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                @hypothesis.settings(max_examples=6, deadline=None, database=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck))
                def check(case) -> None:
                    # Content decides some refusals a schema cannot express (a `column` absent from the
                    # uploaded file's header, a list with no rows): those are 400s, not schema violations.
                    case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

                check()

    async with running_pipeline(dev_env.client, api_settings):
        await asyncio.to_thread(fuzz)


def test_a_json_number_too_large_for_64_bits_refuses_the_body_instead_of_crashing_the_process():
    """yajl's C backend handed Python a 5,000-digit integer and the API process died (SIGSEGV)."""
    for digits in (20, 5_000):
        with pytest.raises(BadBody, match="element 2 is a number too large to read"):
            list(json_rows(iter([b'["a@x.example", ' + b"1" * digits + b"]"])))
    rows = list(json_rows(iter([b'["a@x.example", 7, 1.5]'])))
    assert [(r[0], r[1], r[3]) for r in rows[1:]] == [(2, "7", "not a string (JSON number)"),
                                                      (3, "1.5", "not a string (JSON number)")]


async def test_a_batch_whose_workflow_did_not_start_gives_its_idempotency_key_back(api_settings, dev_env, monkeypatch):
    """Temporal refuses the start (here: unavailable, a stand-in for an outage): the answer is a 503
    that says to retry, and a retry with the same Idempotency-Key stores the list anew. It used to
    replay the failed batch (200) for that key for good."""
    from temporalio.client import Client
    from temporalio.service import RPCError, RPCStatusCode

    from api.app import create_app

    auth = {**new_key(api_settings, "olga"), "Idempotency-Key": "nightly-import-7"}
    real_start = Client.start_workflow

    async def refused(*_args, **_kwargs):
        raise RPCError("server unavailable", RPCStatusCode.UNAVAILABLE, b"")

    app = create_app(api_settings.model_copy(update={
        "temporal_address": dev_env.client.service_client.config.target_host}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        monkeypatch.setattr(Client, "start_workflow", refused)
        first = await http.post("/v1/batches", headers=auth, json=["olga@one.example", "olga@two.example"])
        assert first.status_code == 503, first.text
        monkeypatch.setattr(Client, "start_workflow", real_start)
        again = await http.post("/v1/batches", headers=auth, json=["olga@one.example", "olga@two.example"])
        assert again.status_code == 201, again.text
        assert "retry (with the same Idempotency-Key" in first.json()["error"]
        replay = await http.post("/v1/batches", headers=auth, json=["olga@one.example", "olga@two.example"])
        assert (replay.status_code, replay.json()["id"]) == (200, again.json()["id"])
    with psycopg.connect(api_settings.database_url) as conn:
        rows = conn.execute("select state, idempotency_key from user_batches where user_id = 'olga' order by id").fetchall()
        failed = conn.execute("select count(*) from events where kind = 'user_batch.failed' and user_id = 'olga'"
                              ).fetchone()[0]
    assert rows[0] == ("failed", None) and rows[1][1] == "nightly-import-7" and len(rows) == 2
    assert failed == 1
    await dev_env.client.get_workflow_handle(again.json()["workflow_id"]).terminate("test done")

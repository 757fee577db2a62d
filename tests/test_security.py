"""Security: the API key stays secret, payloads can be encrypted, callbacks need their token,
and a user reaches only their own user batches through the CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trustme
from helpers import make_settings, running_pipeline, write_list
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from test_cli import assert_clean_error, assert_one_line, batch, cli  # noqa: F401 - `batch` is a fixture

import temporal_client
from bench.common import addresses_in_histories, payloads
from sandbox.process import running_sandbox
from settings import Settings
from worker import bouncer_client
from workflows.models import Summary, bouncer_batch_workflow_id, scheduler_id

ROOT = Path(__file__).resolve().parent.parent
KEY = f"sk-live-{uuid.uuid4().hex}"


def emails(tag: str, n: int) -> list[str]:
    return [f"{tag}.{i}@company{i % 3}.example" for i in range(n)]


# ---- the API key ---------------------------------------------------------------------------------


async def test_the_api_key_is_not_in_repr_or_str_of_settings_or_the_client():
    settings = Settings(_env_file=None, bouncer_api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings)
    assert KEY not in settings.model_dump_json()
    async with bouncer_client(settings) as client:
        assert KEY not in repr(client) and KEY not in str(client)


async def test_the_api_key_is_never_logged_nor_in_a_history_and_forged_or_replayed_callbacks_are_refused(
    dev_env, db_url, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    with running_sandbox(KEY, "--time-scale", "100", "--speed", "500") as sb:
        # A share of answers fail, so error paths (which log and record failures) run too.
        httpx.post(f"{sb.url}/_sandbox/faults", json={"error_5xx": 0.2, "rate_429": 0.2, "seed": 2})
        settings = make_settings(db_url, sb, batch_size=50)
        async with running_pipeline(dev_env.client, settings, callbacks_on=True) as p:
            handle = await p.submit_file(write_list(tmp_path / "k.csv", emails("key", 120)), "kim")
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
            assert summary.by_state == {"verified": 120}

            # The key in no history: not in any payload, failure message or detail of this run.
            for wid in [handle.id, scheduler_id("deliverability")] + [
                bouncer_batch_workflow_id("deliverability", bb) for (bb,) in p.sql("select id from bouncer_batches")
            ]:
                history = await dev_env.client.get_workflow_handle(wid).fetch_history()
                raw = b"".join(e.SerializeToString() for e in history.events)
                assert KEY.encode() not in raw, wid
            assert KEY not in caplog.text
            assert "Transient" in caplog.text  # the failures were logged (without the key)

            # Callbacks: a wrong token, an unknown batch, and a replay of a finished batch's real one.
            receiver = f"http://{p.settings.callback_listen}"
            async with httpx.AsyncClient(base_url=receiver) as http:
                for _ in range(50):  # the sandbox's own callbacks may still be in flight
                    before = (await http.get("/callbacks/stats")).json()
                    if httpx.get(f"{sb.url}/_sandbox/stats").json()["callbacks_sent"] >= 3:
                        break
                    await asyncio.sleep(0.1)
                (bb, token) = p.sql("select id, callback_token from bouncer_batches order by id limit 1")[0]
                forged = await http.post(f"/callbacks/bouncer/{bb}", params={"token": "guess"})
                unknown = await http.post("/callbacks/bouncer/999999", params={"token": token})
                replayed = await http.post(f"/callbacks/bouncer/{bb}", params={"token": token})
                after = (await http.get("/callbacks/stats")).json()
            assert (forged.status_code, unknown.status_code, replayed.status_code) == (403, 403, 409)
            assert after["refused"] - before["refused"] == 3
            assert after["accepted"] == before["accepted"]

            # A batch still at the API: a callback naming another batchId (the copy an ambiguous
            # create left behind) is refused as stale, so it cannot trigger an early download.
            p.sql("insert into bouncer_batches (lane, pack_key, state, size, provider_batch_id, callback_token)"
                  " values ('deliverability', 'test:stale', 'submitted', 1, 'tracked-id', 'tok') returning id")
            (stale_bb,) = p.sql("select id from bouncer_batches where pack_key = 'test:stale'")[0]
            async with httpx.AsyncClient(base_url=receiver) as http:
                stale = await http.post(f"/callbacks/bouncer/{stale_bb}", params={"token": "tok"},
                                        json={"batchId": "the-other-copy", "status": "completed"})
                counts = (await http.get("/callbacks/stats")).json()
            assert stale.status_code == 409 and counts["stale"] == 1 and counts["accepted"] == before["accepted"]


# ---- payload encryption -----------------------------------------------------------------------------


def _key() -> str:
    return temporal_client.new_key()


async def test_codec_encrypts_with_the_first_key_and_decrypts_with_any_listed_key():
    old, new = _key(), _key()
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"user_batch_id": 7}')
    sealed = await temporal_client.EncryptionCodec(temporal_client.parse_keys(f"k1:{old}")).encode([plain])
    assert sealed[0].metadata["encryption-key-id"] == b"k1" and b"user_batch_id" not in sealed[0].data
    rotated = temporal_client.EncryptionCodec(temporal_client.parse_keys(f"k2:{new},k1:{old}"))
    assert await rotated.decode(sealed) == [plain]
    assert (await rotated.encode([plain]))[0].metadata["encryption-key-id"] == b"k2"
    with pytest.raises(ValueError, match="key 'k1'"):
        await temporal_client.EncryptionCodec(temporal_client.parse_keys(f"k2:{new}")).decode(sealed)
    with pytest.raises(ValueError, match="32 bytes"):
        temporal_client.parse_keys("k:" + base64.b64encode(b"short").decode())


async def test_with_payload_encryption_on_a_run_completes_and_its_histories_hold_only_ciphertext(
    dev_env, db_url, sandbox, tmp_path
):
    settings = make_settings(db_url, sandbox, batch_size=40, payload_keys=f"current:{_key()}",
                             temporal_address=dev_env.client.service_client.config.target_host)
    client = await temporal_client.connect(settings)
    async with running_pipeline(client, settings) as p:
        rows = emails("enc", 100)
        handle = await p.submit_file(write_list(tmp_path / "e.csv", rows), "eve")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 100}
        ids = [handle.id, scheduler_id("deliverability")] + [
            bouncer_batch_workflow_id("deliverability", bb) for (bb,) in p.sql("select id from bouncer_batches")]
        seen = 0
        for wid in ids:
            history = await dev_env.client.get_workflow_handle(wid).fetch_history()
            for event in history.events:
                if event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
                    continue  # patch ids (`workflow.patched`): markers are written by the SDK core, unencoded
                # Search attributes are indexed by the server, so codecs never encode them (ids and states only).
                for payload in payloads(event, skip=("search_attributes",)):
                    seen += 1
                    assert payload.metadata["encoding"] == temporal_client.ENCODING, (wid, event)
            raw = b"".join(e.SerializeToString() for e in history.events)
            assert b"user_batch_id" not in raw and b"bouncer_batch_id" not in raw, wid
        assert seen > 10
        # A client without the key sees ciphertext it cannot decode (as the Web UI does without a codec server).
        with pytest.raises(Exception):  # noqa: B017 - the SDK's payload-conversion error type varies
            await dev_env.client.get_workflow_handle(handle.id, result_type=Summary).result()
        scan = await addresses_in_histories(client, {r.lower() for r in rows})
        assert scan["leaked"] == []


async def test_with_payload_encryption_on_the_http_api_submits_pauses_and_reads_lanes(
    dev_env, db_url, sandbox, tmp_path
):
    """The API process answers from queries and updates, whose results the workers encrypt: it
    needs the codec as well (before, a lane read or a pause through the API failed to decode)."""
    from test_api import api_process, new_key, wait_finished

    keys = f"current:{_key()}"
    address = dev_env.client.service_client.config.target_host
    settings = make_settings(db_url, sandbox, batch_size=40, payload_keys=keys, temporal_address=address)
    client = await temporal_client.connect(settings)
    admin, user = new_key(settings, "ops", admin=True), new_key(settings, "eve")
    async with running_pipeline(client, settings):
        with api_process(settings, address, PAYLOAD_KEYS=keys) as url:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                paused = await http.post("/v1/lanes/deliverability/pause", headers=admin)  # signal, then query
                assert paused.status_code == 200 and paused.json()["paused"] is True, paused.text
                sub = await http.post("/v1/batches", headers=user, json=emails("api", 60))
                assert sub.status_code == 201, sub.text
                batch_url = f"/v1/batches/{sub.json()['id']}"
                held = await http.post(f"{batch_url}/pause", headers=user)  # an update
                assert held.status_code == 200 and held.json()["state"] == "paused", held.text
                assert (await http.post(f"{batch_url}/resume", headers=user)).status_code == 200
                lanes = (await http.get("/v1/lanes", headers=admin)).json()["lanes"]
                assert [d["paused"] for d in lanes if d["lane"] == "deliverability"] == [True]
                assert (await http.post("/v1/lanes/deliverability/resume", headers=admin)).json()["paused"] is False
                done = await wait_finished(http, batch_url, user, timeout=60)
                assert done["summary"]["by_state"] == {"verified": 60}
        # The run ends (the list reads completed a little before): the next test's user-batch-1 must not collide.
        handle = client.get_workflow_handle(sub.json()["workflow_id"], result_type=Summary)
        assert (await asyncio.wait_for(handle.result(), timeout=30)).by_state == {"verified": 60}
        # What the API started is ciphertext in Temporal too.
        history = await handle.fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        assert [p.metadata["encoding"] for p in started.input.payloads] == [temporal_client.ENCODING]


# ---- TLS toward Temporal (Temporal Cloud, or a self-hosted frontend behind TLS) ---------------------


def _pki(root: Path) -> dict[str, Path]:
    """A CA (trustme), a server certificate for 127.0.0.1 and a client certificate, as PEM files in `root`."""
    ca = trustme.CA()
    server, client = ca.issue_cert("127.0.0.1", "localhost"), ca.issue_cert("worker@example.com", common_name="worker")
    pems = {"ca": ca.cert_pem, "server": server.cert_chain_pems[0], "server_key": server.private_key_pem,
            "client": client.cert_chain_pems[0], "client_key": client.private_key_pem}
    for name, pem in pems.items():
        pem.write_to_path(str(root / f"{name}.pem"))
    return {name: root / f"{name}.pem" for name in pems}


@contextlib.asynccontextmanager
async def tls_frontend(upstream: str, pki: dict[str, Path]) -> AsyncIterator[tuple[str, list[str]]]:
    """A TLS front for the dev server that requires a client certificate signed by the test CA (as
    Temporal Cloud's mTLS does). Yields its address and the client certificates' names it saw."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"], pki["server_key"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])  # gRPC
    host, _, port = upstream.rpartition(":")
    clients: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        clients.append(dict(x[0] for x in peer.get("subject", ())).get("commonName", ""))
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", clients
    finally:
        server.close()


async def test_over_mutual_tls_a_run_completes_and_without_the_certificate_or_the_ca_temporal_is_refused(
    dev_env, db_url, sandbox, tmp_path
):
    pki = _pki(tmp_path)
    async with tls_frontend(dev_env.client.service_client.config.target_host, pki) as (address, clients):
        settings = make_settings(db_url, sandbox, batch_size=40, temporal_address=address,
                                 temporal_tls_ca_file=str(pki["ca"]), temporal_tls_cert_file=str(pki["client"]),
                                 temporal_tls_key_file=str(pki["client_key"]))
        client = await temporal_client.connect(settings)
        async with running_pipeline(client, settings) as p:
            handle = await p.submit_file(write_list(tmp_path / "t.csv", emails("tls", 50)), "tia")
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
            assert summary.by_state == {"verified": 50}
        assert clients and set(clients) == {"worker"}  # every connection came through the TLS front
        keyed = await temporal_client.connect(settings.model_copy(update={"temporal_api_key": SecretStr("tk-1")}))
        assert keyed.api_key == "tk-1"  # sent as `authorization: Bearer tk-1` (the dev server ignores it)
        assert temporal_client.tls_config(Settings(_env_file=None, temporal_api_key="tk-1")) is True  # TLS on by itself
        assert temporal_client.tls_config(Settings(_env_file=None)) is False
        for missing in ({"temporal_tls_cert_file": "", "temporal_tls_key_file": ""},  # no client certificate
                        {"temporal_tls_ca_file": ""}):  # the server's CA not trusted (the system's roots)
            with pytest.raises(RuntimeError):
                await temporal_client.connect(settings.model_copy(update=missing),
                                              connect_timeout=datetime.timedelta(seconds=5))
        # The CLI says which settings to check (not "is the stack up?"). In a thread: it runs its own loop.
        run = await asyncio.to_thread(cli, db_url, "status", TEMPORAL_ADDRESS=address, TEMPORAL_TLS="true")
        assert_clean_error(run, 1, f"cannot reach Temporal at {address}", "UnknownIssuer", "TEMPORAL_TLS_CA_FILE")


def test_a_wrong_tls_setting_is_named_by_the_cli_and_the_worker(db_url, batch, tmp_path):  # noqa: F811
    run = cli(db_url, "pause", str(batch), "--user", "ann", TEMPORAL_TLS_CERT_FILE=str(tmp_path / "nope.pem"),
              TEMPORAL_TLS_KEY_FILE=str(tmp_path / "nope.pem"))
    assert_clean_error(run, 2, "TEMPORAL_TLS_CERT_FILE: cannot read", "nope.pem")
    (tmp_path / "cert.pem").write_text("")
    run = cli(db_url, "pause", str(batch), "--user", "ann", TEMPORAL_TLS_CERT_FILE=str(tmp_path / "cert.pem"))
    assert_clean_error(run, 2, "TEMPORAL_TLS_CERT_FILE and TEMPORAL_TLS_KEY_FILE go together")
    worker = subprocess.run([sys.executable, "worker.py"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DATABASE_URL": db_url, "TEMPORAL_TLS_CA_FILE": "/nonexistent/ca.pem",
                                 "METRICS_LISTEN": ""})
    assert worker.returncode == 1 and "Traceback" not in worker.stderr, worker.stderr
    assert "worker: TEMPORAL_TLS_CA_FILE: cannot read /nonexistent/ca.pem" in worker.stderr


# ---- --user scoping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["status"], ["results"], ["pause"], ["resume"], ["cancel"],
                                     ["dlq", "list", "--user-batch"], ["dlq", "retry", "--user-batch"]])
def test_a_user_cannot_read_or_control_another_users_batch(db_url, batch, command):  # noqa: F811
    run = cli(db_url, *command, str(batch), "--user", "mallory")
    assert_clean_error(run, 2, f"no user batch {batch} for user mallory")
    assert_one_line(run)
    own = cli(db_url, *command, str(batch), "--user", "ann")
    if command[0] in ("status", "results") or command[:2] == ["dlq", "list"]:
        assert own.code == 0, own  # the owner reads it (control commands need Temporal: not here)


async def test_the_codec_server_decodes_what_the_codec_encoded_for_the_web_ui():
    import codec_server
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    codec = temporal_client.EncryptionCodec(temporal_client.parse_keys(f"k1:{_key()}"))
    app = codec_server.create_app(codec, ["http://127.0.0.1:8233"])
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'{"user_batch_id": 7}')
    body = json_format.MessageToJson(Payloads(payloads=await codec.encode([plain])))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://codec") as http:
        decoded = await http.post("/decode", content=body, headers={"origin": "http://127.0.0.1:8233"})
        assert decoded.status_code == 200
        assert decoded.headers["access-control-allow-origin"] == "http://127.0.0.1:8233"
        assert list(json_format.Parse(decoded.text, Payloads()).payloads) == [plain]
        encoded = await http.post("/encode", content=json_format.MessageToJson(Payloads(payloads=[plain])))
        sealed = json_format.Parse(encoded.text, Payloads()).payloads[0]
        assert sealed.metadata["encoding"] == temporal_client.ENCODING
        wrong = temporal_client.EncryptionCodec(temporal_client.parse_keys(f"k9:{_key()}"))
        refused = await http.post("/decode", content=json_format.MessageToJson(
            Payloads(payloads=await wrong.encode([plain]))))
        assert refused.status_code == 400 and "k9" in refused.json()["error"]

"""The sandbox, over real HTTP: `python -m sandbox` in a child process on 127.0.0.1."""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from sandbox import account as account_module
from sandbox.account import Account
from sandbox.app import TICK_SECONDS, Sandbox, SandboxConfig
from sandbox.process import RunningSandbox, running_sandbox, start_sandbox, stop_sandbox
from sandbox.verdicts import STATUSES, unverified, verdict

KEY = "test-key-sandbox"
BATCH = "/v1.1/email/verify/batch"
SANDBOX_ADDRESSES = {
    "deliverable@sandbox.usebouncer.com": "deliverable",
    "deliverable+7@sandbox.usebouncer.com": "deliverable",
    "risky@sandbox.usebouncer.com": "risky",
    "undeliverable+x@sandbox.usebouncer.com": "undeliverable",
    "unknown@sandbox.usebouncer.com": "unknown",
}


@pytest.fixture(scope="module")
def fast() -> Iterator[RunningSandbox]:
    """10,000 addresses per second per batch; documented limits, 100x shorter windows."""
    with running_sandbox(KEY, "--time-scale", "100", "--speed", "100") as sb:
        yield sb


@pytest.fixture
def api(fast: RunningSandbox) -> Iterator[httpx.Client]:
    """A client on a freshly reset `fast` sandbox."""
    with httpx.Client(base_url=fast.url, headers={"x-api-key": KEY}, timeout=10) as client:
        client.post("/_sandbox/reset").raise_for_status()
        yield client


def wait_completed(api: httpx.Client, batch_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = api.get(f"{BATCH}/{batch_id}", params={"with-stats": "true"}).json()
        if body["status"] == "completed" or time.monotonic() > deadline:
            return body
        time.sleep(0.02)


def create(api: httpx.Client, entries: list[dict[str, Any]], **params: str) -> httpx.Response:
    return api.post(BATCH, json=entries, params=params)


def test_round_trip_create_status_download_carries_names(api: httpx.Client) -> None:
    emails = [*SANDBOX_ADDRESSES, "john.smith@example.org", "not-an-address"]
    entries = [{"email": e, "name": f"id-{i}"} for i, e in enumerate(emails)]
    created = create(api, entries)
    assert created.status_code == 200
    body = created.json()
    assert body["status"] == "queued" and body["quantity"] == len(emails) and body["duplicates"] == 0
    datetime.fromisoformat(body["created"].replace("Z", "+00:00"))

    status = wait_completed(api, body["batchId"])
    assert status["status"] == "completed"
    assert status["processed"] == len(emails) and status["credits"] == len(emails)
    assert status["started"] and status["completed"]
    assert sum(status["stats"].values()) == len(emails)

    records = api.get(f"{BATCH}/{body['batchId']}/download", params={"download": "all"}).json()
    assert records == [{"name": f"id-{i}", **verdict(e)} for i, e in enumerate(emails)]
    for record in records:
        if record["email"] in SANDBOX_ADDRESSES:
            assert record["status"] == SANDBOX_ADDRESSES[record["email"]]
    assert status["stats"] == {s: sum(r["status"] == s for r in records) for s in STATUSES}

    risky = api.get(f"{BATCH}/{body['batchId']}/download", params={"download": "risky"}).json()
    assert [r["email"] for r in risky] == [r["email"] for r in records if r["status"] == "risky"]
    csv_text = api.get(f"{BATCH}/{body['batchId']}/download", headers={"accept": "text/csv"}).text
    assert csv_text.splitlines()[0] == "email,name,status,reason,score"
    assert csv_text.splitlines()[1].startswith("deliverable@sandbox.usebouncer.com,id-0,deliverable,")


def test_status_without_stats_has_no_processed_and_credits_only_when_completed(api: httpx.Client) -> None:
    big = [{"email": f"u{i}@example.com"} for i in range(30_000)]  # 3 s at 10k/s
    batch_id = create(api, big).json()["batchId"]
    body = api.get(f"{BATCH}/{batch_id}").json()
    assert body["status"] in ("queued", "processing")
    assert "processed" not in body and "stats" not in body and "credits" not in body
    assert api.delete(f"{BATCH}/{batch_id}").status_code == 200


def test_duplicates_are_counted_and_charged_once(api: httpx.Client) -> None:
    before = api.get("/v1.1/credits").json()["credits"]
    entries = [
        {"email": "a@example.com", "name": "1"},
        {"email": " A@Example.com", "name": "2"},
        {"email": "b@example.com"},
    ]
    body = create(api, entries).json()
    assert (body["quantity"], body["duplicates"]) == (3, 1)
    assert api.get("/v1.1/credits").json()["credits"] == before - 2
    wait_completed(api, body["batchId"])
    records = api.get(f"{BATCH}/{body['batchId']}/download").json()
    assert [(r["email"], r.get("name")) for r in records] == [("a@example.com", "1"), ("b@example.com", None)]


def test_a_3000_address_batch_is_counted_charged_and_answered_in_order(api: httpx.Client) -> None:
    before = api.get("/v1.1/credits").json()["credits"]
    entries = [{"email": f"user{i}@example.com", "name": str(i)} for i in range(3000)]
    entries += [{"email": "USER7@example.com", "name": "dup"}, {"email": "user8@example.com"}]
    body = create(api, entries).json()
    assert (body["quantity"], body["duplicates"]) == (3002, 2)
    assert api.get("/v1.1/credits").json()["credits"] == before - 3000
    wait_completed(api, body["batchId"])
    records = api.get(f"{BATCH}/{body['batchId']}/download").json()
    assert [r["name"] for r in records] == [str(i) for i in range(3000)]
    bad = create(api, [*entries[:2999], {"name": "no email"}])
    assert bad.status_code == 400 and "entry 2999" in bad.json()["message"]


def test_text_plain_body_is_one_address_per_line(api: httpx.Client) -> None:
    response = api.post(BATCH, content="x@example.com\n\ny@example.com\n", headers={"content-type": "text/plain"})
    assert response.status_code == 200 and response.json()["quantity"] == 2


@pytest.mark.parametrize(
    "body",
    [
        b'["bare@example.com"]',
        b'{"email": "x@example.com"}',
        b"[]",
        b"[{\"name\": \"no email\"}]",
        b"not json",
        json.dumps([{"email": f"u{i}@example.com"} for i in range(100_001)]).encode(),
    ],
    ids=["bare-string", "object", "empty", "no-email", "malformed", "over-100k"],
)
def test_bad_creation_bodies_are_400_with_json_error(api: httpx.Client, body: bytes) -> None:
    response = api.post(BATCH, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()) == {"status", "error", "message"}


def test_402_when_credits_do_not_cover_the_unique_addresses(api: httpx.Client) -> None:
    api.post("/_sandbox/credits", json={"credits": 2}).raise_for_status()
    response = create(api, [{"email": f"u{i}@example.com"} for i in range(3)])
    assert response.status_code == 402
    assert response.json() == {"status": "402", "error": "Payment Required", "message": "2 credits left"}
    # Duplicates are not charged, so two unique addresses still fit.
    ok = create(api, [{"email": "u@example.com"}, {"email": "u@example.com"}, {"email": "v@example.com"}])
    assert ok.status_code == 200
    assert api.get("/v1.1/credits").json() == {"credits": 0}


def test_missing_or_wrong_key_is_401_everywhere(fast: RunningSandbox) -> None:
    with httpx.Client(base_url=fast.url, headers={"x-api-key": "wrong"}) as client:
        calls = [("GET", "/v1.1/credits"), ("POST", BATCH), ("GET", f"{BATCH}/x"), ("DELETE", f"{BATCH}/x")]
        for method, path in calls:
            response = client.request(method, path)
            assert response.status_code == 401 and response.json()["error"] == "Unauthorized"
    assert httpx.get(fast.url + "/v1.1/credits").status_code == 401


def test_unknown_batch_404_and_delete_makes_it_404(api: httpx.Client) -> None:
    assert api.get(f"{BATCH}/nope").status_code == 404
    assert api.post(f"{BATCH}/nope/finish").status_code == 404
    batch_id = create(api, [{"email": "a@example.com"}]).json()["batchId"]
    deleted = api.delete(f"{BATCH}/{batch_id}")
    assert deleted.status_code == 200 and deleted.content == b""
    assert api.get(f"{BATCH}/{batch_id}").status_code == 404
    assert api.get(f"{BATCH}/{batch_id}/download").status_code == 404
    assert api.get("/_sandbox/stats").json()["batches"]["deleted"] == 1


def test_download_before_completion_is_400_and_finish_marks_the_rest_unknown(api: httpx.Client) -> None:
    emails = [f"u{i}@example.com" for i in range(30_000)]
    batch_id = create(api, [{"email": e, "name": str(i)} for i, e in enumerate(emails)]).json()["batchId"]
    early = api.get(f"{BATCH}/{batch_id}/download")
    assert early.status_code == 400 and early.json()["message"] == "batch not completed"

    finished = api.post(f"{BATCH}/{batch_id}/finish")
    assert finished.status_code == 202 and finished.content == b""
    status = api.get(f"{BATCH}/{batch_id}", params={"with-stats": "true"}).json()
    assert status["status"] == "completed" and status["credits"] == 30_000
    records = api.get(f"{BATCH}/{batch_id}/download").json()
    assert len(records) == 30_000
    verified = [r == {"name": str(i), **verdict(emails[i])} for i, r in enumerate(records)]
    cut = verified.index(False)
    assert cut < 30_000 - 1000 and not any(verified[cut:])  # finished early; a prefix was verified
    assert all(r == {"name": str(i + cut), **unverified(emails[i + cut])} for i, r in enumerate(records[cut:]))
    assert status["stats"]["unknown"] >= 30_000 - cut


def test_same_address_gets_the_same_record_in_every_batch(api: httpx.Client) -> None:
    emails = ["same@example.net", "other@example.net", "deliverable@sandbox.usebouncer.com"]
    first = create(api, [{"email": e} for e in emails]).json()["batchId"]
    second = create(api, [{"email": e} for e in reversed(emails)]).json()["batchId"]
    for batch_id in (first, second):
        wait_completed(api, batch_id)
    one = {r["email"]: r for r in api.get(f"{BATCH}/{first}/download").json()}
    two = {r["email"]: r for r in api.get(f"{BATCH}/{second}/download").json()}
    assert one == two == {e: verdict(e) for e in emails}
    assert api.get("/_sandbox/stats").json()["addresses_sent_twice"] == 3


def test_verdicts_are_pure_and_realistically_mixed() -> None:
    for email, status in SANDBOX_ADDRESSES.items():
        assert verdict(email)["status"] == status
    assert verdict("risky@sandbox.usebouncer.com")["domain"]["acceptAll"] == "yes"
    assert verdict("Someone@Example.org") == {**verdict("someone@example.org"), "email": "Someone@Example.org"}
    assert verdict("no-at-sign")["reason"] == "invalid_email"

    domains = [f"company{i}.example" for i in range(2000)]
    records = [verdict(f"person{i}@{domains[i % len(domains)]}") for i in range(40_000)]
    share = {s: n / len(records) for s, n in collections.Counter(r["status"] for r in records).items()}
    assert 0.64 < share["deliverable"] < 0.76 and 0.08 < share["risky"] < 0.16
    assert 0.08 < share["undeliverable"] < 0.16 and 0.03 < share["unknown"] < 0.09
    accept_all = {r["domain"]["name"] for r in records if r["domain"]["acceptAll"] == "yes"}
    assert 0.03 < len(accept_all) / len(domains) < 0.07
    # Accept-all is a property of the domain: every address there is risky/low_deliverability.
    assert all(
        (r["status"], r["reason"]) == ("risky", "low_deliverability")
        for r in records
        if r["domain"]["name"] in accept_all
    )
    reasons = {
        "deliverable": {"accepted_email"},
        "risky": {"low_deliverability", "low_quality"},
        "undeliverable": {"invalid_email", "invalid_domain", "rejected_email"},
        "unknown": {"dns_error", "unavailable_smtp", "unsupported", "timeout", "unknown"},
    }
    assert all(r["reason"] in reasons[r["status"]] for r in records)
    assert all(0 <= r["score"] <= 100 and 0 <= r["toxicity"] <= 5 for r in records)


def test_stats_read_back_counts_requests_addresses_and_batches(api: httpx.Client) -> None:
    first = create(api, [{"email": "a@example.com"}, {"email": "a@example.com"}, {"email": "b@example.com"}]).json()
    second = create(api, [{"email": "b@example.com"}, {"email": "c@example.com"}]).json()
    create(api, [])  # 400, not accepted
    wait_completed(api, first["batchId"])
    wait_completed(api, second["batchId"])
    api.get(f"{BATCH}/{first['batchId']}/download")
    api.post(f"{BATCH}/{first['batchId']}/finish")
    api.delete(f"{BATCH}/{second['batchId']}")
    api.get("/v1.1/credits")
    stats = api.get("/_sandbox/stats").json()
    requests = stats.pop("requests")
    assert stats.pop("max_processing_seen") in (1, 2)
    assert requests["create"] == {"200": 2, "400": 1}
    assert requests["download"] == {"200": 1}
    assert requests["finish"] == {"202": 1} and requests["delete"] == {"200": 1}
    assert requests["credits"] == {"200": 1} and sum(requests["status"].values()) >= 2
    assert stats == {
        "batches_created": 2,
        "batches": {"queued": 0, "processing": 0, "completed": 1, "deleted": 1},
        "addresses_received": 5,
        "unique_addresses_received": 3,
        "addresses_sent_twice": 1,
        "addresses_sent_after_result": 0,  # b was sent again before any download
        "credits": 1_000_000 - 4,
        "credits_charged": 4,
        "callbacks_sent": 0,
        "callbacks_failed": 0,
    }
    listed = api.get("/_sandbox/batches").json()
    assert [b["batchId"] for b in listed] == [first["batchId"], second["batchId"]]
    assert [b["status"] for b in listed] == ["completed", "deleted"]
    assert set(listed[0]) >= {"batchId", "status", "quantity", "created", "started", "completed", "callback"}


def test_an_address_sent_again_after_its_record_was_downloaded_is_counted(api: httpx.Client) -> None:
    first = create(api, [{"email": "x@example.com"}, {"email": "y@example.com"}]).json()
    wait_completed(api, first["batchId"])
    create(api, [{"email": "y@example.com"}])  # again, but before any download: not counted
    api.get(f"{BATCH}/{first['batchId']}/download")
    create(api, [{"email": "x@example.com"}, {"email": "z@example.com"}])
    stats = api.get("/_sandbox/stats").json()
    assert stats["addresses_sent_twice"] == 2 and stats["addresses_sent_after_result"] == 1


class _CallbackReceiver(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    arrived = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()
        type(self).arrived.set()

    def log_message(self, *args: Any) -> None:
        pass


def test_completion_is_posted_to_the_callback_url(api: httpx.Client) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CallbackReceiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/bouncer?token=abc"
        body = create(api, [{"email": "a@example.com"}, {"email": "b@example.com"}], callback=url).json()
        assert _CallbackReceiver.arrived.wait(timeout=5)
        assert _CallbackReceiver.received == [{"batchId": body["batchId"], "status": "completed", "quantity": 2}]
        deadline = time.monotonic() + 2  # the receiver may see it before the sandbox sees the 204
        while api.get("/_sandbox/stats").json()["callbacks_sent"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.get("/_sandbox/stats").json()["callbacks_sent"] == 1
        assert api.get("/_sandbox/batches").json()[0]["callback"] is True
    finally:
        server.shutdown()
        server.server_close()


def test_at_most_max_processing_batches_run_the_rest_wait_in_order() -> None:
    # 200 addresses at 10/s x20 = 1 s per batch; windows 3 s, so 30 creations pass.
    with running_sandbox(KEY, "--time-scale", "20", "--speed", "10", "--max-processing", "25") as sb:
        with httpx.Client(base_url=sb.url, headers={"x-api-key": KEY}) as api:
            ids = [
                create(api, [{"email": f"b{b}-{i}@example.com"} for i in range(200)]).json()["batchId"]
                for b in range(30)
            ]
            listed = api.get("/_sandbox/batches").json()
            assert [b["batchId"] for b in listed] == ids
            assert [b["status"] for b in listed] == ["processing"] * 25 + ["queued"] * 5
            status = api.get(f"{BATCH}/{ids[-1]}").json()
            assert status["status"] == "queued" and status["started"] is None

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = api.get("/_sandbox/batches").json()
                if all(b["status"] == "completed" for b in listed):
                    break
                time.sleep(0.05)
            assert all(b["status"] == "completed" for b in listed)
            stats = api.get("/_sandbox/stats").json()
            assert stats["max_processing_seen"] == 25
            first_done = min(b["completed"] for b in listed[:25])
            # FIFO: the queued five start only as slots free, in creation order.
            late_starts = [b["started"] for b in listed[25:]]
            assert late_starts == sorted(late_starts) and late_starts[0] >= first_done


def test_rate_limits_answer_429_with_retry_after_and_refusals_do_not_count() -> None:
    # time-scale 60: the 60 s windows last 1 s.
    args = ("--time-scale", "60", "--requests-per-minute", "5", "--create-per-minute", "2", "--speed", "0")
    with running_sandbox(KEY, *args) as sb:
        with httpx.Client(base_url=sb.url, headers={"x-api-key": KEY}) as api:
            assert [api.get("/v1.1/credits").status_code for _ in range(5)] == [200] * 5
            limited = api.get("/v1.1/credits")
            assert limited.status_code == 429
            assert limited.json()["status"] == 429 and limited.json()["error"] == "Too Many Requests"
            retry_after = float(limited.headers["retry-after"])
            assert 0 < retry_after <= 1.0

            # Creations have their own window: not affected by the other one being full.
            codes = [create(api, [{"email": f"c{i}@example.com"}]).status_code for i in range(3)]
            assert codes == [200, 200, 429]

            time.sleep(retry_after + 0.05)
            assert api.get("/v1.1/credits").status_code == 200
            stats = api.get("/_sandbox/stats").json()
            assert stats["requests"]["credits"] == {"200": 6, "429": 1}
            assert stats["batches_created"] == 2


def test_faults_inject_503_and_dropped_connections_reproducibly(api: httpx.Client) -> None:
    try:
        config = api.post("/_sandbox/faults", json={"error_5xx": 0.5, "seed": 7}).json()
        assert config["error_5xx"] == 0.5 and config["drop"] == 0.0
        first = [api.get("/v1.1/credits").status_code for _ in range(20)]
        api.post("/_sandbox/faults", json={"error_5xx": 0.5, "seed": 7})
        assert [api.get("/v1.1/credits").status_code for _ in range(20)] == first
        assert set(first) == {200, 503}

        api.post("/_sandbox/faults", json={"drop": 1.0})
        with pytest.raises(httpx.RemoteProtocolError):
            api.get("/v1.1/credits")
        assert api.post("/_sandbox/faults", json={"drop": 2}).status_code == 400
    finally:
        api.post("/_sandbox/faults", json={})
    assert api.get("/_sandbox/stats").json()["requests"]["credits"]["dropped"] == 1
    assert api.get("/v1.1/credits").status_code == 200


def test_a_5xx_fault_before_handling_makes_nothing_and_after_handling_answers_for_a_batch_it_made(
    api: httpx.Client,
) -> None:
    entries = [{"email": "deliverable@sandbox.usebouncer.com", "name": "1"}]
    try:
        api.post("/_sandbox/faults", json={"error_5xx": 1.0, "error_5xx_status": 502}).raise_for_status()
        before = create(api, entries)
        assert before.status_code == 502 and api.get("/_sandbox/stats").json()["batches_created"] == 0
        api.post("/_sandbox/faults", json={"error_5xx": 1.0, "error_5xx_status": 504, "error_5xx_when": "after"})
        after = create(api, entries)
        assert after.status_code == 504 and "batchId" not in after.json()
        stats = api.get("/_sandbox/stats").json()
        assert stats["batches_created"] == 1 and stats["credits_charged"] == 1  # made and charged
        assert stats["requests"]["create"] == {"502": 1, "504": 1}
        for bad in ({"error_5xx_status": 429}, {"error_5xx_status": "502"}, {"error_5xx_when": "later"}):
            assert api.post("/_sandbox/faults", json=bad).status_code == 400
    finally:
        api.post("/_sandbox/faults", json={})


def test_state_file_keeps_batches_across_a_graceful_restart(tmp_path: Any) -> None:
    state = str(tmp_path / "sandbox.state")
    sb = start_sandbox(KEY, "--state-file", state, "--speed", "0", "--no-limits")
    try:
        with httpx.Client(base_url=sb.url, headers={"x-api-key": KEY}) as api:
            batch_id = create(api, [{"email": "a@example.com", "name": "n"}]).json()["batchId"]
            wait_completed(api, batch_id)
    finally:
        stop_sandbox(sb.process)
    with running_sandbox(KEY, "--state-file", state, "--no-limits") as again:
        with httpx.Client(base_url=again.url, headers={"x-api-key": KEY}) as api:
            records = api.get(f"{BATCH}/{batch_id}/download").json()
            assert records == [{"name": "n", **verdict("a@example.com")}]
            assert api.get("/v1.1/credits").json()["credits"] == 1_000_000 - 1


def test_records_and_stats_do_not_depend_on_kept_or_forgotten_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    # The account keeps each batch's decisions from its status poll to its download; with room
    # for only 250, polls of other batches push them out. Answers must not change either way.
    monkeypatch.setattr(account_module, "DECISIONS_KEPT", 250)
    account = Account(credits=1_000_000, speed=50.0, time_scale=1.0, max_processing=None)
    lists = []
    for b in range(6):
        entries: list[dict[str, Any]] = [{"email": f"p{b}.{i}@company{i % 7}.example", "name": str(i)} for i in range(150)]
        entries += [{"email": f"P{b}.0@company0.example", "name": "dup"}, {"email": f"bare{b}@example.org"},
                    {"email": f"x{b}@example.org", "status": "mine", "name": {"id": b}}]
        lists.append(entries)
    batches = [account.create(entries, None, now=0.0) for entries in lists]
    for t in (0.5, 1.0, 1.7):  # partial tallies while processing (50 addresses/s)
        account.advance(t)
        for batch in batches[::2]:
            account.stats_of(batch, t)
    account.finish(batches[1], 1.7)
    account.advance(10.0)
    for batch, entries in zip(batches, lists):
        stats = account.stats_of(batch, 10.0)
        records = account.records(batch)
        unique = [e for e in entries if e.get("name") != "dup"]
        verified = batch.verified
        expected = [{**e, **(verdict(e["email"]) if i < verified else unverified(e["email"]))}
                    for i, e in enumerate(unique)]
        assert records == expected and [list(r) for r in records] == [list(r) for r in expected]
        assert stats == {s: sum(r["status"] == s for r in expected) for s in STATUSES}
        account.mark_delivered(batch)
    assert batches[1].verified < len(batches[1].entries)  # the early finish left some unverified
    assert account._decisions_kept == 0


def test_the_ticker_wakes_at_the_next_completion_not_a_tick_later() -> None:
    sb = Sandbox(SandboxConfig(api_key=KEY, speed=100.0, time_scale=20.0))  # 2,000 addresses/s
    assert sb.until_next_tick() == TICK_SECONDS  # nothing processing: the regular tick
    now = sb.clock.now()
    batch = sb.account.create([{"email": f"t{i}@example.com"} for i in range(20)], None, now)
    assert batch.due == pytest.approx(now + 0.01)  # 20 addresses at 2,000/s
    wait = sb.until_next_tick()
    assert 0.0 < wait <= batch.due - now < TICK_SECONDS  # wakes for the completion itself
    sb.account.advance(batch.due)
    assert batch.status == "completed" and sb.until_next_tick() == TICK_SECONDS

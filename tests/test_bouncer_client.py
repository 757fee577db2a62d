"""BouncerClient against the sandbox over real HTTP, and its pacing primitives."""

from __future__ import annotations

import asyncio
import pickle
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest

from bouncer import (
    BadRequest,
    BatchStatus,
    BouncerClient,
    BouncerError,
    CreatedBatch,
    Forbidden,
    NotFound,
    OutOfCredits,
    RateGate,
    RateLimited,
    TokenBucket,
    Transient,
    Unauthorized,
)
from bouncer.client import MAX_RETRY_AFTER_S, error_from_response, parse_retry_after
from sandbox.process import RunningSandbox, running_sandbox
from sandbox.verdicts import verdict

KEY = "sk-live-do-not-leak-7f3a9c"
UNLIMITED = {"create_per_minute": float("inf"), "requests_per_minute": float("inf")}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with running_sandbox(KEY, "--time-scale", "100", "--speed", "100") as sb:
        yield sb


@pytest.fixture
def admin(sandbox: RunningSandbox) -> Iterator[httpx.Client]:
    """Admin access to a freshly reset sandbox; faults are cleared again afterwards."""
    with httpx.Client(base_url=sandbox.url) as client:
        client.post("/_sandbox/reset").raise_for_status()
        yield client
        client.post("/_sandbox/faults", json={}).raise_for_status()


def client_for(sandbox: RunningSandbox, **kwargs: object) -> BouncerClient:
    return BouncerClient(sandbox.url, KEY, **{**UNLIMITED, **kwargs})  # type: ignore[arg-type]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def completed(client: BouncerClient, batch_id: str) -> BatchStatus:
    deadline = time.monotonic() + 5
    while True:
        status = await client.get_status(batch_id)
        if status.is_completed or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_round_trip_create_poll_download_finish_delete(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    entries = [(f"person{i}@example.com", str(1000 + i)) for i in range(10_000)]
    entries[0] = ("risky@sandbox.usebouncer.com", "42")
    async with client_for(sandbox) as client:
        before = await client.credits()
        created = await client.create_batch(entries)
        assert isinstance(created, CreatedBatch)
        assert (created.status, created.quantity, created.duplicates) == ("queued", 10_000, 0)
        assert created.created is not None and created.created.tzinfo is not None
        assert await client.credits() == before - 10_000

        status = await completed(client, created.batch_id)
        assert status.is_completed and status.processed == 10_000 and status.credits == 10_000
        assert status.stats is not None and sum(status.stats.values()) == 10_000
        assert status.started is not None and status.completed is not None

        records = await client.download(created.batch_id)
        assert records == [{"name": name, **verdict(email)} for email, name in entries]
        risky = await client.download(created.batch_id, which="risky")
        assert {"email": "risky@sandbox.usebouncer.com", "name": "42"}.items() <= risky[0].items()
        assert (await client.download_raw(created.batch_id)).startswith(b'[{"email":"risky@sandbox')

        plain = await client.get_status(created.batch_id, with_stats=False)
        assert plain.processed is None and plain.stats is None

        await client.finish(created.batch_id)  # already completed: still 202
        await client.delete(created.batch_id)
        with pytest.raises(NotFound):
            await client.get_status(created.batch_id)


@pytest.mark.asyncio
async def test_wrong_key_is_unauthorized_and_no_key_leaks(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    async with BouncerClient(sandbox.url, KEY + "-wrong") as client:
        with pytest.raises(Unauthorized) as caught:
            await client.credits()
    error = caught.value
    assert error.status == 401 and not isinstance(error, Forbidden)
    for text in (str(error), repr(error), error.message):
        assert KEY not in text
    client = BouncerClient(sandbox.url, KEY)
    assert repr(client) == f"BouncerClient(base_url={sandbox.url!r})"
    assert KEY not in repr(client) and KEY not in str(client)
    await client.aclose()


@pytest.mark.asyncio
async def test_out_of_credits_reports_credits_left(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    admin.post("/_sandbox/credits", json={"credits": 13}).raise_for_status()
    async with client_for(sandbox) as client:
        with pytest.raises(OutOfCredits) as caught:
            await client.create_batch([(f"u{i}@example.com", str(i)) for i in range(14)])
        assert caught.value.status == 402 and caught.value.credits_left == 13
        assert await client.credits() == 13


@pytest.mark.asyncio
async def test_bad_requests_and_not_found(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    async with client_for(sandbox) as client:
        with pytest.raises(BadRequest) as too_many:
            await client.create_batch([(f"u{i}@example.com", str(i)) for i in range(100_001)])
        assert too_many.value.status == 400 and "too many" in too_many.value.message

        created = await client.create_batch([(f"u{i}@example.com", str(i)) for i in range(30_000)])
        with pytest.raises(BadRequest, match="not completed"):
            await client.download(created.batch_id)
        await client.delete(created.batch_id)

        with pytest.raises(NotFound) as missing:
            await client.get_status("no-such-batch")
        assert missing.value.status == 404
        with pytest.raises(ValueError):
            await client.download("x", which="everything")


@pytest.mark.asyncio
async def test_rate_limited_carries_retry_after_seconds() -> None:
    # Windows of 1 s (time-scale 60); the client's own pacing is off to provoke the server.
    with running_sandbox(KEY, "--time-scale", "60", "--requests-per-minute", "3") as sb:
        async with client_for(sb) as client:
            for _ in range(3):
                await client.credits()
            with pytest.raises(RateLimited) as caught:
                await client.credits()
    assert caught.value.status == 429
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 1.0


@pytest.mark.asyncio
async def test_503_is_transient_and_not_ambiguous(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    admin.post("/_sandbox/faults", json={"error_5xx": 1.0}).raise_for_status()
    async with client_for(sandbox) as client:
        with pytest.raises(Transient) as caught:
            await client.credits()
    assert caught.value.status == 503 and caught.value.ambiguous is False


@pytest.mark.asyncio
async def test_connect_error_to_a_closed_port_is_transient_and_not_ambiguous() -> None:
    async with BouncerClient(f"http://127.0.0.1:{closed_port()}", KEY, timeout=2) as client:
        with pytest.raises(Transient) as caught:
            await client.create_batch([("a@example.com", "1")])
    assert caught.value.status is None and caught.value.ambiguous is False
    assert KEY not in str(caught.value)


@pytest.mark.asyncio
async def test_read_timeout_is_transient_and_ambiguous(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    admin.post("/_sandbox/faults", json={"slow": 1.0, "slow_seconds": 1.0}).raise_for_status()
    async with client_for(sandbox, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(Transient) as caught:
            await client.credits()
    assert time.monotonic() - started < 0.9
    assert caught.value.ambiguous is True and "Timeout" in caught.value.message


@pytest.mark.asyncio
async def test_dropped_connection_is_transient_and_ambiguous(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    admin.post("/_sandbox/faults", json={"drop": 1.0, "drop_when": "after"}).raise_for_status()
    async with client_for(sandbox) as client:
        with pytest.raises(Transient) as caught:
            await client.create_batch([("a@example.com", "1")])
    assert caught.value.ambiguous is True
    # The ambiguous case for real: the batch exists and was charged.
    assert admin.get("/_sandbox/stats").json()["batches_created"] == 1


@pytest.mark.asyncio
async def test_a_502_after_the_api_made_the_batch_is_transient_and_ambiguous(
    sandbox: RunningSandbox, admin: httpx.Client
) -> None:
    # A gateway's 502/504, or a 500 raised after the work was done: the batch may exist.
    admin.post("/_sandbox/faults", json={"error_5xx": 1.0, "error_5xx_status": 502, "error_5xx_when": "after"})
    async with client_for(sandbox) as client:
        with pytest.raises(Transient) as caught:
            await client.create_batch([("a@example.com", "1")])
    assert caught.value.status == 502 and caught.value.ambiguous is True
    assert admin.get("/_sandbox/stats").json()["batches_created"] == 1


@pytest.mark.asyncio
async def test_garbled_2xx_body_is_transient() -> None:
    # The sandbox never garbles a body; this edge is only reachable with a stub transport.
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b'{"credits": 1'))
    async with BouncerClient(
        "http://bouncer.invalid", KEY, transport=transport, create_per_minute=600, requests_per_minute=600
    ) as client:
        with pytest.raises(Transient) as caught:
            await client.credits()
    assert caught.value.ambiguous is True


def answering(body: object) -> BouncerClient:
    """A client whose every request is answered 200 with `body` as JSON."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
    return BouncerClient("http://bouncer.invalid", KEY, transport=transport, **UNLIMITED)  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("batch_id", [None, "", True, 1.5, ["b1"], {"id": "b1"}, "<missing>"])
async def test_a_create_answered_2xx_without_a_usable_batch_id_is_ambiguous_transient(batch_id: object) -> None:
    """{"batchId": null} came back as the batch id 'None', "" as '': a batch tracked under an id
    it does not have, instead of the create counted as unanswered."""
    body = {"status": "queued", "quantity": 1} | ({} if batch_id == "<missing>" else {"batchId": batch_id})
    async with answering(body) as client:
        with pytest.raises(Transient) as caught:
            await client.create_batch([("a@example.com", "1")])
    assert caught.value.ambiguous is True and caught.value.status == 200
    assert "batchId" in caught.value.message


@pytest.mark.asyncio
async def test_a_create_answered_with_an_integer_batch_id_is_that_id() -> None:
    async with answering({"batchId": 42, "status": "queued"}) as client:
        assert (await client.create_batch([("a@example.com", "1")])).batch_id == "42"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"batchId": "b1"}, "status"),
        ({"batchId": "b1", "status": None}, "status"),
        ({"batchId": "b1", "status": 3}, "status"),
        ({"status": "completed"}, "batchId"),
        ({"batchId": None, "status": "completed"}, "batchId"),
    ],
)
async def test_a_status_answer_without_a_status_or_batch_id_is_transient_naming_it(body: dict, named: str) -> None:
    """A missing `status` escaped get_status as a raw KeyError: not a BouncerError, so the
    activity failed on it instead of polling again."""
    async with answering(body) as client:
        with pytest.raises(Transient) as caught:
            await client.get_status("b1")
    assert named in caught.value.message


@pytest.mark.asyncio
async def test_a_status_answer_with_null_stats_counts_leaves_them_out() -> None:
    """A null count raised TypeError out of get_status."""
    body = {"batchId": "b1", "status": "processing", "processed": 3,
            "stats": {"deliverable": 2, "risky": None, "undeliverable": 1.0, "unknown": "x"}}
    async with answering(body) as client:
        status = await client.get_status("b1")
    assert status.stats == {"deliverable": 2, "undeliverable": 1} and status.processed == 3


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (402, OutOfCredits),
        (403, Forbidden),
        (404, NotFound),
        (409, BadRequest),
        (413, BadRequest),
        (422, BadRequest),
        (429, RateLimited),
        (408, Transient),
        (500, Transient),
        (502, Transient),
        (503, Transient),
    ],
)
def test_every_status_maps_to_one_error_class(status: int, error_class: type[BouncerError]) -> None:
    response = httpx.Response(status, json={"status": status, "error": "x", "message": "13 credits left"})
    error = error_from_response(response)
    assert type(error) is error_class and error.status == status and error.message == "13 credits left"
    assert isinstance(error, BouncerError)
    assert issubclass(Forbidden, Unauthorized)
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is error_class and vars(clone) == vars(error)


@pytest.mark.parametrize(
    ("status", "ambiguous"),
    [(408, False), (429, False), (500, True), (502, True), (503, False), (504, True), (520, True)],
)
def test_only_503_among_5xx_says_the_request_was_not_acted_on(status: int, ambiguous: bool) -> None:
    """503 (the API shedding load, as documented) and 429 refuse a request unhandled: a create
    answered so made nothing. Any other 5xx may come after the work was done (a gateway timing out
    on the API, an error raised past the commit): a create answered so may have made its batch."""
    for headers in ({}, {"retry-after": "2"}):
        error = error_from_response(httpx.Response(status, json={"message": "x"}, headers=headers))
        assert getattr(error, "ambiguous", False) is ambiguous, headers


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("0.35") == pytest.approx(0.35)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30.0)
    assert parse_retry_after(format_datetime(now, usegmt=True), now=now.timestamp() + 5) == 0.0
    limited = error_from_response(httpx.Response(429, headers={"Retry-After": later}))
    assert isinstance(limited, RateLimited) and limited.retry_after is not None


@pytest.fixture
def host_in_new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is UTC-5 (or -4) for the test."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("value", ["Sun Nov  6 08:49:37 1994", "Sun, 06 Nov 1994 08:49:37 -0000",
                                   "Sunday, 06-Nov-94 08:49:37 GMT"], ids=["asctime", "minus-zero", "rfc850"])
def test_a_retry_after_date_without_a_zone_is_read_as_gmt_not_the_hosts_local_time(value, host_in_new_york) -> None:
    now = datetime(1994, 11, 6, 8, 49, 7, tzinfo=timezone.utc).timestamp()
    assert parse_retry_after(value, now=now) == pytest.approx(30.0)


def test_a_retry_after_is_capped_and_a_negative_or_non_finite_one_ignored() -> None:
    assert MAX_RETRY_AFTER_S == 3600.0
    for value in ("1e300", "86400", "Fri, 31 Dec 9999 23:59:59 GMT"):
        assert parse_retry_after(value) == MAX_RETRY_AFTER_S, value
    for value in ("-5", "-0.5", "nan", "inf", "-inf", "Infinity"):
        assert parse_retry_after(value) is None, value
    assert parse_retry_after("0") == 0.0
    for status in (429, 503):
        error = error_from_response(httpx.Response(status, headers={"Retry-After": "1e300"}))
        assert error.retry_after == MAX_RETRY_AFTER_S, status  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_token_bucket_spaces_acquisitions_evenly() -> None:
    bucket = TokenBucket(rate_per_minute=600)  # one every 0.1 s, burst 1
    stamps = []
    for _ in range(6):
        await bucket.acquire()
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert all(0.08 <= gap <= 0.2 for gap in gaps), gaps

    burst = TokenBucket(rate_per_minute=600, burst=3)
    started = time.monotonic()
    await asyncio.gather(*(burst.acquire() for _ in range(5)))
    assert 0.17 <= time.monotonic() - started <= 0.4  # three at once, then two at 0.1 s


@pytest.mark.asyncio
async def test_rate_gate_bounds_concurrency() -> None:
    gate = RateGate(2, TokenBucket(rate_per_minute=float("inf")))
    inside = peak = 0

    async def hold() -> None:
        nonlocal inside, peak
        async with gate:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.02)
            inside -= 1

    await asyncio.gather(*(hold() for _ in range(8)))
    assert peak == 2


@pytest.mark.asyncio
async def test_client_paces_its_own_requests(sandbox: RunningSandbox, admin: httpx.Client) -> None:
    async with BouncerClient(sandbox.url, KEY, requests_per_minute=300) as client:  # 0.2 s apart
        started = time.monotonic()
        await asyncio.gather(*(client.credits() for _ in range(4)))
    assert time.monotonic() - started >= 0.55

"""Failure handling (DESIGN.md §6), one test per row of the table, on the time-skipping server
with the real activities, a fresh database and the sandbox over HTTP (its fault injection).

Each asserts what the user cares about: every row terminal, nothing lost, nothing paid twice,
and the failure recorded where an operator looks (dead letters with a reason, events, status).
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
from datetime import timedelta

import httpx
import pytest
import uvicorn
from helpers import make_settings, running_pipeline, write_list
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.service import RPCError
from test_workflows import (
    LANE,
    assert_replays,
    emails,
    events,
    eventually,
    item_states,
    lane_row,
    prepared,
    sandbox_stats,
    scheduler_status,
    ub_id,
)

from activities.bouncer_api import _as_temporal_error
from bouncer.client import error_from_response
from bouncer.errors import RateLimited, Transient
from devstack import free_port
from sandbox.process import running_sandbox
from sandbox.verdicts import verdict
from workflows.bouncer_batch import API_RETRY
from workflows.models import Summary, UserBatchInput, bouncer_batch_workflow_id


def faults(sandbox, **config) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/faults", json=config).raise_for_status()


def set_credits(sandbox, credits: int) -> None:
    httpx.post(f"{sandbox.url}/_sandbox/credits", json={"credits": credits}).raise_for_status()


def lane_paused_for(client, reason: str):
    """A check for `eventually`: the lane's scheduler is paused for `reason` (not started yet: no)."""
    async def check() -> bool:
        with contextlib.suppress(RPCError):
            s = await scheduler_status(client)
            return s.paused and s.pause_reason == reason
        return False
    return check


def started_attempts(history_events) -> list[int]:
    return [e.activity_task_started_event_attributes.attempt for e in history_events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED]


# ---- 429 -------------------------------------------------------------------------------------------


def test_429_becomes_a_retry_after_the_apis_retry_after():
    err = _as_temporal_error(RateLimited("slow down", retry_after=2.5), "creating Bouncer batch 1")
    assert err.next_retry_delay == timedelta(seconds=2.5)
    assert not err.non_retryable and err.type == "RateLimited"


def test_a_huge_or_non_finite_retry_after_is_capped_not_an_overflow_in_the_error_mapper():
    """timedelta(seconds=1e300) raised OverflowError inside the mapper: the activity failed with
    that, not with the API's answer."""
    for error in (RateLimited("slow down", retry_after=1e300), Transient("busy", status=503, retry_after=1e300)):
        assert _as_temporal_error(error, "creating Bouncer batch 1").next_retry_delay == timedelta(hours=1)
    for error in (RateLimited("slow down", retry_after=float("nan")), RateLimited("slow down", retry_after=-3)):
        assert _as_temporal_error(error, "creating Bouncer batch 1").next_retry_delay == timedelta(seconds=1)
    assert _as_temporal_error(Transient("busy", retry_after=float("inf")), "polling").next_retry_delay is None
    limited = error_from_response(httpx.Response(429, headers={"Retry-After": "1e300"}))
    assert _as_temporal_error(limited, "polling").next_retry_delay == timedelta(hours=1)


async def test_429s_are_retried_until_the_batch_goes_through(skipping_env, db_url, sandbox, tmp_path):
    env = skipping_env
    faults(sandbox, rate_429=0.5, retry_after=0.2, seed=3)
    async with running_pipeline(env.client, make_settings(db_url, sandbox, batch_size=100)) as p:
        handle = await p.submit_file(write_list(tmp_path / "a.csv", emails("rl", 300)), "rita")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 300}
        stats = sandbox_stats(sandbox)
        assert sum(int(c.get("429", 0)) for c in stats["requests"].values()) > 0
        assert stats["addresses_received"] == 300 and stats["addresses_sent_twice"] == 0
        attempts = [a for (bb,) in p.sql("select id from bouncer_batches")
                    for a in started_attempts(await events(env.client, bouncer_batch_workflow_id(LANE, bb)))]
        assert max(attempts) > 1  # some call was answered 429 and retried by Temporal
        await assert_replays(env.client, p)


# ---- 5xx, timeouts, dropped connections ------------------------------------------------------------


def test_transient_errors_back_off_exponentially_with_a_cap():
    assert API_RETRY.backoff_coefficient == 2.0
    assert API_RETRY.maximum_interval == timedelta(minutes=2)
    assert API_RETRY.maximum_attempts == 0  # unlimited: a transient fault never loses a batch


async def test_5xx_timeouts_and_dropped_connections_are_retried_and_nothing_is_paid_twice(
    skipping_env, db_url, sandbox, tmp_path
):
    env = skipping_env
    # Drops before handling: nothing was created, so a retry is not ambiguous and pays nothing twice.
    # The sandbox delays a slow request before handling it, so a create that timed out made nothing
    # either; at the real API it may have (the cap on such creates has its own test below).
    faults(sandbox, error_5xx=0.25, drop=0.15, slow=0.15, slow_seconds=1.0, seed=5)
    settings = make_settings(db_url, sandbox, batch_size=100, bouncer_timeout_s=0.5, max_unanswered_creates=100)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "t.csv", emails("tr", 400)), "tom")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=90)
        assert summary.by_state == {"verified": 400}
        stats = sandbox_stats(sandbox)
        codes = {code for c in stats["requests"].values() for code in c}
        assert {"503", "dropped"} <= codes, stats["requests"]
        assert stats["addresses_sent_after_result"] == 0
        assert p.sql("select count(*) from dead_letters") == [(0,)]


def _no_batch_id(request: Request, resp: httpx.Response) -> Response | None:
    """The create was made (and charged) at the API, but its 2xx answer names no batch."""
    if request.method == "POST" and request.url.path == "/v1.1/email/verify/batch" and resp.is_success:
        return JSONResponse({"status": "queued"})
    return None


@pytest.mark.parametrize("lost", ["dropped", "no batchId", "502"])
async def test_a_batch_sent_without_an_answer_is_sent_at_most_max_unanswered_creates_times(
    skipping_env, db_url, sandbox, tmp_path, lost
):
    """Every answer is lost after the API made (and charged) the batch: the connection drops, a
    2xx comes back without `batchId`, or a gateway answers 502. Before, the create was retried
    without end and each copy paid for (50 addresses cost 5,100 credits in the audit; a 502 was
    later still taken for "nothing made", uncounted and uncapped); now the batch is sent 3 times
    (MAX_UNANSWERED_CREATES), then dead-lettered, and the lane pauses."""
    env = skipping_env
    if lost == "dropped":
        faults(sandbox, drop=1.0, drop_when="after")
    elif lost == "502":
        faults(sandbox, error_5xx=1.0, error_5xx_status=502, error_5xx_when="after")
    async with contextlib.AsyncExitStack() as stack:
        url = sandbox.url if lost != "no batchId" else await stack.enter_async_context(
            proxy(sandbox.url, after=_no_batch_id))
        settings = make_settings(db_url, sandbox, batch_size=100, bouncer_base_url=url)
        p = await stack.enter_async_context(running_pipeline(env.client, settings))
        handle = await p.submit_file(write_list(tmp_path / "u.csv", emails("un", 50)), "una")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"failed": 50}
        stats = sandbox_stats(sandbox)
        assert stats["batches_created"] == settings.max_unanswered_creates == 3
        assert p.sql("select state, create_attempts, ambiguous_creates from bouncer_batches") == [("failed", 3, 2)]
        [(reason,)] = p.sql("select distinct reason from dead_letters")
        assert reason.startswith("create failed: CreateUnanswered: Bouncer batch") and "sent 3 times" in reason
        status = await scheduler_status(env.client)
        assert status.paused and status.pause_reason.startswith("creates went unanswered")
        await assert_replays(env.client, p)


async def test_a_503_on_create_is_not_counted_as_an_unanswered_create(skipping_env, db_url, sandbox, tmp_path):
    """A 503 is an answer (nothing was made): retried as often as it takes, never counted ambiguous."""
    env = skipping_env
    faults(sandbox, error_5xx=0.6, seed=3)
    settings = make_settings(db_url, sandbox, batch_size=100, max_unanswered_creates=1)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "f.csv", emails("fi", 300)), "fia")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=90)
        assert summary.by_state == {"verified": 300}
        assert sandbox_stats(sandbox)["requests"]["create"].get("503", 0) >= 1
        assert p.sql("select sum(ambiguous_creates), sum(create_attempts) > count(*) from bouncer_batches") == [
            (0, True)]


# ---- 402 -------------------------------------------------------------------------------------------


async def test_out_of_credits_pauses_the_lane_records_an_event_and_resumes_after_a_top_up(
    skipping_env, db_url, sandbox, tmp_path
):
    env = skipping_env
    set_credits(sandbox, 150)  # one 100-address batch fits, the next ones are refused with 402
    settings = make_settings(db_url, sandbox, batch_size=100, credit_check_s=60)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "c.csv", emails("cr", 300)), "cora")

        await eventually(lane_paused_for(env.client, "out of credits"), "the lane to pause for credits")
        await eventually(lambda: p.sql("select count(*) from events where kind = 'credits.exhausted'") == [(1,)],
                         "the credits.exhausted event")
        assert p.sql("select data->>'lane' from events where kind = 'credits.exhausted'") == [(LANE,)]
        # Nothing lost meanwhile: refused addresses are back in the queue, not dead-lettered.
        assert p.sql("select count(*) from dead_letters") == [(0,)]
        await eventually(lambda: p.sql("select count(*) from queue")[0][0] == 200, "refused addresses re-queued")
        assert p.sql("select max(attempts) from queue") == [(0,)]  # a refusal is not an attempt

        set_credits(sandbox, 10_000)
        # Awaiting the result lets time skip: the durable timer fires, /credits suffices, the lane resumes.
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 300}
        status = await scheduler_status(env.client)
        assert not status.paused
        stats = sandbox_stats(sandbox)
        assert stats["addresses_received"] == 300 and stats["addresses_sent_twice"] == 0
        assert stats["requests"]["credits"]["200"] >= 1
        assert p.sql("select count(*) from events where kind = 'credits.exhausted'") == [(1,)]
        # Subscribers hear that the pause ended, and why it had begun.
        await eventually(lambda: p.sql("select data from events where kind = 'lane.resumed'")
                         == [({"lane": LANE, "reason": "out of credits"},)], "the lane.resumed event")
        await assert_replays(env.client, p)


async def test_a_top_up_smaller_than_a_batch_is_spent_on_a_smaller_batch(skipping_env, db_url, sandbox, tmp_path):
    """Paused for credits, the lane resumed only once the credits covered a whole BATCH_SIZE: a top-up
    to 150 credits left a 130-address list (batches of 200) waiting for good. Now the next pack's
    batches are no larger than the credits read."""
    env = skipping_env
    set_credits(sandbox, 100)
    settings = make_settings(db_url, sandbox, batch_size=200, credit_check_s=60)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "s.csv", emails("sm", 130)), "sami")

        await eventually(lane_paused_for(env.client, "out of credits"), "the lane to pause for credits")
        set_credits(sandbox, 150)
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 130}
        stats = sandbox_stats(sandbox)
        assert stats["addresses_received"] == 130 and stats["addresses_sent_twice"] == 0
        assert not (await scheduler_status(env.client)).paused
        await assert_replays(env.client, p)


# ---- 400 / 401 (403 maps to the same class as 401: tests/test_bouncer_client.py) ---------------------


@pytest.mark.parametrize(
    ("overrides", "reason_part", "lane_paused"),
    [
        # The API refuses the callback URL: 400, our fault, nothing created.
        ({"callback_public_url": "ftp://callbacks.invalid"}, "BadRequest", False),
        ({"bouncer_api_key": "wrong-key"}, "Unauthorized", True),
    ],
    ids=["400", "401"],
)
async def test_refused_requests_dead_letter_the_batch_with_the_reason(
    skipping_env, db_url, sandbox, tmp_path, overrides, reason_part, lane_paused
):
    env = skipping_env
    settings = make_settings(db_url, sandbox, batch_size=100, **overrides)
    async with running_pipeline(env.client, settings) as p:
        handle = await p.submit_file(write_list(tmp_path / "r.csv", emails("rf", 60)), "rolf")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        # Every row still ends terminal: `failed`, with the reason a person can act on.
        assert summary.by_state == {"failed": 60}
        reasons = p.sql("select distinct reason, attempts from dead_letters")
        assert len(reasons) == 1 and reason_part in reasons[0][0], reasons
        notes = p.sql("select distinct note from item_outcomes where user_batch_id = %s", (summary.user_batch_id,))
        assert len(notes) == 1 and reason_part in notes[0][0]
        assert sandbox_stats(sandbox)["addresses_received"] == 0
        status = await scheduler_status(env.client)
        assert status.paused == lane_paused
        if lane_paused:
            assert status.pause_reason == "the API refused the key"


@dataclasses.dataclass
class Refusing:
    """What the proxy in front of the API answers 401 to, while `on` (a key revoked after the batch
    was created): `what` is "status" (GET of a batch) or "download"; everything else passes."""
    what: str
    on: bool = True
    refused: int = 0

    def refuses(self, request: Request) -> bool:
        path = request.url.path
        if not self.on or request.method != "GET" or not path.startswith("/v1.1/email/verify/batch/"):
            return False
        return path.endswith("/download") if self.what == "download" else not path.endswith("/download")


@contextlib.asynccontextmanager
async def proxy(upstream: str, before=None, after=None):
    """An HTTP proxy in front of the API: `before(request)` may answer instead of forwarding;
    `after(request, upstream_answer)` may replace the API's answer (the request was handled)."""
    async def forward(request: Request) -> Response:
        if before is not None and (answer := before(request)) is not None:
            return answer
        async with httpx.AsyncClient(base_url=upstream, timeout=30) as http:
            resp = await http.request(request.method, request.url.path, params=request.query_params,
                                      headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                                      content=await request.body())
        if after is not None and (answer := after(request, resp)) is not None:
            return answer
        return Response(resp.content, resp.status_code, {"content-type": resp.headers.get("content-type", "")})

    port = free_port()
    app = Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def refusing(upstream: str, rule: Refusing):
    def before(request: Request) -> Response | None:
        if rule.refuses(request):
            rule.refused += 1
            return JSONResponse({"error": "invalid API key"}, status_code=401)
        return None

    return proxy(upstream, before=before)


@pytest.mark.parametrize("what", ["status", "download"])
async def test_a_refused_key_pauses_the_lane_and_keeps_a_paid_batch_until_it_works_again(
    skipping_env, db_url, sandbox, tmp_path, what
):
    """The key is refused once the batch is at the API (paid for). Before: the batch was
    dead-lettered, so its results were lost and `dlq retry` paid for them again. Now the lane pauses
    (nothing new is created with the key) and the batch waits; once the key works, it is stored."""
    env = skipping_env
    rule = Refusing(what)
    async with refusing(sandbox.url, rule) as api:
        settings = make_settings(db_url, sandbox, batch_size=100, bouncer_base_url=api)
        async with running_pipeline(env.client, settings) as p:
            handle = await p.submit_file(write_list(tmp_path / "k.csv", emails("key", 60)), "kim")

            await eventually(lane_paused_for(env.client, "the API refused the key"), "the lane to pause for the key")
            await eventually(lambda: rule.refused >= 2, "the refused request retried")
            assert p.sql("select count(*) from dead_letters") == [(0,)]
            assert p.sql("select state from bouncer_batches") == [("submitted",)]

            rule.on = False  # the key works again
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
            assert summary.by_state == {"verified": 60}
            stats = sandbox_stats(sandbox)
            assert (stats["batches_created"], stats["addresses_received"], stats["addresses_sent_twice"]) == (1, 60, 0)
            assert p.sql("select count(*) from dead_letters") == [(0,)]
            await assert_replays(env.client, p)


# ---- stuck at the API ------------------------------------------------------------------------------


async def test_a_status_the_api_does_not_document_fails_each_poll_by_name_and_the_batch_is_stored_once_completed(
    skipping_env, db_url, sandbox, tmp_path
):
    """The API answers `paused` for a batch it holds (not queued/processing/completed). Before, that
    was the benign `NotReady` of every poll: nothing in the Web UI or the worker's log said the API
    had answered something unknown. Now each poll fails as `UnexpectedStatus`, naming the status; the
    batch (paid for) is still polled, and stored once the API reports it completed."""
    env = skipping_env
    odd = {"on": True, "answered": 0}

    def paused(request: Request, resp: httpx.Response) -> Response | None:
        path = request.url.path
        if (odd["on"] and request.method == "GET" and path.startswith("/v1.1/email/verify/batch/")
                and not path.endswith("/download") and resp.is_success):
            odd["answered"] += 1
            return JSONResponse({**resp.json(), "status": "paused"})
        return None

    async with proxy(sandbox.url, after=paused) as api:
        settings = make_settings(db_url, sandbox, batch_size=100, bouncer_base_url=api)
        async with running_pipeline(env.client, settings) as p:
            handle = await p.submit_file(write_list(tmp_path / "o.csv", emails("odd", 30)), "oda")
            await eventually(lambda: odd["answered"] >= 2, "the status polled twice")
            [(bb,)] = p.sql("select id from bouncer_batches")
            desc = await env.client.get_workflow_handle(bouncer_batch_workflow_id(LANE, bb)).describe()
            [poll] = desc.raw_description.pending_activities
            assert poll.activity_type.name == "await_batch_completion"
            assert poll.last_failure.application_failure_info.type == "UnexpectedStatus"
            assert "'paused' at the API, not a status it documents" in poll.last_failure.message

            odd["on"] = False
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
            assert summary.by_state == {"verified": 30}
            stats = sandbox_stats(sandbox)
            assert (stats["batches_created"], stats["addresses_sent_twice"]) == (1, 0)
            assert p.sql("select count(*) from dead_letters") == [(0,)]


async def test_a_batch_stuck_past_its_deadline_is_finished_early_requeued_and_dead_lettered_after_max_attempts(
    skipping_env, db_url, tmp_path
):
    env = skipping_env
    # A sandbox that never verifies an address in time (0.001 addresses per second).
    with running_sandbox("stuck-key", "--speed", "0.001") as stuck:
        settings = make_settings(db_url, stuck, batch_size=100, poll_interval_s=5, batch_deadline_s=60,
                                 max_address_attempts=2)
        async with running_pipeline(env.client, settings) as p:
            handle = await p.submit_file(write_list(tmp_path / "s.csv", emails("st", 40)), "stu")
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=90)

            assert summary.by_state == {"failed": 40}
            assert item_states(p, summary.user_batch_id) == {"failed": 40}
            # Two attempts, each finished early at the API after the deadline, with nothing verified:
            # every address came back `unknown`/`unknown` and none of them was stored as a verdict.
            api = httpx.get(f"{stuck.url}/_sandbox/batches").json()
            assert [b["status"] for b in api] == ["completed", "completed"], p.sql("select reason, attempts from dead_letters limit 1")
            assert p.sql("select state, count(*) from bouncer_batches group by 1") == [("stored", 2)]
            assert p.sql("select count(*) from results") == [(0,)]
            assert p.sql("select count(*), min(attempts), max(attempts) from dead_letters") == [(40, 2, 2)]
            (reason,) = p.sql("select distinct reason from dead_letters")
            assert "maximum number of attempts" in reason[0]
            assert p.sql("select count(*) from queue") == [(0,)]


async def test_a_list_waiting_on_an_address_of_a_list_cancelled_while_it_was_at_the_api_still_completes(
    skipping_env, db_url, tmp_path
):
    """Ann's batch, holding the address ben waits on, is at the API (a sandbox that never verifies
    in time) when ann cancels. Finished early past its deadline, it brings no answer for it. The
    address used to be re-queued on ann's queue, never packed again (she is cancelled), and ben
    hung until cleanup deleted ann. Now ben inherits it with its attempt counted: sent once more,
    then dead-lettered at max_address_attempts=2, and ben completes."""
    env = skipping_env
    shared = "shared.lead@company1.example"
    with running_sandbox("stuck-key", "--speed", "0.001") as stuck:
        settings = make_settings(db_url, stuck, batch_size=100, poll_interval_s=5, batch_deadline_s=60,
                                 max_address_attempts=2, standby_batches=0)
        async with running_pipeline(env.client, settings) as p:
            ann = await p.submit_file(write_list(tmp_path / "a.csv", [shared, *emails("ann", 9)]), "ann")
            await eventually(lambda: sandbox_stats(stuck)["batches_created"] == 1, "ann's Bouncer batch")
            ben = await p.submit_file(write_list(tmp_path / "b.csv", [shared]), "ben")
            await prepared(ben)
            assert lane_row(p, ub_id(ben))["shared"] == 1

            await ann.cancel()
            with env.auto_time_skipping_disabled():  # ann's batch stays at the API meanwhile
                with pytest.raises(WorkflowFailureError):
                    await asyncio.wait_for(ann.result(), timeout=15)
            assert p.sql("select state from user_batches where id = %s", (ub_id(ann),)) == [("cancelled",)]

            summary: Summary = await asyncio.wait_for(ben.result(), timeout=90)
            assert summary.state == "completed" and summary.by_state == {"failed": 1}
            # Two attempts in all: ann's batch, then ben's (the attempt ann's batch spent was kept).
            assert [b["status"] for b in httpx.get(f"{stuck.url}/_sandbox/batches").json()] == ["completed"] * 2
            assert sandbox_stats(stuck)["addresses_received"] == 10 + 1
            assert p.sql("select count(*), max(attempts) from dead_letters") == [(1, 2)]
            assert p.sql("select count(*) from queue") == [(0,)] and p.sql("select count(*) from waits") == [(0,)]
            assert item_states(p, ub_id(ann)) == {"cancelled": 10}


async def test_a_batch_finished_early_keeps_what_it_verified_and_sends_only_the_rest_again(dev_env, db_url, tmp_path):
    """Real time: the sandbox verifies 10 addresses a second, so a 200-address batch needs 20 s; its
    deadline is 2 s. Finished early, the part it verified (paid for) is stored and never sent again."""
    with running_sandbox("slow-key", "--speed", "10") as slow:
        settings = make_settings(db_url, slow, batch_size=200, poll_interval_s=0.5, batch_deadline_s=2,
                                 max_address_attempts=2)
        async with running_pipeline(dev_env.client, settings) as p:
            handle = await p.submit_file(write_list(tmp_path / "f.csv", emails("fin", 200)), "fay")
            summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)

            api = httpx.get(f"{slow.url}/_sandbox/batches").json()
            assert [b["status"] for b in api] == ["completed", "completed"]  # finished, not deleted
            (first, second) = [size for (size,) in p.sql("select size from bouncer_batches order by id")]
            assert first == 200 and 0 < second < 200  # the second attempt carried only the unverified part
            assert sandbox_stats(slow)["addresses_received"] == 200 + second

            verified = summary.by_state.get("verified", 0)
            assert verified >= 200 - second and verified + summary.by_state.get("failed", 0) == 200
            rows = p.sql("select email, status, reason from item_outcomes where state = 'verified'")
            assert len(rows) == verified == p.sql("select count(*) from results")[0][0]
            for email, status, reason in rows:
                assert (status, reason) == (verdict(email)["status"], verdict(email)["reason"]) != ("unknown", "unknown")
            assert p.sql("select count(*), max(attempts) from dead_letters") == [(200 - verified, 2)]
            await assert_replays(dev_env.client, p)


# ---- stranded waits ---------------------------------------------------------------------------------


async def test_waits_no_store_will_settle_are_repaired_so_the_user_batch_still_completes(
    skipping_env, db_url, sandbox, tmp_path
):
    """A prepare that commits after a concurrent store resolved an address it waits on leaves a
    `waits` row nobody settles (found by the 200k chaos run). Built here directly: one wait on an
    address verified meanwhile, one on an address nobody holds any more."""
    env = skipping_env
    async with running_pipeline(env.client, make_settings(db_url, sandbox, batch_size=100)) as p:
        first = await p.submit_file(write_list(tmp_path / "a.csv", ["done@x.example"]), "ann")
        assert (await asyncio.wait_for(first.result(), timeout=30)).by_state == {"verified": 1}
        p.sql("insert into addresses (email) values ('lost@x.example') returning id")
        (ub,) = p.sql(
            """
            with b as (insert into user_batches (user_id, name, state, rows_total, workflow_id)
                       values ('bob', 'b.csv', 'queued', 2, 'user-batch-stranded') returning id),
                 i as (insert into items (user_batch_id, row_no, raw, email, state)
                       select id, n, e, e, 'pending' from b, (values (2, 'done@x.example'), (3, 'lost@x.example')) v(n, e)),
                 l as (insert into user_batch_lanes (user_batch_id, lane, unique_addresses, shared, remaining)
                       select id, 'deliverability', 2, 2, 2 from b)
            insert into waits (lane, address_id, user_batch_id)
            select 'deliverability', x.id, b.id from b, addresses x where x.email in ('done@x.example', 'lost@x.example')
            returning user_batch_id
            """
        )[0]
        handle = await env.client.start_workflow(
            "UserBatchWorkflow", UserBatchInput(ub, progress_recheck_s=5.0), id="user-batch-stranded",
            task_queue=p.settings.task_queue, result_type=Summary)
        summary = await asyncio.wait_for(handle.result(), timeout=30)
        assert summary.by_state == {"verified": 2}
        assert p.sql("select count(*) from waits") == [(0,)] and p.sql("select count(*) from queue") == [(0,)]
        assert sandbox_stats(sandbox)["addresses_received"] == 2  # `done` was not sent again

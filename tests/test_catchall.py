"""The catchall lane end to end: accept-all addresses go to a second endpoint, pay once per lane.

Real parts: the dev server, embedded Postgres, and the sandbox over HTTP, whose `/catchall`
mount is the catch-all endpoint (its own account, limits and stats).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os

import httpx
from temporalio.service import RPCError, RPCStatusCode
from typer.testing import CliRunner

import starter
from activities.bouncer_api import BouncerApiActivities
from db import outcomes
from helpers import make_settings, running_pipeline, settings_env, write_list
from helpers import starter as run_starter
from sandbox.app import CATCHALL_PREFIX
from sandbox.verdicts import catchall_verdict, verdict
from settings import CATCHALL, DELIVERABILITY
from workflows.models import SchedulerStatus, StoreOutcome, bouncer_batch_workflow_id


def accept_all(email: str) -> bool:
    v = verdict(email)
    return v["status"] == "risky" and v["domain"]["acceptAll"] == "yes"


def risky(numbers: range) -> list[str]:
    return [f"risky+{i}@sandbox.usebouncer.com" for i in numbers]


async def test_accept_all_addresses_get_a_second_verdict_from_the_catchall_lane_paid_once(
    dev_env, db_url, sandbox, tmp_path
):
    settings = make_settings(db_url, sandbox, batch_size=200, catchall_batch_size=25,
                             catchall_max_concurrent_batches=2)
    ann = [f"ann.{i}@company{i % 37}.example" for i in range(300)] + risky(range(30))
    bob = risky(range(20)) + ["deliverable+1@sandbox.usebouncer.com"]  # deliverability only
    cid = risky(range(10, 40)) + [f"cid.{i}@company{i % 37}.example" for i in range(50)]
    both = ("deliverability", "catchall")
    async with running_pipeline(dev_env.client, settings, callbacks_on=True, catchall_lane=True) as p:
        handles = [
            await p.submit_file(write_list(tmp_path / "ann.csv", ann), "ann", lanes=both),
            await p.submit_file(write_list(tmp_path / "bob.csv", bob), "bob"),
            await p.submit_file(write_list(tmp_path / "cid.csv", cid), "cid", lanes=both),
        ]
        summaries = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=90)
        assert [s.state for s in summaries] == ["completed"] * 3
        ann_id, bob_id, cid_id = (s.user_batch_id for s in summaries)

        # Each row carries both verdicts: the catchall one only for accept-all addresses, and
        # only in the user batches that asked for the lane.
        rows = p.sql(
            "select user_batch_id, email, state, status, catchall_status, catchall_reason from item_outcomes"
        )
        assert len(rows) == len(ann) + len(bob) + len(cid)
        asked = {ann_id, cid_id}
        for ub, email, state, status, c_status, c_reason in rows:
            assert state == "verified" and status == verdict(email)["status"], email
            if ub in asked and accept_all(email):
                expected = catchall_verdict(email)
                assert (c_status, c_reason) == (expected["status"], expected["reason"]), email
            else:
                assert c_status is None, email
        decided = {c for (*_r, c, _reason) in rows if c is not None}
        assert {"deliverable", "undeliverable"} <= decided  # decisive for most accept-all addresses
        ann_catchall = [catchall_verdict(e)["status"] for e in ann if accept_all(e)]
        assert summaries[0].by_catchall_status == {k: ann_catchall.count(k) for k in set(ann_catchall)}
        assert summaries[1].by_catchall_status == {}

        # Pay once per lane: every accept-all address of ann and cid reached the catch-all
        # endpoint exactly once (ann and cid share 20); the deliverability endpoint saw each once.
        wanted = {e for e in ann + cid if accept_all(e)}
        assert len(wanted) > 40
        catchall_stats = httpx.get(f"{sandbox.url}{CATCHALL_PREFIX}/_sandbox/stats").json()
        assert catchall_stats["addresses_received"] == len(wanted)
        assert catchall_stats["addresses_sent_twice"] == 0
        assert catchall_stats["batches_created"] >= -(-len(wanted) // 25)
        main_stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert main_stats["addresses_received"] == len(set(ann + bob + cid))
        assert main_stats["addresses_sent_twice"] == 0

        # Both lanes were done before a user batch finished; the lane counts say so.
        lanes = p.sql(
            "select user_batch_id, lane, unique_addresses, remaining from user_batch_lanes order by 1, 2"
        )
        assert (ann_id, "catchall", len({e for e in ann if accept_all(e)}), 0) in lanes
        assert (cid_id, "catchall", len({e for e in cid if accept_all(e)}), 0) in lanes
        assert all(lane == "deliverability" for ub, lane, *_ in lanes if ub == bob_id)
        late = p.sql(
            "select count(*) from user_batches b join item_outcomes o on o.user_batch_id = b.id"
            " where b.id in (%s, %s) and o.catchall_verified_at > b.finished_at", (ann_id, cid_id)
        )
        assert late == [(0,)]
        status = await dev_env.client.get_workflow_handle("scheduler-catchall").query(
            "status", result_type=SchedulerStatus
        )
        assert status.lane == "catchall" and status.in_flight == 0 and status.dispatched_batches >= 2
        assert p.sql("select count(*) from queue") == [(0,)]

        # A later batch reuses the fresh catchall results: nothing more is sent to either endpoint.
        dan = await p.submit_file(write_list(tmp_path / "dan.csv", risky(range(5))), "dan", lanes=both)
        dan_summary = await asyncio.wait_for(dan.result(), timeout=30)
        assert dan_summary.state == "completed"
        assert p.sql("select cached, remaining from user_batch_lanes where user_batch_id = %s and lane = 'catchall'",
                     (dan_summary.user_batch_id,)) == [(5, 0)]
        again = httpx.get(f"{sandbox.url}{CATCHALL_PREFIX}/_sandbox/stats").json()
        assert again["addresses_received"] == len(wanted)

        # The lanes named the other way round (`starter.py submit --lanes catchall,deliverability`)
        # are the same request: each row shows its deliverability verdict, none ends `failed`.
        env = settings_env(p.settings, dev_env.client.service_client.config.target_host)
        code, out, err = await run_starter(env, "submit", str(write_list(tmp_path / "eve.csv", ann)), "--user", "eve",
                                       "--lanes", "catchall,deliverability", "--wait", "--json")
        assert code == 0, err
        eve = json.loads(out)
        assert eve["by_state"] == {"verified": len(ann)}
        assert p.sql("select lanes from user_batches where id = %s", (eve["user_batch_id"],)) == [
            (["deliverability", "catchall"],)]
        assert p.sql("select count(*) from item_outcomes where user_batch_id = %s and status is distinct from"
                     " (select status from item_outcomes o where o.user_batch_id = %s and o.row_no = item_outcomes.row_no)",
                     (eve["user_batch_id"], ann_id)) == [(0,)]

    # `starter.py results` shows the catchall columns for a batch that asked for the lane.
    env = {k: None for k in os.environ if k.startswith(("TEMPORAL_", "BOUNCER_", "CATCHALL_"))}
    run = CliRunner(env={**env, "DATABASE_URL": db_url}).invoke(starter.app, ["results", str(ann_id)])
    assert run.exit_code == 0, run.output
    out = list(csv.DictReader(io.StringIO(run.stdout)))
    assert len(out) == len(ann)
    row = next(r for r in out if r["email"] == "risky+3@sandbox.usebouncer.com")
    assert (row["status"], row["accept_all"]) == ("risky", "yes")
    assert row["catchall_status"] == catchall_verdict(row["email"])["status"] and row["catchall_verified_at"]
    plain = CliRunner(env={**env, "DATABASE_URL": db_url}).invoke(starter.app, ["results", str(bob_id)])
    assert plain.stdout.splitlines()[0] == ",".join(outcomes.COLUMNS)


def test_catchall_verdicts_are_deterministic_and_decisive_for_most_accept_all_addresses():
    addresses = risky(range(2000))
    verdicts = [catchall_verdict(e) for e in addresses]
    assert verdicts == [catchall_verdict(e) for e in addresses]
    decisive = sum(v["status"] in ("deliverable", "undeliverable") for v in verdicts)
    assert 0.8 < decisive / len(addresses) < 0.9
    assert all(v["domain"]["acceptAll"] == "yes" for v in verdicts)
    # Anything that is not accept-all keeps its ordinary verdict.
    plain = [f"p.{i}@company{i % 37}.example" for i in range(500)]
    assert all(catchall_verdict(e) == verdict(e) for e in plain if not accept_all(e))


async def test_the_sandbox_serves_an_independent_catchall_account_under_its_prefix(sandbox):
    base = f"{sandbox.url}{CATCHALL_PREFIX}/v1.1/email/verify/batch"
    headers = {"x-api-key": sandbox.api_key}
    entries = [{"email": e, "name": str(i)} for i, e in enumerate(risky(range(20)))]
    async with httpx.AsyncClient(headers=headers) as http:
        created = (await http.post(base, json=entries)).json()
        for _ in range(100):
            if (await http.get(f"{base}/{created['batchId']}")).json()["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        records = (await http.get(f"{base}/{created['batchId']}/download")).json()
        catchall_stats = (await http.get(f"{sandbox.url}{CATCHALL_PREFIX}/_sandbox/stats")).json()
        main_stats = (await http.get(f"{sandbox.url}/_sandbox/stats")).json()
        await http.post(f"{sandbox.url}/_sandbox/reset")  # the top-level reset covers /catchall too
        after_reset = (await http.get(f"{sandbox.url}{CATCHALL_PREFIX}/_sandbox/stats")).json()
    assert [(r["name"], r["status"]) for r in records] == [
        (e["name"], catchall_verdict(e["email"])["status"]) for e in entries
    ]
    assert catchall_stats["batches_created"] == 1 and catchall_stats["credits_charged"] == 20
    assert main_stats["batches_created"] == 0 and main_stats["credits_charged"] == 0
    assert after_reset["batches_created"] == 0


async def test_a_store_retried_after_its_commit_still_wakes_the_catchall_lane(dev_env, db_url, sandbox, tmp_path,
                                                                             monkeypatch):
    """The deliverability store commits (handing its accept-all addresses to the catchall lane),
    then its signal to the user batch fails: the activity fails on purpose and its retry finds the
    batch stored. That retry must still report the hand-off, or nobody wakes the idle catchall
    scheduler and the list stays `processing` with its addresses queued on that lane."""
    failed: list[int] = []
    notify = BouncerApiActivities._notify

    async def notify_failing_once(self, request, workflow_ids):
        if request.lane == DELIVERABILITY and not failed:
            failed.append(request.bouncer_batch_id)  # after the commit: the signal RPC fails
            raise RPCError("injected: the server is unavailable", RPCStatusCode.UNAVAILABLE, b"")
        await notify(self, request, workflow_ids)

    monkeypatch.setattr(BouncerApiActivities, "_notify", notify_failing_once)
    settings = make_settings(db_url, sandbox)
    addresses = risky(range(30))
    async with running_pipeline(dev_env.client, settings, callbacks_on=True, catchall_lane=True) as p:
        handle = await p.submit_file(write_list(tmp_path / "ana.csv", addresses), "ana",
                                     lanes=("deliverability", "catchall"))
        summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 30}
        assert len(failed) == 1
        # The store's outcome, as the retry returned it: what the committed attempt did.
        outcome = await dev_env.client.get_workflow_handle(
            bouncer_batch_workflow_id(DELIVERABILITY, failed[0]), result_type=StoreOutcome).result()
        assert (outcome.stored, outcome.handed_off, outcome.handoff_lane) == (30, 30, CATCHALL)
        assert p.sql("select count(*) from queue") == [(0,)]
        catchall_stats = httpx.get(f"{sandbox.url}{CATCHALL_PREFIX}/_sandbox/stats").json()
        assert catchall_stats["addresses_received"] == 30

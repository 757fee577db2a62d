"""Delayed and recurring runs on the dev server: `submit --at` (start_delay) and `submit --every`
(a Temporal Schedule whose runs copy the stored list into a new user batch)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
from temporalio.worker import Replayer
from typer.testing import CliRunner

import schedules
import starter as starter_cli
from helpers import make_settings, running_pipeline, write_list
from sandbox.verdicts import verdict
from worker import WORKFLOWS
from activities.user_batches import scheduler_input
from workflows.models import LanePause, Summary, recurring_schedule_id, scheduler_id, user_batch_workflow_id
from workflows.scheduler import GreedySchedulerWorkflow

ROOT = Path(__file__).resolve().parent.parent


def starter(settings, dev_env, *args: str, columns: int = 200) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": settings.database_url, "TASK_QUEUE": settings.task_queue,
           "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "starter.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


async def test_submit_at_starts_later_and_every_creates_a_schedule(dev_env, db_url, sandbox, tmp_path):
    settings = make_settings(db_url, sandbox)
    emails = [f"later{i}@delay{i % 5}.example" for i in range(40)]
    at = datetime.now(UTC) + timedelta(seconds=10)
    async with running_pipeline(dev_env.client, settings) as p:
        run = await asyncio.to_thread(
            starter, settings, dev_env, "submit", str(write_list(tmp_path / "later.csv", emails)), "--user", "erin",
            "--at", at.isoformat(), "--every", "30d", "--json")
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        ub = doc["user_batch_id"]
        assert doc["schedule_id"] == recurring_schedule_id(ub)
        assert datetime.fromisoformat(doc["starts_at"]) == at

        # Stored now, started later: the workflow's first task is due at `at` (start_delay).
        handle = dev_env.client.get_workflow_handle(user_batch_workflow_id(ub), result_type=Summary)
        desc = await handle.describe()
        assert abs((desc.execution_time - at).total_seconds()) < 1
        if datetime.now(UTC) < at - timedelta(seconds=1):  # (a very slow CLI start may already be past `at`)
            assert p.sql("select state from user_batches where id = %s", (ub,)) == [("scheduled",)]
            shown = await asyncio.to_thread(starter, settings, dev_env, "status", str(ub), "--json")
            assert json.loads(shown.stdout)["state"] == "scheduled", shown.stdout
        # Meanwhile, the schedule: every 30 days counted from `at`, listed, paused, unpaused, deleted.
        sched = await dev_env.client.get_schedule_handle(doc["schedule_id"]).describe()
        assert sched.schedule.state.note == f"re-verifies user batch {ub}'s list every 30d"  # not `30 days, 0:00:00`
        assert abs((sched.info.next_action_times[0] - (at + timedelta(days=30))).total_seconds()) < 1
        listed = json.loads((await asyncio.to_thread(starter, settings, dev_env, "schedules", "list", "--json")).stdout)
        assert [(d["schedule_id"], d["user"], d["every"], d["paused"]) for d in listed] == [
            (doc["schedule_id"], "erin", "30d", False)]  # as it was typed, `--every 30d`
        for verb, paused in (("pause", True), ("unpause", False)):
            assert (await asyncio.to_thread(starter, settings, dev_env, "schedules", verb, doc["schedule_id"])
                    ).returncode == 0
            assert (await dev_env.client.get_schedule_handle(doc["schedule_id"]).describe()).schedule.state.paused \
                is paused
            shown = json.loads((await asyncio.to_thread(starter, settings, dev_env, "schedules", "list", "--json")
                                ).stdout)[0]
            assert (shown["next_run"] is None) is paused  # a paused schedule has no next run
            table = (await asyncio.to_thread(starter, settings, dev_env, "schedules", "list", columns=80)).stdout
            assert doc["schedule_id"] in table  # whole, even at 80 columns
        other = await asyncio.to_thread(starter, settings, dev_env, "schedules", "pause", doc["schedule_id"],
                                        "--user", "mallory")
        assert other.returncode == 2 and "no recurring list" in other.stderr
        summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"verified": 40}
        assert datetime.now(UTC) >= at  # the schedule checks above ran while it waited

        assert (await asyncio.to_thread(starter, settings, dev_env, "schedules", "delete", doc["schedule_id"])
                ).returncode == 0
        assert p.sql("select count(*) from recurring_lists") == [(0,)]
        assert [s.id async for s in await dev_env.client.list_schedules()
                if s.id == doc["schedule_id"]] == []


    for args, words in ((["--at", "2020-01-01T00:00Z"], "in the past"), (["--every", "fortnightly"], "duration"),
                        (["--every", "30s"], "at least 1m")):
        bad = CliRunner().invoke(starter_cli.app, ["submit", str(tmp_path / "later.csv"), "--user", "erin", *args])
        assert bad.exit_code == 2 and words in bad.output, bad.output


async def test_a_scheduled_run_reverifies_the_stored_list_sending_only_stale_results(
    dev_env, db_url, sandbox, tmp_path
):
    settings = make_settings(db_url, sandbox, batch_size=200)
    emails = [f"lead{i}@monthly{i % 7}.example" for i in range(300)]
    async with running_pipeline(dev_env.client, settings) as p:
        rows = [*emails, "not-an-address", emails[0]]
        first = await p.submit_file(write_list(tmp_path / "monthly.csv", rows), "finn")
        await asyncio.wait_for(first.result(), timeout=60)
        (ub,) = p.sql("select id from user_batches where workflow_id = %s", (first.id,))[0]
        schedule_id = await schedules.create_recurring(dev_env.client, settings, ub, timedelta(days=30),
                                                       datetime.now(UTC))
        try:
            # 120 results verified 40 days ago: past the 30-day cache TTL. 60 more verified 16 days ago:
            # within the TTL, but older than half the 30-day period, so the previous run's. The run
            # pays for those 180 again and reuses the 120 others (as if verified for another list).
            p.sql("update results set verified_at = now() - interval '40 days' where address_id in"
                  " (select id from addresses order by id limit 120) returning 1")
            p.sql("update results set verified_at = now() - interval '16 days' where address_id in"
                  " (select id from addresses order by id offset 120 limit 60) returning 1")
            sent_before = httpx.get(f"{sandbox.url}/_sandbox/stats").json()["addresses_received"]
            await dev_env.client.get_schedule_handle(schedule_id).trigger()

            deadline = time.monotonic() + 30
            while not p.sql("select latest_user_batch_id from recurring_lists where runs = 1"):
                assert time.monotonic() < deadline, "the scheduled run did not copy the list"
                await asyncio.sleep(0.2)
            (run_ub,) = p.sql("select latest_user_batch_id from recurring_lists")[0]
            summary: Summary = await asyncio.wait_for(
                dev_env.client.get_workflow_handle(user_batch_workflow_id(run_ub), result_type=Summary).result(),
                timeout=60)
        finally:
            await schedules.delete_recurring(dev_env.client, settings, schedule_id)

        assert run_ub != ub
        # The run's workflows replay deterministically and carry ids and counts, never an address.
        run_wf = next(iter(p.sql("select source from user_batches where id = %s", (run_ub,))[0]))
        run_wf = run_wf.rsplit(" run ", 1)[1]
        for wf_id in (run_wf, user_batch_workflow_id(run_ub)):
            history = await dev_env.client.get_workflow_handle(wf_id).fetch_history()
            await Replayer(workflows=WORKFLOWS).replay_workflow(history)
            raw = b"".join(e.SerializeToString() for e in history.events).lower()
            assert not [e for e in emails if e.encode() in raw]
        assert summary.by_state == {"verified": 300, "invalid": 1, "duplicate": 1}
        sent = httpx.get(f"{sandbox.url}/_sandbox/stats").json()["addresses_received"] - sent_before
        assert sent == 180  # stale ones sent again, the 120 fresh ones reused
        assert p.sql("select max_result_age_s from user_batches where id = %s", (run_ub,)) == [(15 * 86400.0,)]
        assert p.sql("select count(*) from results where verified_at < now() - interval '1 day'") == [(0,)]
        rows = p.sql("select row_no, email, state, status from item_outcomes where user_batch_id = %s order by row_no",
                     (run_ub,))
        originals = p.sql("select row_no, email, state from item_outcomes where user_batch_id = %s order by row_no",
                          (ub,))
        assert [r[:3] for r in rows] == [r[:3] for r in originals]  # same rows, same line numbers
        for _row, email, state, status in rows:
            if state == "verified":
                assert status == verdict(email)["status"]
        with psycopg.connect(settings.database_url) as conn:
            source, user = conn.execute("select source, user_id from user_batches where id = %s", (run_ub,)).fetchone()
        assert user == "finn" and source.startswith(f"schedule {schedule_id} run ")


async def test_a_run_due_while_the_first_submission_still_verifies_is_skipped(dev_env, db_url, sandbox, tmp_path):
    """SKIP is the schedule's overlap policy, but the schedule did not start the list's first
    submission: a run triggered while that one is held (its lane paused) copies nothing."""
    client = dev_env.client
    settings = make_settings(db_url, sandbox, batch_size=200)
    async with running_pipeline(client, settings) as p:
        await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(settings, "deliverability"),
            id=scheduler_id("deliverability"), task_queue=settings.task_queue,
            start_signal="pause", start_signal_args=[LanePause("held by the test")],
        )
        try:
            first = await p.submit_file(write_list(tmp_path / "held.csv", [f"h{i}@held.example" for i in range(30)]),
                                        "hana")
            (ub,) = p.sql("select id from user_batches where workflow_id = %s", (first.id,))[0]
            schedule_id = await schedules.create_recurring(client, settings, ub, timedelta(days=30), datetime.now(UTC))
            try:
                schedule = client.get_schedule_handle(schedule_id)
                await schedule.trigger()
                deadline = time.monotonic() + 30
                while not (actions := (await schedule.describe()).info.recent_actions):
                    assert time.monotonic() < deadline, "the schedule did not start its run"
                    await asyncio.sleep(0.2)
                run = client.get_workflow_handle(actions[0].action.workflow_id)
                assert await asyncio.wait_for(run.result(), timeout=30) is None
            finally:
                await schedules.delete_recurring(client, settings, schedule_id)
            assert p.sql("select count(*) from user_batches") == [(1,)]  # nothing copied
            assert p.sql("select state from user_batches where id = %s", (ub,)) == [("queued",)]
        finally:
            await client.get_workflow_handle(scheduler_id("deliverability")).terminate("test finished")
            await first.terminate("test finished")

"""A list's own cap on result reuse (`submit --max-age`, the API's `max_age`, `SourceSpec.max_result_age_s`):
results older than it are verified again, younger ones are reused (paid once), on the dev server."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from helpers import make_settings, running_pipeline, settings_env, starter, write_list
from temporalio.client import WorkflowFailureError

import schedules
from workflows.models import SourceSpec, Summary, UserBatchInput, user_batch_workflow_id
from workflows.user_batch import UserBatchWorkflow


def _emails(n: int) -> list[str]:
    return [f"aged{i}@age{i % 5}.example" for i in range(n)]


def received(sandbox) -> int:
    return httpx.get(f"{sandbox.url}/_sandbox/stats").json()["addresses_received"]


async def test_max_age_reverifies_only_results_older_than_it(dev_env, db_url, sandbox, tmp_path):
    settings = make_settings(db_url, sandbox, batch_size=100)
    path = write_list(tmp_path / "aged.csv", _emails(60))
    async with running_pipeline(dev_env.client, settings) as p:
        first: Summary = await asyncio.wait_for((await p.submit_file(path, "ada")).result(), timeout=60)
        assert first.by_state == {"verified": 60}
        # 20 results 3 days old, 20 more 12 hours old, 20 just verified: all fresh under RESULT_TTL_DAYS (30).
        p.sql("update results set verified_at = now() - interval '3 days' where address_id in"
              " (select id from addresses order by id limit 20) returning 1")
        p.sql("update results set verified_at = now() - interval '12 hours' where address_id in"
              " (select id from addresses order by id offset 20 limit 20) returning 1")
        assert received(sandbox) == 60

        # The CLI: --max-age 2d sends the 20 results older than 2 days again, reuses the other 40.
        code, out, err = await starter(settings_env(settings, dev_env.client.service_client.config.target_host),
                                       "submit", str(path), "--user", "ada", "--max-age", "2d", "--wait", "--json",
                                       timeout=120)
        assert code == 0, err
        doc = json.loads(out)
        assert doc["by_state"] == {"verified": 60}
        assert received(sandbox) == 80
        assert p.sql("select max_result_age_s from user_batches where id = %s", (doc["user_batch_id"],)) == [
            (2 * 86400.0,)]

        # Its recurring runs (every 30 days) keep the shorter cap: 2 days, not half the period.
        schedule_id = await schedules.create_recurring(dev_env.client, settings, doc["user_batch_id"],
                                                       timedelta(days=30), datetime.now(UTC))
        try:
            await dev_env.client.get_schedule_handle(schedule_id).trigger()
            deadline = time.monotonic() + 30
            while not (run := p.sql("select latest_user_batch_id from recurring_lists where runs = 1")):
                assert time.monotonic() < deadline, "the scheduled run did not copy the list"
                await asyncio.sleep(0.2)
            run_summary = await asyncio.wait_for(dev_env.client.get_workflow_handle(
                user_batch_workflow_id(run[0][0]), result_type=Summary).result(), timeout=60)
        finally:
            await schedules.delete_recurring(dev_env.client, settings, schedule_id)
        assert p.sql("select max_result_age_s from user_batches where id = %s", (run[0][0],)) == [(2 * 86400.0,)]
        assert run_summary.by_state == {"verified": 60} and received(sandbox) == 80  # all younger than 2 days now

        # An SDK client: 6 hours sends the 12-hour-old ones again (the 3-day-old ones are fresh now).
        sdk = await dev_env.client.start_workflow(
            UserBatchWorkflow.run,
            UserBatchInput(source=SourceSpec(uri=str(path), user_id="ada", max_result_age_s=6 * 3600.0)),
            id=f"sdk-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue)
        assert (await asyncio.wait_for(sdk.result(), timeout=60)).by_state == {"verified": 60}
        assert received(sandbox) == 100

        # Without a cap the same list reuses all 60.
        again: Summary = await asyncio.wait_for((await p.submit_file(path, "ada")).result(), timeout=60)
        assert again.by_state == {"verified": 60} and received(sandbox) == 100

        # Refused with the reason, nothing stored: a cap under a minute, an unreadable one.
        for bad, words in (("30s", "shorter than 1m"), ("soon", "cannot read duration")):
            code, _out, err = await starter(settings_env(settings), "submit", str(path), "--user", "ada",
                                            "--max-age", bad)
            assert code == 2 and words in err, err
        short = await dev_env.client.start_workflow(
            UserBatchWorkflow.run, UserBatchInput(source=SourceSpec(uri=str(path), user_id="ada", max_result_age_s=5.0)),
            id=f"sdk-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await asyncio.wait_for(short.result(), timeout=30)
        assert "max_result_age_s 5.0" in str(failure.value.cause.cause)
        assert p.sql("select count(*) from user_batches") == [(5,)]


async def test_an_address_the_download_leaves_out_is_sent_again_not_settled_by_a_result_older_than_the_cap(
    dev_env, db_url, sandbox, tmp_path
):
    """The API's download leaves one address out. Its result from 10 days ago is fresh by
    RESULT_TTL_DAYS but not by the list's 1-day cap: it is sent again, not settled by that result."""
    from starlette.responses import JSONResponse
    from test_failures import proxy

    to_leave_out: list[str] = []  # an address to leave out of the next download
    left_out: list[int] = []  # how many records each such download lost

    def leave_one_out(request, answer):
        if not request.url.path.endswith("/download") or not to_leave_out:
            return None
        email = to_leave_out.pop()
        records = json.loads(answer.content)
        kept = [r for r in records if r["email"] != email]
        left_out.append(len(records) - len(kept))
        return JSONResponse(kept)

    path = write_list(tmp_path / "aged.csv", _emails(10))
    async with proxy(sandbox.url, after=leave_one_out) as url:
        settings = make_settings(db_url, sandbox, batch_size=100, bouncer_base_url=url)
        async with running_pipeline(dev_env.client, settings) as p:
            first: Summary = await asyncio.wait_for((await p.submit_file(path, "ada")).result(), timeout=60)
            assert first.by_state == {"verified": 10} and received(sandbox) == 10
            p.sql("update results set verified_at = now() - interval '10 days' returning 1")
            to_leave_out.append("aged3@age3.example")

            capped = await dev_env.client.start_workflow(
                UserBatchWorkflow.run,
                UserBatchInput(source=SourceSpec(uri=str(path), user_id="ada", max_result_age_s=86400.0)),
                id=f"sdk-{uuid.uuid4().hex[:8]}", task_queue=settings.task_queue)
            summary: Summary = await asyncio.wait_for(capped.result(), timeout=90)
            assert left_out == [1]
            assert summary.by_state == {"verified": 10}
            assert received(sandbox) == 10 + 10 + 1  # the left-out address once more
            assert p.sql("select count(*) from results where verified_at < now() - interval '1 day'") == [(0,)]

"""`starter.py dlq list|retry|purge` against a real pipeline (dev server, Postgres, the sandbox).

The CLI runs as a subprocess (it owns its event loop) while this test's workers keep running.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import psycopg
from helpers import eventually, make_settings, running_pipeline, settings_env, starter, write_list
from temporalio.client import WorkflowExecutionStatus

from activities import dead_letters
from activities.dead_letters import Selection, requeue_dead_letters, wake_after_retry
from activities.user_batches import scheduler_input
from workflows.models import LanePause, Summary, UserBatchInput, scheduler_id, user_batch_workflow_id
from workflows.scheduler import GreedySchedulerWorkflow
from workflows.user_batch import UserBatchWorkflow

LANE = "deliverability"


def emails(n: int) -> list[str]:
    return [f"dl.{i}@company{i % 5}.example" for i in range(n)]


async def test_dead_letters_are_listed_purged_and_retried_and_a_retry_reopens_and_completes_the_user_batch(
    dev_env, db_url, sandbox, tmp_path
):
    client = dev_env.client
    address = client.service_client.config.target_host
    # The API refuses every creation (400: the callback URL is not http): all 50 addresses dead-letter.
    broken = make_settings(db_url, sandbox, batch_size=100, callback_public_url="ftp://callbacks.invalid")
    async with running_pipeline(client, broken) as p:
        handle = await p.submit_file(write_list(tmp_path / "d.csv", emails(50) + ["bad-row"]), "dora")
        other = await p.submit_file(write_list(tmp_path / "o.csv", [f"pat.{i}@x.example" for i in range(20)]), "pat")
        first: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert first.by_state == {"failed": 50, "invalid": 1}
        assert (await other.result()).by_state == {"failed": 20}
        ub, other_ub = first.user_batch_id, (await other.result()).user_batch_id

    fixed = broken.model_copy(update={"callback_public_url": ""})
    env = settings_env(fixed, address)
    async with running_pipeline(client, fixed) as p:
        code, _out, err = await starter(env, "dlq", "purge")
        assert code == 2 and "--user-batch ID or --lane L" in err
        code, out, err = await starter(env, "dlq", "purge", "--user-batch", str(other_ub), "--json")
        assert code == 0 and json.loads(out) == {"purged": 20}, err
        # Purged: the rows stay failed, with their reason.
        assert p.sql("select state, count(*) from items where user_batch_id = %s group by 1", (other_ub,)) == [
            ("failed", 20)]

        code, out, err = await starter(env, "dlq", "list", "--json")
        assert code == 0, err
        listed = json.loads(out)
        assert listed["total"] == 50
        row = listed["dead_letters"][0]
        assert "BadRequest" in row["reason"] and "callback" in row["reason"]
        assert row["attempts"] == 1 and row["user_batches"] == [ub] and row["lane"] == "deliverability"

        # Another user's id is refused, with one line and exit code 2 (the --user scope).
        code, out, err = await starter(env, "dlq", "retry", "--user-batch", str(ub), "--user", "mallory")
        assert code == 2 and err.strip() == f"error: no user batch {ub} for user mallory"

        code, out, err = await starter(env, "dlq", "retry", "--user-batch", str(ub), "--user", "dora", "--json")
        assert code == 0, err
        retried = json.loads(out)
        assert retried["retried"] == 50
        assert retried["user_batches"][0]["was_completed"] and retried["user_batches"][0]["addresses"] == 50

        # The reopened batch runs again under its workflow id and finalizes with every row verified.
        second: Summary = await asyncio.wait_for(
            client.get_workflow_handle(handle.id, result_type=Summary).result(), timeout=60)
        assert second.state == "completed" and second.by_state == {"verified": 50, "invalid": 1}
        assert p.sql("select state, summary->'by_state' from user_batches where id = %s", (ub,)) == [
            ("completed", {"verified": 50, "invalid": 1})]
        assert p.sql("select count(*) from dead_letters") == [(0,)]
        assert p.sql("select count(*) from queue") == [(0,)] and p.sql("select count(*) from waits") == [(0,)]
        assert p.sql("select data->>'count' from events where kind = 'dead_letters.retried'") == [("50",)]
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == 50 and stats["addresses_sent_twice"] == 0


async def _dead_lettered_list(client, db_url, sandbox, tmp_path, addresses: list[str]):
    """A list whose every address was refused (400) and dead-lettered; returns its id and the
    settings that work (the sandbox then accepts creations)."""
    broken = make_settings(db_url, sandbox, batch_size=100, callback_public_url="ftp://callbacks.invalid")
    async with running_pipeline(client, broken) as p:
        handle = await p.submit_file(write_list(tmp_path / "ann.csv", addresses), "ann")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)
        assert summary.by_state == {"failed": len(addresses)}
    return summary.user_batch_id, broken.model_copy(update={"callback_public_url": ""})


def _lanes(p) -> list[tuple]:
    return p.sql("select user_batch_id, remaining, failed from user_batch_lanes order by 1")


async def test_a_retry_leaves_out_addresses_a_list_has_queued_itself_and_that_list_still_finishes(
    dev_env, db_url, sandbox, tmp_path
):
    """ben's list, submitted after ann's dead letters, queues the same addresses itself. A retry
    of the lane used to count them in ben's `remaining` a second time (20 -> 40): every address
    was verified, ben stayed at 20 remaining and its workflow never returned."""
    client = dev_env.client
    twenty = emails(20)
    ann, fixed = await _dead_lettered_list(client, db_url, sandbox, tmp_path, twenty)
    async with running_pipeline(client, fixed) as p:
        lane = await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(fixed, LANE), id=scheduler_id(LANE),
            task_queue=fixed.task_queue, start_signal="pause", start_signal_args=[LanePause("held by the test")],
        )
        ben_handle = await p.submit_file(write_list(tmp_path / "ben.csv", twenty), "ben")
        (ben,) = p.sql("select max(id) from user_batches")[0]
        await eventually(lambda: p.sql("select state from user_batches where id = %s", (ben,)) == [("queued",)]
                         and p.sql("select count(*) from queue where user_batch_id = %s", (ben,)) == [(20,)],
                         "ben's list queues its 20 addresses")
        assert _lanes(p) == [(ann, 0, 20), (ben, 20, 0)]

        code, out, err = await starter(settings_env(fixed, client.service_client.config.target_host),
                                       "dlq", "retry", "--lane", LANE, "--json")
        assert code == 0, err
        retried = json.loads(out)
        # ann waits on ben's queue rows (paid once); ben, whose addresses are in play, is left alone.
        assert retried["retried"] == 20
        assert [(t["user_batch_id"], t["addresses"]) for t in retried["user_batches"]] == [(ann, 20)]
        assert _lanes(p) == [(ann, 20, 0), (ben, 20, 0)]
        assert p.sql("select user_batch_id, count(*) from waits group by 1") == [(ann, 20)]

        await lane.signal(GreedySchedulerWorkflow.resume)
        ben_summary: Summary = await asyncio.wait_for(ben_handle.result(), timeout=60)
        ann_summary: Summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(ann), result_type=Summary).result(),
            timeout=60)
        assert ben_summary.by_state == {"verified": 20} and ann_summary.by_state == {"verified": 20}
        assert _lanes(p) == [(ann, 0, 0), (ben, 0, 0)]
        assert p.sql("select count(*) from queue") == [(0,)] and p.sql("select count(*) from waits") == [(0,)]
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == 20 and stats["addresses_sent_twice"] == 0


async def test_two_retries_at_once_count_the_dead_letters_once_and_the_reopened_list_completes(
    dev_env, db_url, sandbox, tmp_path
):
    """Two retries of the same dead letters (a double click; the CLI and the API) waiting on the
    same row locks. The second used to go on with what it read before the lock: it re-queued
    nothing but still added 20 to `remaining` (40), and the list hung at 20 in `queued`."""
    client = dev_env.client
    ann, fixed = await _dead_lettered_list(client, db_url, sandbox, tmp_path, emails(20))
    async with running_pipeline(client, fixed) as p:
        sel = Selection(user_batch_id=ann)

        def retry():
            with psycopg.connect(db_url) as conn:
                return requeue_dead_letters(conn, sel)

        with psycopg.connect(db_url) as holder:
            holder.execute("select 1 from dead_letters for update")
            both = asyncio.gather(asyncio.to_thread(retry), asyncio.to_thread(retry))
            await eventually(lambda: p.sql("select count(*) from pg_stat_activity where wait_event_type = 'Lock'"
                                           " and query like '%%dead_letters%%'") == [(2,)],
                             "both retries waiting on the dead letters' locks")
            holder.commit()
            results = await asyncio.wait_for(both, timeout=30)
        assert sorted(r[0] for r in results) == [0, 20]
        assert _lanes(p) == [(ann, 20, 0)]
        for _retried, touched, lanes in results:
            await wake_after_retry(client, fixed, touched, lanes)
        summary: Summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(ann), result_type=Summary).result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 20}
        assert _lanes(p) == [(ann, 0, 0)]
        assert p.sql("select count(*) from dead_letters") == [(0,)]


async def test_a_retry_settles_addresses_verified_meanwhile_without_sending_them_again(
    dev_env, db_url, sandbox, tmp_path
):
    """ann's 20 addresses were dead-lettered; ben's list then verified 10 of them. Retrying ann's
    dead letters sends only the other 10: the first 10 take ben's fresh results (pay once), and
    ann's counts and summary agree."""
    client = dev_env.client
    twenty = emails(20)
    ann, fixed = await _dead_lettered_list(client, db_url, sandbox, tmp_path, twenty)
    async with running_pipeline(client, fixed) as p:
        ben = await p.submit_file(write_list(tmp_path / "ben.csv", twenty[:10]), "ben")
        assert (await asyncio.wait_for(ben.result(), timeout=60)).by_state == {"verified": 10}

        code, out, err = await starter(settings_env(fixed, client.service_client.config.target_host),
                                       "dlq", "retry", "--user-batch", str(ann), "--json")
        assert code == 0, err
        assert json.loads(out)["retried"] == 20
        summary: Summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(ann), result_type=Summary).result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 20}
        assert p.sql("select remaining, failed from user_batch_lanes where user_batch_id = %s", (ann,)) == [(0, 0)]
        assert p.sql("select summary->'by_state' from user_batches where id = %s", (ann,)) == [({"verified": 20},)]
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == 20 and stats["addresses_sent_twice"] == 0


async def test_a_reopened_list_whose_last_run_never_closes_gets_a_new_run_and_completes(
    dev_env, db_url, sandbox, tmp_path, monkeypatch
):
    """The retry reopens a completed list and starts its workflow again under its id. Its last run
    may still be open (no worker to close it): that used to end in "retry in a moment" after 10 s,
    with the dead letters already deleted and the list `queued` with no workflow, for good."""
    monkeypatch.setattr(dead_letters, "REOPEN_WAIT_S", 0.5)
    client = dev_env.client
    ann, fixed = await _dead_lettered_list(client, db_url, sandbox, tmp_path, emails(10))
    # A run of the list's workflow that nothing will ever close (a task queue no worker polls).
    stuck = await client.start_workflow(UserBatchWorkflow.run, UserBatchInput(ann), id=user_batch_workflow_id(ann),
                                        task_queue="nobody-polls")
    async with running_pipeline(client, fixed) as p:
        with psycopg.connect(db_url) as conn:
            retried, touched, lanes = requeue_dead_letters(conn, Selection(user_batch_id=ann))
        assert retried == 10 and [t.was_completed for t in touched] == [True]
        await wake_after_retry(client, fixed, touched, lanes)
        old_run = client.get_workflow_handle(stuck.id, run_id=stuck.first_execution_run_id)
        assert (await old_run.describe()).status == WorkflowExecutionStatus.TERMINATED
        summary: Summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(ann), result_type=Summary).result(), timeout=60)
        assert summary.state == "completed" and summary.by_state == {"verified": 10}
        assert _lanes(p) == [(ann, 0, 0)]


async def test_a_users_retry_keeps_a_shared_dead_letter_for_the_other_user_whose_row_it_failed(
    dev_env, db_url, sandbox, tmp_path
):
    """bob's and alice's lists wait on one send of the same address, refused: one dead letter fails
    both rows. alice's scoped retry re-queues it for her list but used to delete it for everyone,
    so bob's row stayed failed and his retry found nothing; now it stays until bob retries it."""
    client = dev_env.client
    address = client.service_client.config.target_host
    shared = ["shared.lead@victim-corp.example"]
    broken = make_settings(db_url, sandbox, batch_size=100, callback_public_url="ftp://callbacks.invalid")
    async with running_pipeline(client, broken) as p:
        lane = await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(broken, LANE), id=scheduler_id(LANE),
            task_queue=broken.task_queue, start_signal="pause", start_signal_args=[LanePause("held by the test")],
        )
        bob_handle = await p.submit_file(write_list(tmp_path / "bob.csv", shared), "bob")
        alice_handle = await p.submit_file(write_list(tmp_path / "alice.csv", shared), "alice")
        await eventually(lambda: p.sql("select count(*) from queue") == [(1,)]
                         and p.sql("select count(*) from waits") == [(1,)], "alice waits on bob's queue row")
        await lane.signal(GreedySchedulerWorkflow.resume)
        bob_ub = (await asyncio.wait_for(bob_handle.result(), timeout=60)).user_batch_id
        alice_ub = (await asyncio.wait_for(alice_handle.result(), timeout=60)).user_batch_id
        assert p.sql("select count(*) from dead_letters") == [(1,)]

    fixed = broken.model_copy(update={"callback_public_url": ""})
    env = settings_env(fixed, address)

    async def listed(user: str) -> dict:
        code, out, err = await starter(env, "dlq", "list", "--user", user, "--json")
        assert code == 0, err
        return json.loads(out)

    async with running_pipeline(client, fixed) as p:
        alices = await listed("alice")
        assert alices["total"] == 1 and alices["dead_letters"][0]["user_batches"] == [alice_ub]
        # Purging alice's list forgets nothing bob's list still needs.
        code, out, err = await starter(env, "dlq", "purge", "--user-batch", str(alice_ub), "--user", "alice", "--json")
        assert code == 0 and json.loads(out) == {"purged": 0}, err
        code, out, err = await starter(env, "dlq", "retry", "--user-batch", str(alice_ub), "--user", "alice", "--json")
        assert code == 0, err
        assert json.loads(out)["retried"] == 1
        summary: Summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(alice_ub), result_type=Summary).result(), timeout=60)
        assert summary.by_state == {"verified": 1}
        assert (await listed("alice"))["total"] == 0
        bobs = await listed("bob")
        assert bobs["total"] == 1 and bobs["dead_letters"][0]["user_batches"] == [bob_ub]

        code, out, err = await starter(env, "dlq", "retry", "--user-batch", str(bob_ub), "--user", "bob", "--json")
        assert code == 0, err
        assert json.loads(out)["retried"] == 1
        summary = await asyncio.wait_for(
            client.get_workflow_handle(user_batch_workflow_id(bob_ub), result_type=Summary).result(), timeout=60)
        assert summary.by_state == {"verified": 1}
        assert p.sql("select count(*) from dead_letters") == [(0,)]
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == 1 and stats["addresses_sent_twice"] == 0  # bob took alice's result

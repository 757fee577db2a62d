"""`starter.py dlq list|retry|purge` against a real pipeline (dev server, Postgres, the sandbox).

The CLI runs as a subprocess (it owns its event loop) while this test's workers keep running.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from helpers import make_settings, running_pipeline, settings_env, starter, write_list

from workflows.models import Summary


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

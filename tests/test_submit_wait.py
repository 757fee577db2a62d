"""`starter.py submit --wait --json` against a real pipeline (dev server, Postgres, the sandbox):
one JSON object when the list completes, and also when it is cancelled while the CLI waits."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

from temporalio.api.enums.v1 import EventType

from helpers import make_settings, running_pipeline, settings_env, starter, write_list


async def test_submit_wait_json_prints_the_summary_or_the_cancelled_batch_with_exit_1(dev_env, db_url, sandbox, tmp_path):
    client = dev_env.client
    settings = make_settings(db_url, sandbox, batch_size=100)
    env = settings_env(settings, client.service_client.config.target_host)
    async with running_pipeline(client, settings) as p:
        done = write_list(tmp_path / "done.csv", [f"wait.{i}@x{i % 3}.example" for i in range(30)] + ["not-an-address"])
        code, out, err = await starter(env, "submit", str(done), "--user", "wanda", "--wait", "--json")
        assert code == 0, err
        doc = json.loads(out)
        assert doc["state"] == "completed" and doc["rows"] == 31 and doc["invalid"] == 1
        assert doc["invalid_rows"] == [{"row": 32, "reason": "missing @"}]  # line 32: after the header and 30
        assert doc["by_state"] == {"verified": 30, "invalid": 1}
        assert sum(doc["by_status"].values()) == 30

        # A file without rows is refused, and leaves no batch behind.
        for name, text in (("empty.csv", ""), ("header-only.csv", "email\n")):
            (tmp_path / name).write_text(text)
            code, out, err = await starter(env, "submit", str(tmp_path / name), "--user", "wanda", "--json")
            assert (code, out) == (2, "") and "has no rows (empty, or a header only)" in err, err
        assert p.sql("select count(*) from user_batches where name like '%%.csv' and name <> 'done.csv'") == [(0,)]

        # Without --json the first 10 invalid rows are printed with their lines, then where the rest are.
        bad = write_list(tmp_path / "bad.csv", ["ok@x.example"] + [f"bad{i}" for i in range(12)])
        code, out, err = await starter(env, "submit", str(bad), "--user", "wanda")
        assert code == 0, err
        ub = int(out.split()[2].rstrip(":"))
        assert f"user batch {ub}: 13 rows (12 invalid)" in out
        assert [ln.strip() for ln in err.splitlines() if ln.strip().startswith("line ")] == [
            f"line {n}: missing @" for n in range(3, 13)]
        assert f"... 2 more invalid rows: `starter.py results {ub} --status invalid`" in err

        # Held by a paused lane, then cancelled from another process while the CLI waits.
        code, _, err = await starter(env, "pause", "--lane", "deliverability")
        assert code == 0, err
        held = write_list(tmp_path / "held.csv", [f"held.{i}@x.example" for i in range(20)])
        waiting = asyncio.create_task(starter(env, "submit", str(held), "--user", "wanda", "--wait", "--json"))
        for _ in range(200):
            rows = p.sql("select id from user_batches where name = 'held.csv' and workflow_id is not null")
            if rows:
                break
            await asyncio.sleep(0.1)
        (ub,), = rows
        code, out, err = await starter(env, "cancel", str(ub))
        assert code == 0 and out.strip() == f"user batch {ub}: cancelled", (out, err)
        code, out, err = await asyncio.wait_for(waiting, timeout=60)
        assert code == 1, (out, err)
        doc = json.loads(out)  # the batch's id and state still reach a script
        assert doc["user_batch_id"] == ub and doc["workflow_id"] == f"user-batch-{ub}" and doc["rows"] == 20
        assert doc["state"] == "cancelled" and doc["error"]
        assert err.startswith(f"error: user batch {ub} is cancelled") and "Traceback" not in err
        assert p.sql("select state, count(*) from items where user_batch_id = %s group by 1", (ub,)) == [("cancelled", 20)]


async def test_a_list_due_later_is_not_started_early_by_pause_or_resume(dev_env, db_url, sandbox, tmp_path):
    """`submit --at`: before its time, pause and resume are refused with the start time (an update
    would have made Temporal start the workflow at once); cancel drops it."""
    client = dev_env.client
    settings = make_settings(db_url, sandbox, batch_size=100)
    env = settings_env(settings, client.service_client.config.target_host)
    async with running_pipeline(client, settings) as p:
        later = write_list(tmp_path / "later.csv", [f"later.{i}@x.example" for i in range(10)])
        at = (datetime.now(timezone.utc) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
        code, out, err = await starter(env, "submit", str(later), "--user", "lou", "--at", at, "--json")
        assert code == 0, err
        ub = json.loads(out)["user_batch_id"]
        for verb in ("pause", "resume"):
            code, out, err = await starter(env, verb, str(ub))
            assert code == 2 and f"user batch {ub} starts at " in err and "cancel" in err, (code, out, err)
        history = await client.get_workflow_handle(f"user-batch-{ub}").fetch_history()
        assert not any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED for e in history.events)
        assert p.sql("select state from user_batches where id = %s", (ub,)) == [("scheduled",)]
        code, out, err = await starter(env, "cancel", str(ub))
        assert code == 0 and out.strip() == f"user batch {ub}: cancelled", (out, err)
        assert p.sql("select state, count(*) from items where user_batch_id = %s group by 1", (ub,)) == [("cancelled", 10)]

"""Bad input at the entry points a person uses, end to end: `starter.py submit` (a subprocess, on
the dev server, with `--at` so that no worker is needed) and what `status` shows before prepare."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from helpers import make_settings, settings_env, starter


@pytest.fixture
async def env(dev_env, db_url, sandbox):
    yield settings_env(make_settings(db_url, sandbox), dev_env.client.service_client.config.target_host)
    # Ids restart at 1 in each test's database: end the delayed workflows, or the next test's would collide.
    with psycopg.connect(db_url) as conn:
        started = conn.execute("select workflow_id from user_batches where workflow_id is not null").fetchall()
    for (wid,) in started:
        with contextlib.suppress(Exception):
            await dev_env.client.get_workflow_handle(wid).terminate("test finished")


def _later() -> str:
    return (datetime.now(timezone.utc) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_bad_first_row_of_a_multi_column_list_is_reported_not_taken_for_a_header(env, tmp_path):
    listed = tmp_path / "f.csv"
    listed.write_text("Ann,not-an-address\nBob,bob@example.com\nCid,cid@example.com\n")
    code, out, err = await starter(env, "submit", str(listed), "--user", "rv", "--at", _later(), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["rows"], doc["invalid"], doc["invalid_rows"]) == (3, 1, [{"row": 1, "reason": "missing @"}])
    assert doc["header"] is None
    # Before prepare runs (here: days later) `status` already counts what submit reported.
    code, out, err = await starter(env, "status", str(doc["user_batch_id"]), "--json")
    assert code == 0, err
    assert (json.loads(out)["rows"], json.loads(out)["invalid"]) == (3, 1)

    headed = tmp_path / "h.csv"
    headed.write_text("Name,Work Email\nBob,bob@example.com\n")
    code, out, err = await starter(env, "submit", str(headed), "--user", "rv", "--at", _later())
    assert code == 0, err
    assert "header on line 1: Name, Work Email; addresses from column 2" in err


async def test_a_line_over_16_mib_is_an_invalid_row_and_an_open_quote_over_it_a_clean_refusal(env, tmp_path):
    huge = tmp_path / "huge.csv"
    huge.write_bytes(b"ann@x.example\n" + b"b" * (17 * 1024 * 1024) + b"\ncid@y.example\n")
    code, out, err = await starter(env, "submit", str(huge), "--user", "rv", "--at", _later(), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["rows"], doc["invalid"], [r["row"] for r in doc["invalid_rows"]]) == (3, 1, [2])
    assert doc["invalid_rows"][0]["reason"].startswith("line longer than 16 MiB")

    open_quote = tmp_path / "open.csv"
    open_quote.write_bytes(b'email,note\nann@x.example,"' + b"x\n" * (9 * 1024 * 1024))
    code, out, err = await starter(env, "submit", str(open_quote), "--user", "rv", "--at", _later())
    assert (code, out) == (2, ""), err
    assert "error: cannot read the row that starts on line 2" in err and "Traceback" not in err


async def test_a_column_number_in_non_ascii_digits_is_a_clean_refusal(env, tmp_path):
    listed = tmp_path / "l.csv"
    listed.write_text("name,email\nAnn,ann@x.example\n")
    code, out, err = await starter(env, "submit", str(listed), "--user", "rv", "--column", "\u00b2")
    assert (code, out) == (2, ""), err
    assert "column '\u00b2' not found in the header" in err and "Traceback" not in err

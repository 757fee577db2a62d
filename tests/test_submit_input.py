"""Bad input at the entry points a person uses, end to end: `starter.py submit` (a subprocess, on
the dev server, with `--at` so that no worker is needed) and what `status` shows before prepare."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from helpers import make_settings, settings_env, starter


@pytest.fixture
def env(dev_env, db_url, sandbox) -> dict[str, str]:
    return settings_env(make_settings(db_url, sandbox), dev_env.client.service_client.config.target_host)


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

    headed = tmp_path / "h.csv"
    headed.write_text("Name,Work Email\nBob,bob@example.com\n")
    code, out, err = await starter(env, "submit", str(headed), "--user", "rv", "--at", _later())
    assert code == 0, err
    assert "header on line 1: Name, Work Email; addresses from column 2" in err

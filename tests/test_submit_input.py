"""Bad input at the entry points a person uses, end to end: `starter.py submit` (a subprocess, on
the dev server, with `--at` so that no worker is needed) and what `status` shows before prepare."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from helpers import make_settings, settings_env, starter

ROOT = Path(__file__).resolve().parent.parent


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


def _submit_piped(env: dict[str, str], shell: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """`starter.py submit ...` through bash (for `<(...)`), its stdin fed from `stdin`."""
    proc = subprocess.run(["bash", "-c", shell], cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=60,
                          check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


async def test_a_gzip_list_is_read_from_a_file_stdin_or_a_pipe_with_the_line_numbers_of_its_text(
    env, db_url, tmp_path
):
    text = b"Name,Email\nAnn,ann@x.example\nBob,not-an-address\nCid,cid@y.example\n"
    packed = tmp_path / "list.csv.gz"
    packed.write_bytes(gzip.compress(text))
    later = _later()
    py = sys.executable
    runs = await asyncio.gather(
        starter(env, "submit", str(packed), "--user", "gz", "--at", later, "--json"),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit - --user gz --at {later} --json", text),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit - --user gz --at {later} --json",
                          gzip.compress(text)),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit <(gzip -dc '{packed}') --user gz"
                                              f" --at {later} --json"),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit <(cat '{packed}') --user gz --at {later}"),
    )
    for code, out, err in runs:
        assert code == 0, err
    for code, out, err in runs[:4]:
        doc = json.loads(out)
        assert (doc["rows"], doc["invalid"], doc["invalid_rows"]) == (3, 1, [{"row": 3, "reason": "missing @"}]), doc
        assert doc["header"] == {"line": 1, "names": ["Name", "Email"], "column": 2}
    assert "line 3: missing @" in runs[4][2]
    with psycopg.connect(db_url) as conn:
        sources = conn.execute("select source, name from user_batches").fetchall()
        piped = [s for s in sources if s[0].startswith("/dev/fd/")]  # bash's `<(...)`
        assert len(piped) == 2 and all(name == "pipe" for src, name in piped), sources
        assert sorted(set(sources) - set(piped)) == sorted([(str(packed), "list.csv.gz"), ("stdin", "stdin")])
        assert conn.execute("select count(*) from items").fetchone() == (15,)


async def test_a_broken_gzip_or_an_empty_stdin_is_a_clean_refusal_that_stores_nothing(env, db_url, tmp_path):
    packed = gzip.compress(b"email\n" + b"".join(f"u{i}@x.example\n".encode() for i in range(20_000)))
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(packed[: len(packed) // 2])
    py = sys.executable
    runs = await asyncio.gather(
        starter(env, "submit", str(cut), "--user", "gz", "--at", _later()),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit - --user gz --at {_later()}", packed[:-3]),
        asyncio.to_thread(_submit_piped, env, f"{py} starter.py submit - --user gz --at {_later()}", b""),
        starter(env, "submit", str(tmp_path / "missing.csv.gz"), "--user", "gz"),
    )
    (code, out, err), (code2, out2, err2), (code3, out3, err3), (code4, out4, err4) = runs
    assert (code, out) == (2, ""), err
    assert f"error: cannot read {cut}: its gzip data ends early" in err and "Traceback" not in err
    assert (code2, out2) == (2, ""), err2
    assert "error: cannot read stdin: its gzip data ends early" in err2 and "Traceback" not in err2
    assert (code3, out3) == (2, ""), err3
    assert "error: stdin has no rows" in err3
    assert (code4, out4) == (2, "") and "missing.csv.gz: no such file" in err4, err4
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*) from user_batches").fetchone() == (0,)

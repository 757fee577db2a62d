"""Hostile input end to end: every row ends terminal with a reason, rows in = rows out, and no
invalid address reaches the API. The per-quirk unit tests are in tests/test_ingest.py; this
file adds the 10 MB line and runs one file holding every quirk through the real pipeline."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from activities.ingest import UnreadableInput, iter_rows
from helpers import make_settings, running_pipeline
from test_ingest import _long_address
from workflows.models import Summary

TEN_MB = 10 * 1024 * 1024


def test_a_10_mb_line_is_one_invalid_row_and_the_rows_around_it_are_intact(tmp_path):
    path = tmp_path / "big.csv"
    path.write_bytes(b"email,note\nann@x.com,a\n" + b"b" * TEN_MB + b"@x.com,huge\ncid@y.com,c\n")
    got = list(iter_rows(path, None))
    assert [(r[0], r[2]) for r in got] == [(2, "ann@x.com"), (3, None), (4, "cid@y.com")]
    assert got[1][3] and "long" in got[1][3]  # a reason a person understands


SEVENTEEN_MB = 17 * 1024 * 1024  # over csv's field limit (16 MiB)


@pytest.mark.parametrize("long_line", [b"b" * SEVENTEEN_MB + b"@x.com,huge", b'"' + b"q" * SEVENTEEN_MB + b'",huge',
                                       b"Dan," + b"c" * SEVENTEEN_MB])
@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_a_line_over_16_mib_is_one_invalid_row_with_its_line_number(tmp_path, long_line, ending):
    path = tmp_path / "huge.csv"
    path.write_bytes(ending.join([b"email,note", b"ann@x.com,a", long_line, b"cid@y.com,c", b""]))
    got = list(iter_rows(path, None))
    assert [(r[0], r[2]) for r in got] == [(2, "ann@x.com"), (3, None), (4, "cid@y.com")]
    assert got[1][3].startswith("line longer than 16 MiB") and len(got[1][1]) == 1000


def test_a_long_last_line_without_a_newline_is_one_invalid_row(tmp_path):
    path = tmp_path / "huge.csv"
    path.write_bytes(b"ann@x.com\n" + b"b" * SEVENTEEN_MB)
    assert [(r[0], r[2]) for r in iter_rows(path, None)] == [(1, "ann@x.com"), (2, None)]


def test_a_quote_left_open_over_16_mib_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "open.csv"
    path.write_bytes(b'email,note\nann@x.com,a\ncid@y.com,"' + b"x\n" * (9 * 1024 * 1024) + b'"\n')
    with pytest.raises(UnreadableInput, match="line 3: field larger than field limit"):
        list(iter_rows(path, None))


# Each entry: one physical line (or a quoted multi-line row) and what it must become.
QUIRKS = [
    ("plain@example.com", "valid"),
    ('"quoted, with comma"@example.com', "invalid"),  # quotes in the local part: refused, not sent
    ("MAILTO:Upper@EXAMPLE.com", "valid"),
    ("upper@example.com.", "valid"),  # trailing dot
    ("user@bücher.de", "valid"),  # IDN -> punycode
    ("missing-at.example.com", "invalid"),
    ("@example.com", "invalid"),
    ("local@", "invalid"),
    ("two..dots@example.com", "invalid"),
    ("a" * 65 + "@example.com", "invalid"),
    ("spa ce@example.com", "invalid"),
    (_long_address(255), "invalid"),  # > 254 characters
    ("plain@example.com", "duplicate"),
    ("Plain@Example.COM", "valid"),  # another local-part case is another mailbox; the domain folds
    ("plain@EXAMPLE.com", "duplicate"),
]


async def test_a_file_with_every_quirk_ends_with_every_row_terminal_and_only_valid_addresses_sent(
    skipping_env, db_url, sandbox, tmp_path
):
    lines = ["\ufeffemail;name;extra"]  # BOM, `;` delimiter, an extra column
    for i, (address, _kind) in enumerate(QUIRKS):
        cell = f'"{address.replace(chr(34), chr(34) * 2)}"' if '"' in address or ";" in address else address
        lines.append(f"{cell};Name {i};x")
        if i == 3:
            lines.append("")  # blank line: not a row
    lines.append('newline@example.com;"two\nlines";x')  # a quoted field across lines
    body = "\r\n".join(lines).encode() + b"\r\n"
    body += b"j\xe9r\xf4me@latin1.example;latin-1 bytes;x\r\n"  # not UTF-8
    body += b"b" * TEN_MB + b"@x.com;huge;x\r\n"
    path = tmp_path / "quirks.csv"
    path.write_bytes(body)
    rows_in = len(QUIRKS) + 3
    valid = sum(kind == "valid" for _a, kind in QUIRKS) + 1

    async with running_pipeline(skipping_env.client, make_settings(db_url, sandbox, batch_size=100)) as p:
        handle = await p.submit_file(path, "quinn")
        summary: Summary = await asyncio.wait_for(handle.result(), timeout=60)

        assert summary.rows == rows_in and sum(summary.by_state.values()) == rows_in
        assert summary.by_state == {"verified": valid, "duplicate": 2, "invalid": rows_in - valid - 2}
        # Every invalid row says why; every duplicate says of which line.
        notes = p.sql("select state, note from item_outcomes where user_batch_id = %s and state <> 'verified'",
                      (summary.user_batch_id,))
        assert all(note for _state, note in notes), notes
        assert {note for state, note in notes if state == "duplicate"} == {"duplicate of line 2"}
        stats = httpx.get(f"{sandbox.url}/_sandbox/stats").json()
        assert stats["addresses_received"] == valid and stats["addresses_sent_twice"] == 0  # nothing invalid, nothing twice

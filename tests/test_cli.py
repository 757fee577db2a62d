"""`python starter.py ...` as a user runs it, against a real (embedded) Postgres.

The cases the README promises run `python starter.py` as a subprocess; the many variants run the
same Typer app in-process (typer.testing.CliRunner), since each interpreter start costs ~1 s of
imports. Temporal points at a port where nothing listens: these commands must not need it (or
must fail cleanly when they do). The submit happy path needs Temporal; test_end_to_end covers it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

import starter

ROOT = Path(__file__).resolve().parent.parent
NO_TEMPORAL = "127.0.0.1:1"  # connection refused at once
RESULT_HEADER = ("row,input,email,state,note,status,reason,score,accept_all,verified_at,"
                 "disposable,free,role,full_mailbox,provider,did_you_mean,toxicity")
NONE_FROM_THE_RECORD = ",,,,,,,"  # the seven columns from Bouncer's record, for a row without a result


@dataclass
class Run:
    args: tuple[str, ...]
    code: int
    out: str
    err: str


def _env(db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEMPORAL_", "DATABASE_", "BOUNCER_"))}
    env.pop("COLUMNS", None)  # as in a pipe or a CI log: Rich's default width
    env.update(DATABASE_URL=db_url, TEMPORAL_ADDRESS=NO_TEMPORAL, PYTHONUNBUFFERED="1")
    return env


def starter_many(db_url: str, *commands: tuple[str, ...], timeout: float = 60) -> list[Run]:
    """Run several `starter.py` commands at once (each is a fresh interpreter, ~1 s of imports)."""
    env = _env(db_url)
    procs = [
        subprocess.Popen([sys.executable, "starter.py", *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for args in commands
    ]
    runs = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        runs.append(Run(tuple(args), proc.returncode, out, err))
    return runs


def run_starter(db_url: str, *args: str) -> Run:
    return starter_many(db_url, args)[0]


def cli(db_url: str, *args: str, **env: str) -> Run:
    """The same app in this process: exit code, stdout and stderr kept apart; `env` sets variables."""
    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith(("TEMPORAL_", "BOUNCER_"))}
    overrides.update(DATABASE_URL=db_url, TEMPORAL_ADDRESS=NO_TEMPORAL, COLUMNS=None)
    overrides.update(env)
    result = CliRunner(env=overrides).invoke(starter.app, list(args), catch_exceptions=False)
    return Run(tuple(args), result.exit_code, result.stdout, result.stderr)


def assert_clean_error(run: Run, code: int, *needles: str) -> None:
    assert run.code == code, run
    assert "Traceback" not in run.err, run.err
    assert run.err.startswith("error: "), run.err
    for needle in needles:
        assert needle in run.err, run.err


def assert_one_line(run: Run) -> None:
    assert run.err.count("\n") == 1 and run.err.endswith("\n"), run.err


@pytest.fixture(scope="module")
def read_only_db(pg_server) -> str:
    """One fresh migrated database for the tests whose commands only read (or are refused before writing)."""
    name = f"cli_ro_{os.getpid()}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"create database {name} template pipeline_template")
    return pg_server.replace("/postgres?", f"/{name}?")


# ---- help -------------------------------------------------------------------------------------

COMMANDS = [("submit",), ("status",), ("results",), ("pause",), ("resume",), ("cancel",),
            ("dev",), ("dev", "up"), ("dev", "down"), ("dev", "status"), ("clean",), ("schedules",),
            ("schedules", "list"), ("schedules", "delete"), ("apikeys",), ("apikeys", "create"), ("apikeys", "revoke")]


def test_help_works_for_every_command(read_only_db):
    db_url = read_only_db
    for command in COMMANDS:
        run = cli(db_url, *command, "--help")
        assert run.code == 0, run
        assert "Usage" in run.out, run
        assert run.err == "", run
    assert "--user" in cli(db_url, "submit", "--help").out
    assert "--format" in cli(db_url, "results", "--help").out
    assert "--lane" in cli(db_url, "pause", "--help").out


def _readme_cli_entries() -> dict[str, str]:
    """The README's CLI block, by top-level command: the text of its lines (comments dropped)."""
    block = (ROOT / "README.md").read_text().split("\n## CLI\n", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        text = line.split("  #", 1)[0]
        if text.startswith("python starter.py "):
            current = text.split()[2]
        assert current, line
        entries[current] = entries.get(current, "") + " " + text
    return entries


def _leaf_commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's click classes are its own)
            yield from _leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_the_readme_cli_block_shows_every_command_and_option_and_only_those():
    """Every command and option of `starter.py` is in the README's CLI block, and every option
    the block names exists (a flag added or renamed without the README fails here)."""
    import typer.main

    entries = _readme_cli_entries()
    flag = re.compile(r"(?<![\w-])--?[a-z][a-z-]*")
    existing: dict[str, set[str]] = {}
    for path, command in _leaf_commands(typer.main.get_command(starter.app)):
        assert path[0] in entries, f"`starter.py {' '.join(path)}` is not in the README's CLI block"
        text = entries[path[0]]
        words = set(re.split(r"[\s|\[\]]+", text))
        assert set(path[1:]) <= words, f"`starter.py {' '.join(path)}` is not in the README's CLI block"
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            names = [o for o in [*param.opts, *param.secondary_opts] if o != "--help"]
            existing.setdefault(path[0], set()).update(names)
            if names:
                assert set(flag.findall(text)) & set(names), (
                    f"`starter.py {' '.join(path)}` option {'/'.join(names)} is not in the README's CLI block")
    for top, text in entries.items():
        unknown = set(flag.findall(text)) - existing.get(top, set())
        assert not unknown, f"the README's CLI block names options `starter.py {top}` does not have: {unknown}"


# ---- bad input: exit 2, one clean line --------------------------------------------------------


def test_the_real_entry_point_help_and_bad_input(db_url, tmp_path):
    """`python starter.py`: help, unknown ids and refused submissions exit 2 with one line, no traceback."""
    listed = tmp_path / "ok.csv"
    listed.write_text("email\na@b.com\n")
    assert not (ROOT / "missing.csv").exists()
    top, status, results, missing, bogus = starter_many(
        db_url,
        ("--help",),
        ("status", "999999", "--json"),
        ("results", "999999"),
        ("submit", "missing.csv", "--user", "u"),
        ("submit", str(listed), "--user", "u", "--lanes", "bogus"),
    )
    assert top.code == 0 and top.err == "", top
    for name in ("submit", "status", "results", "pause", "resume", "cancel", "dev"):
        assert name in top.out
    assert_clean_error(status, 2, "no user batch 999999")
    assert status.out == ""
    assert_clean_error(results, 2, "no user batch 999999")
    assert results.out == ""
    assert_clean_error(missing, 2, "missing.csv")
    assert_clean_error(bogus, 2, "bogus", "deliverability")
    for run in (status, results, missing, bogus):
        assert_one_line(run)
    with psycopg.connect(db_url) as conn:  # nothing was stored by the refused submissions
        assert conn.execute("select count(*) from user_batches").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("results", "999999", "--format", "json"), ("no user batch 999999",)),
        (("results", "1", "--status", "bogus"), ("--status 'bogus' is not one of deliverable, risky,",)),
        (("status", "999999"), ("no user batch 999999",)),
        (("submit", "{tmp}/list.csv", "--user", "u", "--lanes", ","), ("unknown lane (none)",)),
        (("submit", "{tmp}/list.csv", "--user", "u", "--lanes", "deliverability,nope"), ("nope",)),
        (("submit", "{tmp}", "--user", "u"), ("it is a directory",)),
        (("submit", "{tmp}/missing.csv", "--user", "u"), ("no such file",)),
        (("submit", "{tmp}/list.csv", "--user", "  "), ("--user is empty",)),
        (("submit", "{tmp}/list.csv", "--user", "u", "--every", ""), ("cannot read duration ''",)),
        (("submit", "{tmp}/list.csv", "--user", "u", "--every", "99999999d"), ("longer than 100 years",)),
        (("clean", "--older-than", "99999999999d"), ("longer than 100 years",)),
        (("events", "subscribe", "--topic", "*", "--url", "http://", "--secret", "s" * 16), ("with a host",)),
        (("events", "subscribe", "--topic", "*", "--url", "http://h:99999/x", "--secret", "s" * 16), ("not a URL",)),
        (("events", "subscribe", "--topic", "*", "--url", "http://exa mple.com/", "--secret", "s" * 16),
         ("whitespace",)),
        (("events", "subscribe", "--topic", "*", "--url", "https://h.example/", "--secret", "s" * 16, "--user", ""),
         ("--user is empty",)),
        (("events", "list", "--state", "bogus"), ("not one of pending, delivered, failed",)),
        (("events", "list", "--limit", "-1"), ("--limit -1",)),
        (("dlq", "list", "--limit", "0"), ("--limit 0",)),
        (("events", "retry", "99999"), ("no delivery 99999",)),
        (("cap", "", "5"), ("the user is empty",)),
        (("cap", "ann", "--", "-1"), ("cap -1 is negative",)),
        (("pause",), ("USER_BATCH_ID",)),
        (("status", "1", "--watch", "--count", "1"), ("--watch redraws the overview", "leave out 1")),
        (("status", "--watch", "--json", "--count", "1"), ("give one of them",)),
        (("status", "--watch", "--interval", "0", "--count", "1"), ("--interval 0",)),
        (("status", "--watch", "--count", "-1"), ("--count -1",)),
        (("resume", "1", "--lane", "deliverability"), ("not both",)),
        (("pause", "--lane", "bogus"), ("unknown lane bogus",)),
        (("pause", "999999"), ("no user batch 999999",)),
        (("resume", "999999"), ("no user batch 999999",)),
        (("cancel", "999999"), ("no user batch 999999",)),
    ],
)
def test_more_bad_input_exits_2(read_only_db, tmp_path, args, needles):
    (tmp_path / "list.csv").write_text("email\na@b.com\n")
    run = cli(read_only_db, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_clean_error(run, 2, *needles)
    assert run.out == ""
    with psycopg.connect(read_only_db) as conn:  # refused before anything was stored
        assert conn.execute("select count(*) from user_batches").fetchone()[0] == 0




@pytest.mark.parametrize("command", ["pause", "resume"])
def test_pause_or_resume_without_a_target_says_what_to_give_not_that_both_were_given(read_only_db, command):
    run = cli(read_only_db, command)
    assert_clean_error(run, 2, "give a USER_BATCH_ID, or --lane L", "deliverability")
    assert "not both" not in run.err, run.err
    assert_one_line(run)


def test_dev_up_without_a_worker_promises_no_metrics_endpoint(read_only_db, monkeypatch):
    """The metrics URL is the worker's: `dev up --no-worker` printed it although nothing served it."""
    from devstack import DevStack

    monkeypatch.setattr(DevStack, "up", lambda self, worker=True: None)
    without, with_worker = cli(read_only_db, "dev", "up", "--no-worker"), cli(read_only_db, "dev", "up")
    assert without.code == 0 and with_worker.code == 0, (without, with_worker)
    assert "/metrics" not in without.out and "no worker" in without.out, without.out
    assert "http://127.0.0.1:9464/metrics" in with_worker.out.replace("\n", ""), with_worker.out


def test_error_for_a_missing_file_with_a_long_path_is_one_line_naming_the_file(read_only_db, tmp_path):
    missing = tmp_path / "a-rather-long-folder-name-as-uploads-get" / "leads-2026-11-22-export-final.csv"
    run = cli(read_only_db, "submit", str(missing), "--user", "u")
    assert_clean_error(run, 2, str(missing))
    assert_one_line(run)


def test_unreachable_postgres_exits_1_with_one_line(tmp_path):
    run = cli(f"postgresql://postgres@/nodb?host={tmp_path}", "status", "1", "--json")
    assert_clean_error(run, 1, "cannot reach Postgres")
    assert_one_line(run)


def test_submit_with_temporal_down_leaves_no_batch_waiting_forever(db_url, tmp_path):
    listed = tmp_path / "list.csv"
    listed.write_text("email\na@b.com\nc@d.com\n")
    run = run_starter(db_url, "submit", str(listed), "--user", "u")
    assert run.code == 1, run
    assert "cannot reach Temporal" in run.err and "Traceback" not in run.err
    with psycopg.connect(db_url) as conn:
        states = [s for (s,) in conn.execute("select state from user_batches").fetchall()]
    assert states in ([], ["failed"])


# ---- results ---------------------------------------------------------------------------------


@pytest.fixture
def batch(db_url) -> int:
    """A user batch made directly in the database: five rows, one verified address (two rows name it)."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        (ub,) = conn.execute(
            "insert into user_batches (user_id, name, state, rows_total, invalid, duplicates, workflow_id)"
            " values ('ann', 'leads.csv', 'queued', 5, 1, 1, 'user-batch-x') returning id"
        ).fetchone()
        (aid,) = conn.execute("insert into addresses (email) values ('Ann@x.com') returning id").fetchone()
        conn.execute("insert into addresses (email) values ('bob@y.com')")
        conn.execute(
            "insert into results (address_id, lane, status, reason, score, accept_all, record, verified_at)"
            " values (%s, 'deliverability', 'deliverable', 'accepted_email', 100, 'no',"
            " '{\"domain\": {\"disposable\": \"no\", \"free\": \"yes\"}, \"account\": {\"role\": \"no\","
            " \"fullMailbox\": \"no\"}, \"provider\": \"x.com\", \"toxicity\": 0}',"
            " '2026-01-02T03:04:05+00:00')",
            (aid,),
        )
        # Inserted out of order: the output follows row numbers.
        with conn.cursor().copy("copy items (user_batch_id, row_no, raw, email, state, reason) from stdin") as copy:
            for row in [
                (ub, 6, "bob@y.com", "bob@y.com", "pending", None),
                (ub, 2, " Ann@X.com ", "Ann@x.com", "pending", None),
                (ub, 4, "not, an address", None, "invalid", "missing @"),
                (ub, 5, "ANN@x.com.", "Ann@x.com", "duplicate", "duplicate of line 2"),
                (ub, 3, "cid@z.com", "cid@z.com", "cancelled", "user batch cancelled"),
            ]:
                copy.write_row(row)
    return ub


def test_results_csv_has_the_header_and_one_line_per_row_in_row_order(db_url, batch, tmp_path):
    full = run_starter(db_url, "results", str(batch))  # the real entry point
    invalid = cli(db_url, "results", str(batch), "--status", "invalid")
    deliverable = cli(db_url, "results", str(batch), "--status", "deliverable", "--user", "ann")
    as_json = cli(db_url, "results", str(batch), "--format", "json")
    other_user = cli(db_url, "results", str(batch), "--user", "bob")
    to_file = cli(db_url, "results", str(batch), "-o", str(tmp_path / "out.csv"))
    assert full.code == 0, full
    lines = full.out.splitlines()
    assert lines[0] == RESULT_HEADER
    assert lines[1:] == [
        '2, Ann@X.com ,Ann@x.com,verified,,deliverable,accepted_email,100,no,2026-01-02T03:04:05+00:00,'
        'no,yes,no,no,x.com,,0',
        "3,cid@z.com,cid@z.com,cancelled,user batch cancelled,,,,," + NONE_FROM_THE_RECORD,
        '4,"not, an address",,invalid,missing @,,,,,' + NONE_FROM_THE_RECORD,
        "5,ANN@x.com.,Ann@x.com,duplicate,duplicate of line 2,deliverable,accepted_email,100,no,"
        "2026-01-02T03:04:05+00:00,no,yes,no,no,x.com,,0",
        "6,bob@y.com,bob@y.com,pending,,,,,," + NONE_FROM_THE_RECORD,
    ]
    parsed = list(csv.DictReader(io.StringIO(full.out)))
    assert [r["row"] for r in parsed] == ["2", "3", "4", "5", "6"]

    assert invalid.code == 0
    assert invalid.out.splitlines() == [RESULT_HEADER,
                                        '4,"not, an address",,invalid,missing @,,,,,' + NONE_FROM_THE_RECORD]
    assert deliverable.code == 0
    assert [ln.split(",")[0] for ln in deliverable.out.splitlines()[1:]] == ["2", "5"]

    assert as_json.code == 0, as_json
    docs = json.loads(as_json.out)
    assert [d["row"] for d in docs] == [2, 3, 4, 5, 6]
    assert list(docs[0]) == RESULT_HEADER.split(",")
    assert docs[0]["status"] == "deliverable" and docs[0]["score"] == 100
    assert (docs[0]["free"], docs[0]["provider"], docs[0]["did_you_mean"], docs[0]["toxicity"]) == ("yes", "x.com", None, 0)
    assert docs[2] == {"row": 4, "input": "not, an address", "email": None, "state": "invalid", "note": "missing @",
                       "status": None, "reason": None, "score": None, "accept_all": None, "verified_at": None,
                       **dict.fromkeys(RESULT_HEADER.split(",")[10:])}

    assert_clean_error(other_user, 2, f"no user batch {batch} for user bob")

    assert to_file.code == 0, to_file
    assert to_file.out == ""
    assert "5 rows written" in to_file.err
    assert (tmp_path / "out.csv").read_text().splitlines() == lines


def test_results_take_several_statuses_and_chosen_columns_and_refuse_unknown_ones_by_name(db_url, batch):
    several = cli(db_url, "results", str(batch), "--status", "deliverable,invalid", "--columns", "row,status,email")
    as_json = cli(db_url, "results", str(batch), "--status", "cancelled, pending", "--columns", "email,row",
                  "--format", "json")
    assert several.code == 0 and as_json.code == 0, (several, as_json)
    assert several.out.splitlines() == ["row,status,email", "2,deliverable,Ann@x.com", "4,,", "5,deliverable,Ann@x.com"]
    assert json.loads(as_json.out) == [{"email": "cid@z.com", "row": 3}, {"email": "bob@y.com", "row": 6}]
    # Without `row`: still in input order (the JSON formats sorted by the `row` column).
    for fmt, parse in (("json", json.loads), ("jsonl", lambda out: [json.loads(line) for line in out.splitlines()])):
        rowless = cli(db_url, "results", str(batch), "--columns", "state,email", "--format", fmt)
        assert rowless.code == 0, rowless
        in_order = json.loads(cli(db_url, "results", str(batch), "--columns", "row,state,email", "--format", "json").out)
        assert [d["row"] for d in in_order] == [2, 3, 4, 5, 6]
        assert parse(rowless.out) == [{"state": d["state"], "email": d["email"]} for d in in_order], fmt
    for args, message in ((("--status", "risky,great"), "--status 'great' is not one of deliverable, risky,"),
                          (("--columns", "email,catchall_status"),
                           "--columns: column 'catchall_status' is not one of row, input, email,"),
                          (("--columns", "email,,status"), "--columns: column '' is not one of"),
                          (("--columns", "email,email"), "--columns: a column is named twice")):
        assert_clean_error(cli(db_url, "results", str(batch), *args), 2, message)


def test_results_keep_inputs_that_need_quoting_or_escaping_exactly_in_csv_and_json(db_url, batch, tmp_path):
    """Postgres renders the rows (COPY's CSV, json_build_object): commas, quotes, backslashes,
    line breaks and non-ASCII text come back as they went in, in both formats."""
    odd = ['a "quoted", name <x@y.com>', "back\\slash@x", "two\nlines@x", "tab\there@x", "jürgen@bücher.de"]
    with psycopg.connect(db_url) as conn, conn.transaction(), conn.cursor().copy(
            "copy items (user_batch_id, row_no, raw, email, state, reason) from stdin") as copy:
        for i, raw in enumerate(odd):
            copy.write_row((batch, 10 + i, raw, None, "invalid", f"reason {i}: \"{raw}\""))
    as_csv = cli(db_url, "results", str(batch), "--status", "invalid", "-o", str(tmp_path / "odd.csv"))
    as_json = cli(db_url, "results", str(batch), "--status", "invalid", "--format", "json",
                  "-o", str(tmp_path / "odd.json"))
    none = cli(db_url, "results", str(batch), "--status", "risky", "--format", "json")
    assert as_csv.code == 0 and as_json.code == 0 and none.code == 0, (as_csv, as_json, none)
    assert "6 rows written" in as_csv.err and "6 rows written" in as_json.err
    with (tmp_path / "odd.csv").open(newline="", encoding="utf-8") as f:
        parsed = list(csv.DictReader(f))
    docs = json.loads((tmp_path / "odd.json").read_text(encoding="utf-8"))
    lines = cli(db_url, "results", str(batch), "--status", "invalid", "--format", "jsonl")
    assert lines.code == 0, lines
    assert [json.loads(line) for line in lines.out.splitlines()] == docs  # JSON Lines: the same objects, a line each
    for rows in (parsed, docs):
        assert [r["input"] for r in rows] == ["not, an address", *odd]
        assert [r["note"] for r in rows][1:] == [f"reason {i}: \"{raw}\"" for i, raw in enumerate(odd)]
    assert [d["row"] for d in docs] == [4, 10, 11, 12, 13, 14]
    assert json.loads(none.out) == []
    assert cli(db_url, "results", str(batch), "--status", "risky", "--format", "jsonl").out == ""


def test_results_to_a_path_that_cannot_be_written_is_one_clean_line(db_url, batch, tmp_path):
    for target, reason in ((tmp_path / "no-such-folder" / "out.csv", "No such file or directory"),
                           (tmp_path, "Is a directory")):
        run = cli(db_url, "results", str(batch), "-o", str(target))
        assert_clean_error(run, 2, f"cannot write {target}: {reason}")
        assert_one_line(run)


@pytest.mark.parametrize("state", ["completed", "cancelled", "failed"])
def test_pause_resume_and_cancel_of_a_finished_batch_exit_2_naming_its_state(db_url, batch, state):
    """Refused before Temporal is asked (the CLI's Temporal address refuses connections here)."""
    with psycopg.connect(db_url) as conn:
        conn.execute("update user_batches set state = %s where id = %s", (state, batch))
    for command, needle in (("pause", f"is {state}; it cannot be paused"),
                            ("resume", f"is {state}; it cannot be resumed"),
                            ("cancel", f"is already {state}")):
        run = cli(db_url, command, str(batch))
        assert_clean_error(run, 2, f"user batch {batch} {needle}")
        assert_one_line(run)


def test_results_of_a_batch_without_rows(db_url):
    with psycopg.connect(db_url) as conn:
        (ub,) = conn.execute("insert into user_batches (user_id) values ('ann') returning id").fetchone()
    csv_run = cli(db_url, "results", str(ub))
    json_run = cli(db_url, "results", str(ub), "--format", "json")
    status_run = cli(db_url, "status", str(ub), "--json")
    assert csv_run.code == 0 and csv_run.out == RESULT_HEADER + "\n"
    assert json_run.code == 0 and json.loads(json_run.out) == []
    assert status_run.code == 0, status_run
    doc = json.loads(status_run.out)
    assert doc["user_batch_id"] == ub and doc["user"] == "ann" and doc["state"] == "receiving"
    assert doc["lane_progress"] == []


def test_results_into_a_pipe_closed_early_ends_quietly_and_successfully(db_url):
    """`results N | head`: the reader leaves after a few lines; the command ends at once, exit 0, no error."""
    with psycopg.connect(db_url) as conn, conn.transaction():
        (ub,) = conn.execute(
            "insert into user_batches (user_id, name, state, rows_total, workflow_id)"
            " values ('ann', 'big.csv', 'queued', 200000, 'user-batch-big') returning id"
        ).fetchone()
        conn.execute(
            "insert into items (user_batch_id, row_no, raw, email, state)"
            " select %s, g, 'a' || g || '@x.com', 'a' || g || '@x.com', 'pending' from generate_series(2, 200001) g",
            (ub,),
        )
    env = _env(db_url)
    for fmt in ("csv", "jsonl"):
        proc = subprocess.Popen([sys.executable, "starter.py", "results", str(ub), "--format", fmt], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = [proc.stdout.readline() for _ in range(3)]
        proc.stdout.close()  # as `head -3` does
        code = proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        assert b"a2@x.com" in b"".join(first)
        assert (fmt, code, err) == (fmt, 0, "")

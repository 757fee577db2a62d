"""What every benchmark shares: an isolated embedded stack, list generation, submission, audits."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg

from devstack import ROOT, DevStack, free_port


@contextlib.contextmanager
def bench_stack(
    sandbox_args: list[str], worker_env: dict[str, str], workers: int = 1, callbacks: bool = True,
    sql_stats: bool = False,
) -> Iterator[DevStack]:
    """Postgres, Temporal dev server, sandbox and `workers` worker processes on free ports
    (`workers=0`: none, for benchmarks that only store lists).

    `callbacks=False`: no worker serves or advertises a callback receiver (polling only).
    `sql_stats`: Postgres loads pg_stat_statements (read with `top_statements`).
    """
    root = Path(tempfile.mkdtemp(prefix="bench-"))
    os.chmod(root, 0o755)  # the embedded Postgres runs as its own system user when we are root
    st = DevStack(root, temporal_port=free_port(), ui_port=free_port(), sandbox_args=sandbox_args, worker_env=worker_env)
    try:
        # Temporal first: its dev server also listens on ports of its own choosing, so ports picked
        # before it started could be taken by then ("cannot start the Bouncer sandbox: port ... is
        # already in use" once in a run of benchmarks).
        st.start_temporal()
        st.sandbox_port, st.callback_port = free_port(), free_port()
        st.up(worker=False)
        if sql_stats:
            with psycopg.connect(st.database_url, autocommit=True) as conn:
                conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
                conn.execute("alter system set pg_stat_statements.track = 'all'")
            st.restart_postgres()
            with psycopg.connect(st.database_url, autocommit=True) as conn:
                conn.execute("create extension if not exists pg_stat_statements")
        if workers > 0:
            st.start_worker("worker", callbacks=callbacks, advertise=False)
        for i in range(2, workers + 1):
            st.start_worker(f"worker-{i}", callbacks=False, advertise=callbacks)
        yield st
    finally:
        st.down()
        if os.environ.get("BENCH_KEEP"):  # the stack's logs and data, to look into a run
            print(f"bench stack kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def write_lists(folder: Path, users: int, per_user: int, tag: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for u in range(users):
        path = folder / f"user{u}.csv"
        with path.open("w") as f:
            f.write("email,first_name\n")
            f.writelines(f"u{u}.{tag}.{i}@company{i % 997}.example,Name {i}\n" for i in range(per_user))
        paths.append(path)
    return paths


def submit(st: DevStack, path: Path, user: str, *extra: str) -> dict:
    """`starter.py submit ... --json` as a real process; adds its peak RSS (MB) to the result."""
    proc = subprocess.Popen(
        [sys.executable, "starter.py", "submit", str(path), "--user", user, "--json", *extra],
        cwd=ROOT, env={**os.environ, **st.env()}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"submit {path} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {**orjson.loads(out), "peak_rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def wait_completed(st: DevStack, user_batch_ids: list[int], timeout: float) -> float:
    """Block until every listed user batch is completed; returns the monotonic time it happened."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(st.database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            (done,) = conn.execute(
                "select count(*) from user_batches where id = any(%s) and state = 'completed'", (user_batch_ids,)
            ).fetchone()
            if done == len(user_batch_ids):
                return time.monotonic()
            time.sleep(0.05)
    raise TimeoutError(f"user batches not completed within {timeout:.0f}s; see {st.root}/worker.log")


def peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def proc_cpu_s(pid: int, reaped: bool = True) -> float:
    """CPU seconds of a process (utime + stime), with `reaped` its waited-for children's too;
    OSError if it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11 : 15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    total = 0.0
    with contextlib.suppress(OSError):
        total += proc_cpu_s(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    total += tree_cpu_s(int(child))
    return total


def cpu_seconds(st: DevStack) -> dict[str, float]:
    """CPU seconds used so far by each part of a stack (Postgres: postmaster and its backends)."""
    parts = {name: st.pid(name) for name in ("temporal", "sandbox")}
    parts.update({p.stem: st.pid(p.stem) for p in st.root.glob("worker*.pid")})
    with contextlib.suppress(OSError, ValueError):
        parts["postgres"] = int((st.pgdata / "postmaster.pid").read_text().split()[0])
    return {name: round(tree_cpu_s(pid), 1) for name, pid in parts.items() if pid}


class CpuMeter:
    """CPU seconds used by each part of the stack between `start()` and `stop()`, and the
    machine's busy share over the same time (2 cores: 1.0 = both busy)."""

    def __init__(self, st: DevStack) -> None:
        self.st = st

    @staticmethod
    def _machine() -> tuple[int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(cpu) - cpu[3] - cpu[4], sum(cpu)  # busy, all (idle and iowait are not busy)

    @staticmethod
    def _busy_share(before: tuple[int, int], after: tuple[int, int], digits: int) -> float:
        """The machine's busy share between two `_machine()` readings."""
        return round((after[0] - before[0]) / max(after[1] - before[1], 1), digits)

    def start(self, sample_s: float = 0.0) -> None:
        """`sample_s` > 0: also record the machine's busy share every `sample_s` seconds."""
        self._t0 = time.monotonic()
        self._first = cpu_seconds(self.st), self._machine()
        self._samples: list[float] = []
        self._stopped = threading.Event()
        if sample_s > 0:
            self._sampler = threading.Thread(target=self._sample, args=(sample_s,), daemon=True)
            self._sampler.start()

    def _sample(self, every_s: float) -> None:
        before = self._machine()
        while not self._stopped.wait(every_s):
            after = self._machine()
            self._samples.append(self._busy_share(before, after, 2))
            before = after

    def stop(self) -> dict:
        self._stopped.set()
        (a, machine0), b, machine1 = self._first, cpu_seconds(self.st), self._machine()
        return {"cpu_s": {name: round(v - a.get(name, 0.0), 1) for name, v in b.items()},
                "wall_s": round(time.monotonic() - self._t0, 1),
                "machine_busy": self._busy_share(machine0, machine1, 3),
                **({"machine_busy_samples": self._samples} if self._samples else {})}


class PgCpuSampler:
    """Postgres CPU by statement (`bench pipeline --sql-stats`).

    Every `every_s`, each backend's CPU since the last look (/proc) goes to the statement
    pg_stat_activity shows for it: the running one, or for an idle backend the last one, so
    statements shorter than the interval are charged to the last of them (`COMMIT` collects
    some). Background processes go by type (autovacuum worker, walwriter, ...). Unlike
    pg_stat_statements' times, which are wall time under contention, this is where the two
    cores went. Its own cost: ~50 small queries a second.
    """

    def __init__(self, st: DevStack, every_s: float = 0.02) -> None:
        self.st, self.every_s = st, every_s
        self._cpu: dict[str, float] = {}
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PgCpuSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        last: dict[int, float] = {}
        with psycopg.connect(self.st.database_url, autocommit=True) as conn:
            me = conn.info.backend_pid
            while not self._stopped.wait(self.every_s):
                rows = conn.execute(
                    "select pid, case when backend_type = 'client backend'"
                    " then left(regexp_replace(query, '\\s+', ' ', 'g'), 100) else backend_type end"
                    " from pg_stat_activity where pid <> %s", (me,),
                ).fetchall()
                for pid, what in rows:
                    with contextlib.suppress(OSError):
                        used = proc_cpu_s(pid, reaped=False)
                        if pid in last:
                            self._cpu[what] = self._cpu.get(what, 0.0) + used - last[pid]
                        last[pid] = used

    def stop(self, n: int = 20) -> list[dict]:
        """The `n` statements (or process types) that used the most CPU, with their share."""
        self._stopped.set()
        self._thread.join()
        total = sum(self._cpu.values()) or 1.0
        top = sorted(self._cpu.items(), key=lambda kv: -kv[1])[:n]
        return [{"cpu_s": round(v, 2), "share": round(v / total, 3), "what": k} for k, v in top]


def top_statements(database_url: str, n: int = 20) -> list[dict]:
    """The `n` statements that took the most execution time (pg_stat_statements)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select calls, round(total_exec_time)::bigint, rows, temp_blks_written, round(wal_bytes / 1048576),"
            " left(regexp_replace(query, '\\s+', ' ', 'g'), 160)"
            " from pg_stat_statements where toplevel order by total_exec_time desc limit %s",
            (n,),
        ).fetchall()
    return [{"calls": c, "total_ms": ms, "rows": r, "temp_blks_written": t, "wal_mb": int(w), "query": q}
            for c, ms, r, t, w, q in rows]


def io_stats(database_url: str) -> dict:
    """Where Postgres wrote since the stack started (pg_stat_io: MB written or extended, writes
    and fsyncs per backend type, object (relation, temp relation, wal) and context)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "select backend_type, object, context,"
            " round(sum(coalesce(write_bytes, 0) + coalesce(extend_bytes, 0)) / 1048576.0),"
            " sum(coalesce(writes, 0)), sum(coalesce(fsyncs, 0))"
            " from pg_stat_io group by 1, 2, 3"
            " having sum(coalesce(write_bytes, 0) + coalesce(extend_bytes, 0)) > 1048576 order by 4 desc"
        ).fetchall()
    return {f"{b}/{o}/{c}": {"mb": int(mb), "writes": int(w), "fsyncs": int(f)} for b, o, c, mb, w, f in rows}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


def payloads(message, skip: tuple[str, ...] = ()) -> Iterator:
    """Every `Payload` message nested anywhere in a protobuf message (e.g. a history event),
    except under fields named in `skip` (e.g. `search_attributes`, which codecs never encode)."""
    from temporalio.api.common.v1 import Payload

    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE or field.name in skip:
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values())
        elif hasattr(value, "ListFields"):
            items = [value]
        else:
            items = list(value)  # a repeated field
        for item in items:
            if not hasattr(item, "ListFields"):
                continue
            if isinstance(item, Payload):
                yield item
            else:
                yield from payloads(item, skip)


def _payload_sizes(message) -> Iterator[int]:
    return (p.ByteSize() for p in payloads(message))


async def history_limits(client) -> dict:
    """Largest history (events) and largest single payload (bytes) over every workflow run, and
    the events of all runs per workflow type (`history_events_by_type`)."""
    max_events = max_payload = runs = 0
    by_type: dict[str, int] = {}  # all events, per workflow type: where the server's work goes
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        runs += 1
        max_events = max(max_events, len(history.events))
        by_type[wf.workflow_type] = by_type.get(wf.workflow_type, 0) + len(history.events)
        for event in history.events:
            for size in _payload_sizes(event):
                max_payload = max(max_payload, size)
    return {"workflow_runs": runs, "max_history_events": max_events, "max_payload_bytes": max_payload,
            "history_events_by_type": dict(sorted(by_type.items()))}


# An address as it could appear in a payload or failure message; the scan then checks candidates
# (and every suffix of their local part: protobuf framing bytes may precede a string) against a set.
_ADDRESS = re.compile(rb"[a-z0-9._%+'!#$&*=?^`{|}~/-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+")


def _leaked(raw: bytes, addresses: set[str]) -> set[str]:
    found = set()
    for match in _ADDRESS.finditer(raw.lower()):
        text = match.group().decode("ascii", "replace")
        local, _, domain = text.partition("@")
        for i in range(len(local)):
            if f"{local[i:]}@{domain}" in addresses:
                found.add(f"{local[i:]}@{domain}")
                break
    return found


async def addresses_in_histories(client, addresses: set[str]) -> dict:
    """Invariant 1 audit: scan the raw protobuf of every event of every workflow run (payload
    bytes appear there undecoded) for any of `addresses` (lower-case). Returns the runs scanned,
    how many of them carried payloads at all, and the addresses found (must be none)."""
    runs = with_payloads = 0
    leaked: set[str] = set()
    async for wf in client.list_workflows():
        history = await client.get_workflow_handle(wf.id, run_id=wf.run_id).fetch_history()
        raw = b"".join(e.SerializeToString() for e in history.events)
        runs += 1
        with_payloads += any(True for e in history.events for _ in _payload_sizes(e))
        leaked |= _leaked(raw, addresses)
    return {"runs": runs, "runs_with_payloads": with_payloads, "leaked": sorted(leaked)}

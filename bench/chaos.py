"""`python -m bench chaos`: the embedded stack under faults, then an audit of what came out.

Faults (each can be switched off): worker processes SIGKILLed at random moments and restarted;
a second worker for part of the run; the Temporal dev server stopped and restarted (its SQLite
file keeps the state); Postgres stopped and restarted; the sandbox answering a share of requests
with 503, 429 + Retry-After, answers slower than our HTTP timeout and dropped connections
(before handling, then after handling: the ambiguous case), and a credit exhaustion episode
(402) that ends when credits are topped up through the sandbox's admin API.

The audit reads Postgres and the sandbox's own record (`/_sandbox/stats`): every input row
terminal, none lost, one outcome per row, nothing sent to the API again once its result had
been downloaded, and no submitted address in any Temporal history.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from bench.common import addresses_in_histories, bench_stack, submit
from devstack import DevStack

TERMINAL = ("verified", "invalid", "duplicate", "cancelled", "failed")
SLOTS = 15


@dataclass
class Faults:
    kills: int = 6  # worker SIGKILLs (each followed by a restart)
    second_worker: bool = True
    temporal_restart: bool = True
    postgres_restart: bool = True
    api_faults: bool = True  # 5xx, 429, slow, dropped connections
    credits_episode: bool = True

    @classmethod
    def none(cls) -> Faults:
        return cls(0, False, False, False, False, False)


@dataclass
class Timeline:
    """What was done when (seconds from the start of the fault schedule)."""

    began: float = field(default_factory=time.monotonic)
    log: list[tuple[float, str]] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.log.append((round(time.monotonic() - self.began, 1), what))


def write_chaos_lists(folder: Path, addresses: int, users: int, tag: str) -> list[Path]:
    """`users` CSV lists with `addresses` rows in all: mostly unique addresses, plus 1% shared
    with the next user's list (pay once across lists), 0.5% repeated within a list and 0.5%
    invalid rows (never sent to the API)."""
    folder.mkdir(parents=True, exist_ok=True)
    per_user = addresses // users
    paths = []
    for u in range(users):
        path = folder / f"user{u}.csv"
        with path.open("w") as f:
            f.write("email,name\n")
            for i in range(per_user):
                if i % 200 == 7:
                    f.write(f"not-an-address-{i},bad\n")
                elif i % 200 == 11:
                    f.write(f"u{u}.{tag}.{i - 4}@company{(i - 4) % 997}.example,again\n")
                elif i % 100 == 3:
                    f.write(f"shared.{tag}.{(u + 1) % users}.{i}@partner{i % 31}.example,shared\n")
                elif i % 100 == 5:
                    f.write(f"shared.{tag}.{u}.{i - 2}@partner{(i - 2) % 31}.example,shared\n")
                else:
                    f.write(f"u{u}.{tag}.{i}@company{i % 997}.example,n{i}\n")
        paths.append(path)
    return paths


class Chaos:
    def __init__(self, st: DevStack, faults: Faults, duration: float, seed: int, timeout_s: float) -> None:
        self.st = st
        self.faults = faults
        self.duration = duration
        self.random = random.Random(seed)
        self.timeline = Timeline()
        self.applied: dict[str, int] = {}
        self.timeout_s = timeout_s
        self.admin = httpx.Client(base_url=st.sandbox_url, timeout=10)

    def _count(self, kind: str) -> None:
        self.applied[kind] = self.applied.get(kind, 0) + 1

    def schedule(self) -> list[tuple[float, str]]:
        d, f = self.duration, self.faults
        plan: list[tuple[float, str]] = []
        if f.api_faults:
            plan += [(0.0, "api_faults_before"), (0.5 * d, "api_faults_after")]
        # Random moments: one in each of `kills` equal slices of the run (never two at once).
        width = 0.85 * d / max(f.kills, 1)
        plan += [((0.05 * d) + width * (i + self.random.uniform(0.1, 0.9)), "kill_worker") for i in range(f.kills)]
        if f.second_worker:
            plan += [(0.1 * d, "start_second_worker"), (0.6 * d, "kill_second_worker")]
        if f.temporal_restart:
            plan.append((0.3 * d, "restart_temporal"))
        if f.credits_episode:
            plan += [(0.4 * d, "credits_low"), (0.5 * d, "credits_topped_up")]
        if f.postgres_restart:
            plan.append((0.7 * d, "restart_postgres"))
        return sorted(plan)

    # ---- faults -------------------------------------------------------------------------

    def api_faults(self, drop_when: str) -> None:
        self.admin.post("/_sandbox/faults", json={
            "error_5xx": 0.03, "rate_429": 0.03, "retry_after": 0.5,
            "slow": 0.02, "slow_seconds": 3.0,  # past BOUNCER_TIMEOUT_S=2
            "drop": 0.02, "drop_when": drop_when, "seed": self.random.randrange(1 << 30),
        }).raise_for_status()

    def do(self, action: str) -> None:
        st = self.st
        if action == "api_faults_before":
            self.api_faults("before")
        elif action == "api_faults_after":
            self.api_faults("after")
        elif action == "kill_worker":
            st.kill("worker")
            time.sleep(self.random.uniform(0.3, 2.0))
            self.ensure_worker("worker")
        elif action == "start_second_worker":
            self.ensure_worker("worker-2")
        elif action == "kill_second_worker":
            st.kill("worker-2")
        elif action == "restart_temporal":
            st.restart_temporal(down_s=2.0)
        elif action == "restart_postgres":
            st.restart_postgres(down_s=2.0)
            self.ensure_worker("worker")  # a worker that lost its database at start exits
        elif action == "credits_low":
            self.admin.post("/_sandbox/credits", json={"credits": 100}).raise_for_status()
        elif action == "credits_topped_up":
            self.admin.post("/_sandbox/credits", json={"credits": 100_000_000}).raise_for_status()
        self._count(action)
        self.timeline.note(action)

    def ensure_worker(self, name: str) -> None:
        """Start the worker unless it runs; a start that fails (e.g. Postgres is down) is retried."""
        for _ in range(20):
            if self.st.pid(name) is not None:
                return
            try:
                if name == "worker":
                    self.st.start_worker("worker", callbacks=True)
                else:
                    self.st.start_worker(name, callbacks=False, advertise=True)
                return
            except RuntimeError:
                self.st.kill(name)
                time.sleep(1.0)
        raise RuntimeError(f"{name} did not come back; see {self.st.root}/{name}.log")

    # ---- the run ------------------------------------------------------------------------

    def completed(self, ids: list[int]) -> bool:
        try:
            with psycopg.connect(self.st.database_url, autocommit=True, connect_timeout=3) as conn:
                (done,) = conn.execute(
                    "select count(*) from user_batches where id = any(%s) and state = 'completed'", (ids,)
                ).fetchone()
            return done == len(ids)
        except psycopg.OperationalError:
            return False  # Postgres is being restarted

    def run(self, ids: list[int]) -> None:
        """Apply the schedule while the user batches run; keep the main worker alive throughout."""
        plan = self.schedule()
        deadline = time.monotonic() + self.timeout_s
        self.timeline = Timeline()
        while time.monotonic() < deadline:
            now = time.monotonic() - self.timeline.began
            while plan and plan[0][0] <= now:
                self.do(plan.pop(0)[1])
            if not plan and self.completed(ids):
                return
            if self.st.pid("worker") is None:  # died on its own (e.g. Temporal was down at its start)
                self.timeline.note("worker found dead: restarted")
                self.ensure_worker("worker")
            if plan and self.completed(ids):
                # Done before the schedule: the remaining faults would hit an idle system.
                self.timeline.note(f"completed; skipped {[a for _, a in plan]}")
                return
            time.sleep(0.2)
        raise TimeoutError(f"chaos run not completed within {self.timeout_s:.0f}s: {self.diagnose(ids)}")

    def diagnose(self, ids: list[int]) -> dict:
        """Where a run that did not complete stands (the stack is torn down right after)."""
        try:
            with psycopg.connect(self.st.database_url, connect_timeout=3) as conn:
                q = lambda sql, *a: conn.execute(sql, a).fetchall()
                return {
                    "user_batches": q("select id, state from user_batches where id = any(%s)", ids),
                    "lanes": q("select user_batch_id, lane, remaining, enqueued, shared, cursor, next_seq"
                               " from user_batch_lanes where remaining > 0"),
                    "queue": q("select user_batch_id, count(*) from queue group by 1"),
                    "waits": q("select user_batch_id, count(*) from waits group by 1"),
                    "bouncer_batches": q("select state, count(*) from bouncer_batches group by 1"),
                    "timeline": self.timeline.log,
                }
        except psycopg.Error as exc:
            return {"error": str(exc), "timeline": self.timeline.log}


def audit(st: DevStack, ids: list[int], rows_in: int) -> dict:
    with psycopg.connect(st.database_url) as conn:
        q = lambda sql, *a: conn.execute(sql, a).fetchone()
        (items,) = q("select count(*) from items where user_batch_id = any(%s)", ids)
        (terminal,) = q("select count(*) from item_outcomes where user_batch_id = any(%s) and state = any(%s)",
                        ids, list(TERMINAL))
        (outcome_rows, distinct_rows) = q(
            "select count(*), count(distinct (user_batch_id, row_no)) from item_outcomes where user_batch_id = any(%s)",
            ids)
        (result_rows, distinct_results) = q("select count(*), count(distinct (address_id, lane)) from results")
        (ambiguous,) = q("select coalesce(sum(ambiguous_creates), 0) from bouncer_batches")
        (completed,) = q("select count(*) from user_batches where id = any(%s) and state = 'completed'", ids)
        (dead,) = q("select count(*) from dead_letters")
        (failed_rows,) = q("select count(*) from items where user_batch_id = any(%s) and state = 'failed'", ids)
        (batches, abandoned) = q("select count(*), count(*) filter (where last_error is not null) from bouncer_batches")
        (left_queued,) = q("select count(*) from queue")
        by_state = dict(conn.execute(
            "select state, count(*) from item_outcomes where user_batch_id = any(%s) group by 1", (ids,)).fetchall())
    stats = httpx.get(f"{st.sandbox_url}/_sandbox/stats").json()
    responses_429 = sum(int(c.get("429", 0)) for c in stats["requests"].values())
    return {
        "items_in": rows_in,
        "items_stored": items,
        "items_terminal": terminal,
        "items_lost": rows_in - terminal,
        "duplicate_results": (outcome_rows - distinct_rows) + (result_rows - distinct_results),
        "addresses_sent_twice": stats["addresses_sent_after_result"],
        "addresses_resent_without_result": stats["addresses_sent_twice"] - stats["addresses_sent_after_result"],
        "ambiguous_creates": int(ambiguous),
        "credits_wasted": stats["credits_charged"] - stats["unique_addresses_received"],
        "user_batches_completed": completed,
        "responses_429": responses_429,
        "by_state": by_state,
        "dead_letters": dead,
        "failed_rows": failed_rows,
        "bouncer_batches": batches,
        "bouncer_batches_with_errors": abandoned,
        "queue_rows_left": left_queued,
        "api_requests": {k: dict(v) for k, v in stats["requests"].items()},
        "api_batches": stats["batches"],
    }


async def _history_scan(st: DevStack, lists: list[Path]) -> dict:
    import temporal_client

    addresses = set()
    for path in lists:
        with path.open() as f:
            next(f)
            addresses.update(line.split(",", 1)[0].strip().lower() for line in f if "@" in line)
    client = await temporal_client.connect(st.settings())
    return await addresses_in_histories(client, addresses)


def run(addresses: int, users: int = 8, batch_size: int = 2000, duration: float | None = None,
        faults: Faults | None = None, seed: int = 1, timeout: float = 1800.0) -> dict:
    """One chaos run; returns the audit (see the module docstring)."""
    faults = faults or Faults()
    duration = duration or max(20.0, addresses / 1100.0)
    time_scale = 10.0
    # Sandbox speed so that processing alone takes about `duration`: the faults land mid-run.
    speed = max(addresses / SLOTS / duration / time_scale, 1.0)
    env = {
        "BATCH_SIZE": str(batch_size),
        "POLL_INTERVAL_S": "1",
        "BOUNCER_TIMEOUT_S": "2",
        "CREDIT_CHECK_S": "2",
        "BATCH_DEADLINE_S": str(max(120.0, 6 * batch_size / (speed * time_scale))),
        "CREATIONS_PER_MINUTE": "300",  # under the sandbox's 600/min at --time-scale 10
        "REQUESTS_PER_MINUTE": "1200",  # under its 2,000/min
        "SHUTDOWN_GRACE_S": "5",
    }
    sandbox = ["--time-scale", str(time_scale), "--speed", f"{speed:.3f}", "--credits", str(10 * addresses)]
    with bench_stack(sandbox, env, workers=1) as st:
        lists = write_chaos_lists(st.root / "lists", addresses, users, uuid.uuid4().hex[:6])
        chaos = Chaos(st, faults, duration, seed, timeout)
        began = time.monotonic()
        submitted = [submit(st, path, f"user{i}") for i, path in enumerate(lists)]
        ids = [s["user_batch_id"] for s in submitted]
        chaos.run(ids)
        duration_s = time.monotonic() - began
        result = audit(st, ids, sum(s["rows"] for s in submitted))
        scan = asyncio.run(_history_scan(st, lists))
    return {
        "benchmark": "chaos",
        "addresses": addresses,
        **{k: result.pop(k) for k in ("items_in", "items_terminal", "items_lost", "duplicate_results",
                                      "addresses_sent_twice", "ambiguous_creates", "credits_wasted",
                                      "user_batches_completed", "responses_429")},
        "duration_s": round(duration_s, 1),
        "addresses_in_histories": len(scan["leaked"]),
        "history_runs_scanned": scan["runs"],
        "user_batches": len(ids),
        "faults_applied": chaos.applied,
        "timeline": chaos.timeline.log,
        **result,
    }

"""`make demo`: the seed's example on the embedded stack.

John (5,000), Alice (2,000) and Bob (6,000) submit together through `starter.py submit`; the
scheduler packs Bouncer batch 1 = John 5,000 + Alice 2,000 + Bob 3,000 and batch 2 = Bob
3,000; the sandbox verifies them (time-scaled); the demo prints per-user results, the
batches formed and where the Web UI is, then stops the stack unless KEEP=1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
import psycopg
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import temporal_client
from devstack import DevStack
from workflows.models import Progress as BatchProgress

USERS = (("john", 5_000), ("alice", 2_000), ("bob", 6_000))
console = Console()


def write_lists(folder: Path, run: str) -> dict[str, Path]:
    """Addresses unique to this run (so nothing is served from the result cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for user, n in USERS:
        path = folder / f"{user}.csv"
        with path.open("w") as f:
            f.write("email,first_name,company\n")
            for i in range(n):
                domain = "sandbox.usebouncer.com" if i % 50 == 0 else f"company{i % 173}.example"
                local = ("deliverable", "risky", "undeliverable", "unknown")[i % 4] + f"+{user}{run}{i}" \
                    if domain.startswith("sandbox") else f"{user}.{run}.{i}"
                f.write(f"{local}@{domain},{user.title()} lead {i},Company {i % 173}\n")
        files[user] = path
    return files


def wait_prepared(st: DevStack, ids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(st.database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            (n,) = conn.execute(
                "select count(*) from user_batches where id = any(%s) and state not in ('receiving', 'preparing')",
                (ids,),
            ).fetchone()
            if n == len(ids):
                return
            time.sleep(0.1)
    raise SystemExit("the user batches were not prepared in time; see .dev/worker.log")


async def follow(st: DevStack, ids: dict[str, int]) -> None:
    client = await temporal_client.connect(st.settings())
    handles = {u: client.get_workflow_handle(f"user-batch-{i}") for u, i in ids.items()}
    results = {u: asyncio.ensure_future(h.result()) for u, h in handles.items()}
    with Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        tasks = {u: bar.add_task(u, total=n) for u, n in USERS}
        while not all(r.done() for r in results.values()):
            for u, h in handles.items():
                try:
                    p = await h.query("progress", result_type=BatchProgress)
                except Exception:  # noqa: BLE001 - not answering yet
                    continue
                if p is not None and p.lanes:
                    unique = sum(lane.unique_addresses for lane in p.lanes)
                    bar.update(tasks[u], total=unique, completed=unique - p.remaining)
            await asyncio.wait(list(results.values()), timeout=0.3)
        for u in handles:
            bar.update(tasks[u], completed=bar.tasks[tasks[u]].total)
    for r in results.values():
        r.result()


def report(st: DevStack, ids: dict[str, int], shared: bool = False) -> None:
    with psycopg.connect(st.database_url) as conn:
        t = Table(title="results per user")
        for col in ("user", "user batch", "rows", "deliverable", "risky", "undeliverable", "unknown", "invalid"):
            t.add_column(col, justify="right")
        for user, ub in ids.items():
            counts = dict(conn.execute(
                "select coalesce(status, state), count(*) from item_outcomes where user_batch_id = %s group by 1",
                (ub,),
            ).fetchall())
            t.add_row(user, str(ub), f"{sum(counts.values()):,}",
                      *(f"{counts.get(k, 0):,}" for k in ("deliverable", "risky", "undeliverable", "unknown", "invalid")))
        console.print(t)
        rows = conn.execute(
            """
            select bb.id, bb.size, bb.provider_batch_id, string_agg(ub.user_id || ' ' || to_char(p.addresses, 'FM999,999'),
                   ' + ' order by p.seq_from, ub.id)
            from bouncer_batches bb join bouncer_batch_parts p on p.bouncer_batch_id = bb.id
            join user_batches ub on ub.id = p.user_batch_id
            where p.user_batch_id = any(%s) group by bb.id order by bb.id
            """,
            (list(ids.values()),),
        ).fetchall()
    t = Table(title="Bouncer batches formed")
    for col in ("batch", "size", "made of", "id at the API"):
        t.add_column(col)
    for i, (_bb, size, provider, parts) in enumerate(rows, 1):
        t.add_row(str(i), f"{size:,}", parts, provider or "")
    console.print(t)
    stats = httpx.get(f"{st.sandbox_url}/_sandbox/stats").json()
    console.print(f"sandbox: {stats['batches_created']} batches created, {stats['addresses_received']:,} addresses "
                  f"received, {stats['addresses_sent_twice']} sent twice, requests {orjson.dumps(stats['requests']).decode()}"
                  + (" (totals of a sandbox already running: earlier runs included)" if shared else ""))


def main() -> None:
    began = time.perf_counter()
    st = DevStack(Path(".dev"), sandbox_args=["--time-scale", "120", "--speed", "50"])
    # A stack already running (`starter.py dev up`) is the user's: the demo runs on it and leaves it up.
    already_up = [part for part in ("temporal", "sandbox", "worker") if st.pid(part) is not None]
    with console.status("starting the embedded stack (Postgres, Temporal dev server + Web UI, sandbox, worker)"):
        try:
            st.up()
        except RuntimeError as exc:
            if not already_up:
                st.down()
            raise SystemExit(f"error: {exc}") from None
    console.print(f"stack up in {time.perf_counter() - began:.1f}s"
                  + (f" (already running: {', '.join(already_up)})" if already_up else ""))
    try:
        run_demo(st, began, shared=bool(already_up))
    finally:
        if already_up:
            console.print("the stack was running before the demo (`starter.py dev up`): it keeps running; "
                          "stop it with `python starter.py dev down`")
        elif os.environ.get("KEEP") == "1":
            console.print("KEEP=1: the stack keeps running; stop it with `python starter.py dev down`")
        else:
            st.down()
            console.print("stack stopped (KEEP=1 keeps it running)")


def run_demo(st: DevStack, began: float, shared: bool = False) -> None:
    run = uuid.uuid4().hex[:6]
    files = write_lists(st.root / "demo", run)
    env = {**os.environ, **st.env()}

    def starter(*args: str) -> None:
        subprocess.run([sys.executable, "starter.py", *args], env=env, check=True, stdout=subprocess.DEVNULL)

    # Like the seed's creator tick, hold the lane while the three lists arrive, so they are
    # packed together; the greedy scheduler otherwise dispatches each list the moment it lands.
    starter("pause", "--lane", "deliverability")
    ids = {}
    for user, path in files.items():  # in the seed's order: John, Alice, Bob
        proc = subprocess.run([sys.executable, "starter.py", "submit", str(path), "--user", user, "--json"],
                              stdout=subprocess.PIPE, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"submit for {user} failed (exit {proc.returncode})")
        ids[user] = orjson.loads(proc.stdout)["user_batch_id"]
    console.print("submitted together (lane held): "
                  + ", ".join(f"{u} → user batch {i}" for u, i in ids.items()))
    wait_prepared(st, list(ids.values()))
    starter("resume", "--lane", "deliverability")
    try:
        asyncio.run(asyncio.wait_for(follow(st, ids), timeout=300))
    except TimeoutError:
        raise SystemExit(f"error: the demo's user batches did not finish in 5 minutes; see {st.root}/worker.log")
    report(st, ids, shared)
    console.print(f"Temporal Web UI: http://127.0.0.1:{st.ui_port}  (workflows user-batch-*, scheduler-deliverability, "
                  "bouncer-batch-*)")
    console.print(f"demo finished in {time.perf_counter() - began:.1f}s")


if __name__ == "__main__":
    main()
    # See starter.main: skip finalization, which the Temporal SDK's native threads can abort.
    sys.stdout.flush()
    os._exit(0)

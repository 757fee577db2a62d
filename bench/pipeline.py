"""`python -m bench pipeline`: our own overhead end to end, with the API's limits lifted.

The sandbox processes instantly and refuses nothing, so what is left is ingest, prepare, pack,
submit, download, store and finalize: the pipeline's cost on top of the API.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

from bench.common import (
    CpuMeter,
    PgCpuSampler,
    bench_stack,
    history_limits,
    io_stats,
    peak_rss_mb,
    percentile,
    submit,
    top_statements,
    wait_completed,
    write_lists,
)


async def _limits(st) -> dict:
    import temporal_client

    return await history_limits(await temporal_client.connect(st.settings()))


def run(addresses: int, users: int, workers: int = 1, timeout: float = 1800.0, sql_stats: bool = False) -> dict:
    per_user = addresses // users
    env = {
        "CREATIONS_PER_MINUTE": "1000000",
        "REQUESTS_PER_MINUTE": "1000000",
        "POLL_INTERVAL_S": "1",
    }
    with bench_stack(["--no-limits", "--speed", "0", "--credits", str(10 * addresses)], env, workers,
                     sql_stats=sql_stats) as st:
        files = write_lists(st.root / "lists", users, per_user, uuid.uuid4().hex[:6])  # not timed
        meter = CpuMeter(st)
        meter.start(sample_s=5.0)
        pg_cpu = PgCpuSampler(st).start() if sql_stats else None
        began, began_wall = time.monotonic(), time.time()
        # Two submitters at a time: one per core, as a user's scripts would.
        with ThreadPoolExecutor(max_workers=2) as pool:
            submitted = list(pool.map(lambda i: submit(st, files[i], f"user{i}"), range(users)))
        submit_done = time.monotonic()
        ids = [s["user_batch_id"] for s in submitted]
        finished = wait_completed(st, ids, timeout)
        metered = meter.stop()
        by_statement = pg_cpu.stop() if pg_cpu else None
        cpu = metered["cpu_s"]
        worker_rss = max(filter(None, (peak_rss_mb(st.pid(n)) for n in ["worker", *[f"worker-{i}" for i in
                                                                                 range(2, workers + 1)]])))
        with psycopg.connect(st.database_url) as conn:
            packs = [r[0] for r in conn.execute("select duration_ms from pack_runs where batches > 0")]
            # Sent batches; a standby batch emptied for a list owed its place (size 0) never went out.
            every_size = [r[0] for r in conn.execute("select size from bouncer_batches")]
            sizes = [n for n in every_size if n > 0]
            # When each phase ended, from the rows' own timestamps (s after the first submit began).
            timeline = conn.execute(
                """
                select extract(epoch from x) - %s from (values
                    ((select max(created_at) from user_batches)), ((select min(created_at) from bouncer_batches)),
                    ((select max(created_at) from bouncer_batches)), ((select max(coalesce(callback_at, completed_at)) from bouncer_batches)),
                    ((select max(stored_at) from bouncer_batches)), ((select max(finished_at) from user_batches))) t(x)
                """,
                (began_wall,),
            ).fetchall()
            # Bouncer batches packed and stored in each 5 s of the run: where the dispatch waited.
            per_5s = conn.execute(
                """
                with e as (select floor((extract(epoch from created_at) - %(t0)s) / 5)::int as p,
                                  floor((extract(epoch from stored_at) - %(t0)s) / 5)::int as s from bouncer_batches)
                select array_agg((select count(*) from e where p = b) order by b),
                       array_agg((select count(*) from e where s = b) order by b)
                from generate_series(0, (select greatest(max(p), max(s)) from e)) b
                """,
                {"t0": began_wall},
            ).fetchone()
            (verified,) = conn.execute(
                "select count(*) from item_outcomes where user_batch_id = any(%s) and state = 'verified'", (ids,)
            ).fetchone()
        sandbox = httpx.get(f"{st.sandbox_url}/_sandbox/stats").json()
        limits = asyncio.run(_limits(st))
        statements = top_statements(st.database_url) if sql_stats else None
        io = io_stats(st.database_url) if sql_stats else None
    rows = sum(s["rows"] for s in submitted)
    ingest_s = sum(s["ingest_s"] for s in submitted)
    elapsed = finished - began
    return {
        "benchmark": "pipeline",
        "addresses": rows,
        "users": users,
        "workers": workers,
        "verified": verified,
        "ingest_rows_per_s": round(rows / ingest_s),
        "submit_wall_s": round(submit_done - began, 2),
        "end_to_end_s": round(elapsed, 2),
        "addresses_per_s": round(rows / elapsed),
        "pack_ms_p50": round(percentile(packs, 0.5) or 0, 1),
        "pack_ms_max": round(max(packs, default=0), 1),
        "pack_calls": len(packs),
        "worker_peak_rss_mb": round(worker_rss, 1),
        "starter_peak_rss_mb": round(max(s["peak_rss_mb"] for s in submitted), 1),
        **limits,
        "bouncer_batches": len(sizes),
        "mean_batch_fill": round(sum(sizes) / (len(sizes) * 10_000), 3) if sizes else 0,
        "bouncer_batches_emptied": len(every_size) - len(sizes),
        "cpu_s": cpu | {"submitters": round(sum(s["cpu_s"] for s in submitted), 1)},
        "timeline_s": dict(zip(["last_list_registered", "first_batch_packed", "last_batch_packed",
                                "last_batch_completed", "last_batch_stored", "last_list_finished"],
                               (None if t is None else round(float(t), 1) for (t,) in timeline))),
        "batches_packed_per_5s": per_5s[0],
        "batches_stored_per_5s": per_5s[1],
        "machine_busy": metered["machine_busy"],
        "machine_busy_per_5s": metered.get("machine_busy_samples", []),
        "addresses_sent_twice": sandbox["addresses_sent_twice"],
        "api_addresses_received": sandbox["addresses_received"],
        **({"top_statements": statements, "postgres_io": io, "postgres_cpu_by_statement": by_statement}
           if sql_stats else {}),
    }

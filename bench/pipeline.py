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
    bench_stack,
    history_limits,
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
        meter.start()
        began = time.monotonic()
        # Two submitters at a time: one per core, as a user's scripts would.
        with ThreadPoolExecutor(max_workers=2) as pool:
            submitted = list(pool.map(lambda i: submit(st, files[i], f"user{i}"), range(users)))
        submit_done = time.monotonic()
        ids = [s["user_batch_id"] for s in submitted]
        finished = wait_completed(st, ids, timeout)
        cpu = meter.stop()["cpu_s"]
        worker_rss = max(filter(None, (peak_rss_mb(st.pid(n)) for n in ["worker", *[f"worker-{i}" for i in
                                                                                 range(2, workers + 1)]])))
        with psycopg.connect(st.database_url) as conn:
            packs = [r[0] for r in conn.execute("select duration_ms from pack_runs where batches > 0")]
            sizes = [r[0] for r in conn.execute("select size from bouncer_batches")]
            (verified,) = conn.execute(
                "select count(*) from item_outcomes where user_batch_id = any(%s) and state = 'verified'", (ids,)
            ).fetchone()
        sandbox = httpx.get(f"{st.sandbox_url}/_sandbox/stats").json()
        limits = asyncio.run(_limits(st))
        statements = top_statements(st.database_url) if sql_stats else None
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
        "cpu_s": cpu | {"submitters": round(sum(s["cpu_s"] for s in submitted), 1)},
        "addresses_sent_twice": sandbox["addresses_sent_twice"],
        "api_addresses_received": sandbox["addresses_received"],
        **({"top_statements": statements} if sql_stats else {}),
    }

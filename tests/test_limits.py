"""A 200,000-address run keeps Temporal's limits: histories and payloads stay small."""

from __future__ import annotations

import asyncio

from bench.common import history_limits
from helpers import make_settings, running_pipeline, write_list


async def test_a_200k_run_keeps_histories_under_10k_events_and_payloads_under_64_kib(
    dev_env, db_url, sandbox, tmp_path
):
    settings = make_settings(db_url, sandbox)
    files = [write_list(tmp_path / f"u{u}.csv", [f"u{u}.{i}@firm{i % 211}.example" for i in range(50_000)])
             for u in range(4)]
    async with running_pipeline(dev_env.client, settings, callbacks_on=True) as p:
        handles = [await p.submit_file(f, f"user{u}") for u, f in enumerate(files)]
        summaries = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), timeout=300)
        assert [s.by_state for s in summaries] == [{"verified": 50_000}] * 4
        assert p.sql("select count(*), min(size), max(size) from bouncer_batches") == [(20, 10_000, 10_000)]
        limits = await history_limits(dev_env.client)
    assert limits["workflow_runs"] >= 4 + 20 + 1
    assert limits["max_history_events"] <= 10_000
    assert limits["max_payload_bytes"] <= 64 * 1024

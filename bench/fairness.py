"""`python -m bench fairness --json`: a 100-address list submitted behind a 1,000,000 import.

Two stack runs: the defaults (fair share and express slots), then the seeds' single FIFO
queue (FAIR_SHARE=false and EXPRESS_MAX_ADDRESSES=0: FIFO by age within a priority, no express
slot). In each: user A submits `big` addresses; once A's first Bouncer batch exists at the
API (`/_sandbox/stats` batches_created ≥ 1), user B submits `small` addresses at the same
priority. The sandbox keeps the documented limits, time-scaled by F, and the worker's budgets
are scaled alike (CREATIONS_PER_MINUTE = 45·F, REQUESTS_PER_MINUTE = 180·F,
POLL_INTERVAL_S = 15/F). A run ends as soon as B's user batch is completed; A need not finish
(the stack is torn down).

small_batch_done_s
    B's `starter.py submit` returned → B's user batch row reads `completed` (polled every 20 ms),
    both on this machine's wall clock.
turnovers_before_small_done
    Bouncer batches whose `completed` at the API (sandbox read-back, real wall-clock) falls
    between those two instants; this includes the batch that carried B's addresses.
fifo_small_batch_done_s, fifo_turnovers_before_small_done
    The same with FAIR_SHARE=false and EXPRESS_MAX_ADDRESSES=0.
ratio
    fifo_small_batch_done_s / small_batch_done_s.

`small_batch_api_s` is the part of B's wait spent at the API: from the creation of the Bouncer
batch holding B's addresses to its completion; `small_batch_packed_with` is that batch's size
(B's 100 plus whatever of A's queue the packer added).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import psycopg

from bench.common import bench_stack, submit
from bench.dispatch import _events
from bench.saturation import (
    LANE,
    _histories,
    api_batches,
    documented_limits,
    sandbox_stats,
    scaled_env,
    wait_for,
    wait_user_batches,
)


def _write(path: Path, n: int, tag: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write("email\n")
        f.writelines(f"{tag}.{i}@company{i % 997}.example\n" for i in range(n))
    return path


def _small_timeline(st, workflow_id: str, t0: float) -> dict[str, float]:
    """B's user batch workflow: its steps in ms after B's submit returned (server clock)."""
    events = asyncio.run(_histories(st, [workflow_id]))[workflow_id]
    out: dict[str, float] = {}
    for at, label in _events(events, 0.0):
        if label in ("workflow_execution_started", "prepare_user_batch_scheduled", "prepare_user_batch_started",
                     "prepare_user_batch_completed", "nudge_scheduler_completed", "signal_progressed",
                     "finalize_user_batch_started", "finalize_user_batch_completed", "workflow_execution_completed"):
            out.setdefault(label, round((at - t0) * 1000.0, 1))
    return out


def _carrier_timeline(st, bouncer_batch_ids: list[int], t0: float) -> dict[str, float]:
    """The Bouncer batch workflow(s) carrying B's addresses: each event's first time, in ms
    after B's submit returned (server clock), prefixed `bb<id>.`."""
    from workflows.models import bouncer_batch_workflow_id

    wids = {bouncer_batch_workflow_id(LANE, bb): bb for bb in bouncer_batch_ids}
    out: dict[str, float] = {}
    for wid, events in asyncio.run(_histories(st, list(wids))).items():
        for at, label in _events(events, 0.0):
            if label.startswith(("workflow_task", "timer", "activity_task_cancel")):
                continue
            out.setdefault(f"bb{wids[wid]}.{label}", round((at - t0) * 1000.0, 1))
    return out


def one_run(big: int, small: int, time_scale: float, speed: float, fair: bool, timeout: float = 600.0) -> dict:
    env = scaled_env(time_scale, FAIR_SHARE="true") if fair else scaled_env(
        time_scale, FAIR_SHARE="false", EXPRESS_MAX_ADDRESSES="0")
    began = time.monotonic()
    with bench_stack(documented_limits(time_scale, speed, 2 * (big + small)), env) as st:
        tag = uuid.uuid4().hex[:6]
        a_file = _write(st.root / "lists" / "a.csv", big, f"a{tag}")
        b_file = _write(st.root / "lists" / "b.csv", small, f"b{tag}")
        a = submit(st, a_file, "user-a")
        wait_for(lambda: sandbox_stats(st)["batches_created"] >= 1, timeout, "A's first Bouncer batch", 0.02)
        b = submit(st, b_file, "user-b")
        b_submitted = time.time()
        b_done = wait_user_batches(st, [b["user_batch_id"]], ("completed",), timeout)
        api = api_batches(st)
        with psycopg.connect(st.database_url) as conn:
            rows = conn.execute(
                "select bb.provider_batch_id, bb.size, bb.id from bouncer_batch_parts p"
                " join bouncer_batches bb on bb.id = p.bouncer_batch_id where p.user_batch_id = %s",
                (b["user_batch_id"],),
            ).fetchall()
        a_first_created = api[0]["created"]
        timeline = _small_timeline(st, b["workflow_id"], b_submitted)
        carrier = _carrier_timeline(st, [bb for _, _, bb in rows], b_submitted)
    by_id = {x["batchId"]: x for x in api}
    carriers = [by_id[pid] for pid, _, _ in rows if pid in by_id]
    turnovers = sum(1 for x in api if x["completed"] is not None and b_submitted < x["completed"] <= b_done)
    return {
        "small_batch_done_s": round(b_done - b_submitted, 3),
        "turnovers_before_small_done": turnovers,
        "small_batch_api_s": round(max(c["completed"] - c["created"] for c in carriers), 3) if carriers else None,
        "small_batch_wait_for_creation_s": (
            round(min(c["created"] for c in carriers) - b_submitted, 3) if carriers else None),
        "small_batch_packed_with": [size for _, size, _ in rows],
        "b_submitted_after_a_first_created_s": round(b_submitted - a_first_created, 3),
        "small_timeline_ms": timeline,
        "small_carrier_timeline_ms": carrier,
        "small_carrier_api_ms": [[round((c["created"] - b_submitted) * 1000.0, 1),
                                  round((c["completed"] - b_submitted) * 1000.0, 1)] for c in carriers],
        "big_ingest_s": a["ingest_s"],
        "api_batches_created": len(api),
        "wall_s": round(time.monotonic() - began, 1),
    }


def run(big: int = 1_000_000, small: int = 100, time_scale: float = 25.0, speed: float = 50.0) -> dict:
    fair = one_run(big, small, time_scale, speed, fair=True)
    fifo = one_run(big, small, time_scale, speed, fair=False)
    return {
        "benchmark": "fairness",
        "time_scale": time_scale,
        "speed_per_batch": speed,
        "api_batch_s": round(10_000 / (speed * time_scale), 2),
        "big": big,
        "small": small,
        "small_batch_done_s": fair["small_batch_done_s"],
        "turnovers_before_small_done": fair["turnovers_before_small_done"],
        "fifo_small_batch_done_s": fifo["small_batch_done_s"],
        "fifo_turnovers_before_small_done": fifo["turnovers_before_small_done"],
        "ratio": round(fifo["small_batch_done_s"] / fair["small_batch_done_s"], 2),
        "fair": fair,
        "fifo": fifo,
    }

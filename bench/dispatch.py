"""`python -m bench dispatch --json`: the seed's headline, submit → Bouncer batches at the API.

50,000 addresses in five user batches of 10,000, submitted back to back (one `starter.py
submit --json` process after the other, as a user's script would). The sandbox keeps the
documented limits *unscaled* (`time_scale` 1: 60 creations/min, 200 requests/min, 25
processing) and the worker runs with its defaults (CREATIONS_PER_MINUTE 45,
REQUESTS_PER_MINUTE 180, POLL_INTERVAL_S 15, PACK_LINGER_S 0.5): dispatch latency is our own
wall-clock overhead plus the real creation budget, so nothing is gained by scaling it.

first_dispatch_ms
    the first submit process returned → the first Bouncer batch `created` at the sandbox
    (`/_sandbox/batches`, real wall-clock UTC with ms).
all_dispatched_ms
    the same start → the `created` of the last Bouncer batch, once the API holds all 50,000.
bouncer_batches
    batches the API received.

By default the stack is fresh, so the first submit also starts the lane's scheduler (signal-
with-start) and the first workflows run on a cold worker: what the very first user sees.
`--warm` resumes the lane first (signal-with-start) so the scheduler is already idle and
waiting, as it is in steady state.

`first_dispatch_timeline_ms` places the steps of the first dispatch on the same clock (ms after
the first submit returned) from the Temporal histories (server wall clock): the user batch
workflow, its prepare and nudge activities, the scheduler's linger timer, pack activity and
child start, the Bouncer batch workflow's submit activity, and the API's `created`.
`per_batch_ms` does the same for every Bouncer batch; `submit_queue_wait_ms` is, per batch, the
submit activity's wait between scheduled and started: the create queue's server-side rate
limit (`max_task_queue_activities_per_second`), which the Temporal server divides among the
task queue's partitions (4 by default), so tasks landing on one partition are spaced 4× wider
than CREATIONS_PER_MINUTE implies. (The sandbox stamps `created` when the request reaches its
handler, before the body is parsed.)
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg

from bench.common import bench_stack, submit, write_lists
from bench.saturation import (
    LANE,
    _histories,
    api_batches,
    documented_limits,
    sandbox_stats,
    scaled_env,
    starter,
    wait_for,
)


def _events(events, since: float) -> list[tuple[float, str]]:
    """(time, label) of the events of one history at or after `since` (epoch s)."""
    from temporalio.api.enums.v1 import EventType as E

    names: dict[int, str] = {}
    out = []
    for ev in events:
        at = ev.event_time.ToMicroseconds() / 1e6
        kind = E.Name(ev.event_type).removeprefix("EVENT_TYPE_").lower()
        label = kind
        if ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[ev.event_id] = ev.activity_task_scheduled_event_attributes.activity_type.name
            label = f"{names[ev.event_id]}_scheduled"
        elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            label = f"{names.get(ev.activity_task_started_event_attributes.scheduled_event_id, '?')}_started"
        elif ev.event_type == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            label = f"{names.get(ev.activity_task_completed_event_attributes.scheduled_event_id, '?')}_completed"
        elif ev.event_type == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            label = f"signal_{ev.workflow_execution_signaled_event_attributes.signal_name}"
        if at >= since:
            out.append((at, label))
    return out


def first_dispatch_timeline(st, t0: float, api: list[dict]) -> dict[str, float]:
    """The first user batch, the scheduler, and the Bouncer batch the API received first."""
    from workflows.models import bouncer_batch_workflow_id, scheduler_id, user_batch_workflow_id

    with psycopg.connect(st.database_url) as conn:
        (ub,) = conn.execute("select min(id) from user_batches").fetchone()
        (bb,) = conn.execute("select id from bouncer_batches where provider_batch_id = %s",
                             (api[0]["batchId"],)).fetchone()
    wids = {
        "user_batch": user_batch_workflow_id(ub),
        "scheduler": scheduler_id(LANE),
        "bouncer_batch": bouncer_batch_workflow_id(LANE, bb),
    }
    histories = asyncio.run(_histories(st, list(wids.values())))
    wanted = {
        "user_batch": ["workflow_execution_started", "prepare_user_batch_started", "prepare_user_batch_completed",
                       "nudge_scheduler_started", "nudge_scheduler_completed"],
        "scheduler": ["signal_work_available", "workflow_task_started", "unfinished_batches_completed",
                      "timer_started", "timer_fired",
                      "pack_batches_scheduled", "pack_batches_started", "pack_batches_completed",
                      "start_child_workflow_execution_initiated", "child_workflow_execution_started"],
        "bouncer_batch": ["workflow_execution_started", "workflow_task_started", "submit_batch_scheduled",
                          "submit_batch_started", "submit_batch_completed"],
    }
    since = t0 - 30.0  # the user batch workflow starts before its submit process returns
    out: dict[str, float] = {}
    for part, wid in wids.items():  # user batch first: the scheduler's events count from its nudge
        seen: set[str] = set()
        for at, label in _events(histories[wid], since):
            if label in wanted[part] and label not in seen:
                seen.add(label)
                out[f"{part}.{label}"] = round((at - t0) * 1000.0, 1)
                if label == "nudge_scheduler_started":
                    since = at
    return dict(sorted(out.items(), key=lambda kv: kv[1]))


def per_batch_steps(st, t0: float, api: list[dict]) -> list[dict[str, float]]:
    """For each Bouncer batch: workflow started, submit scheduled / started (the wait between is
    the create queue's server-side rate limit), created at the API; ms after `t0`."""
    from workflows.models import bouncer_batch_workflow_id

    with psycopg.connect(st.database_url) as conn:
        rows = conn.execute("select id, provider_batch_id from bouncer_batches order by id").fetchall()
    created = {b["batchId"]: b["created"] for b in api}
    wids = [bouncer_batch_workflow_id(LANE, bb) for bb, _ in rows]
    histories = asyncio.run(_histories(st, wids))
    out = []
    for (bb, pid), wid in zip(rows, wids):
        steps = {label: at for at, label in reversed(_events(histories[wid], 0.0))}  # first occurrence wins
        row = {"bouncer_batch": bb}
        for label in ("workflow_execution_started", "submit_batch_scheduled", "submit_batch_started"):
            if label in steps:
                row[label] = round((steps[label] - t0) * 1000.0, 1)
        if pid in created:
            row["api_created"] = round((created[pid] - t0) * 1000.0, 1)
        out.append(row)
    return out


def run(lists: int = 5, per_list: int = 10_000, time_scale: float = 1.0, warm: bool = False) -> dict:
    total = lists * per_list
    env = scaled_env(time_scale)
    began = time.monotonic()
    with bench_stack(documented_limits(time_scale, 50.0, 2 * total), env) as st:
        files = write_lists(st.root / "lists", lists, per_list, uuid.uuid4().hex[:6])  # not timed
        if warm:
            starter(st, "resume", "--lane", LANE)
            time.sleep(3.0)
        returned = []
        submitted = []
        for i, path in enumerate(files):
            submitted.append(submit(st, path, f"user{i}"))
            returned.append(time.time())
        t0 = returned[0]
        wait_for(lambda: sandbox_stats(st)["addresses_received"] >= total, 300, "all addresses at the API", 0.05)
        api = api_batches(st)
        stats = sandbox_stats(st)
        timeline = first_dispatch_timeline(st, t0, api)
        steps = per_batch_steps(st, t0, api)
    created = sorted(b["created"] for b in api)
    return {
        "benchmark": "dispatch",
        "time_scale": time_scale,
        "scheduler_warm": warm,
        "addresses": total,
        "user_batches": lists,
        "first_dispatch_ms": round((created[0] - t0) * 1000.0, 1),
        "all_dispatched_ms": round((created[-1] - t0) * 1000.0, 1),
        "bouncer_batches": len(api),
        "batch_sizes": [b["quantity"] for b in api],
        "submits_returned_ms": [round((t - t0) * 1000.0, 1) for t in returned],
        "created_ms": [round((c - t0) * 1000.0, 1) for c in created],
        "submit_ingest_s": [s["ingest_s"] for s in submitted],
        "responses_429": sum(int(c.get("429", 0)) for c in stats["requests"].values()),
        "first_dispatch_timeline_ms": timeline,
        "per_batch_ms": steps,
        "submit_queue_wait_ms": [round(s["submit_batch_started"] - s["submit_batch_scheduled"], 1)
                                 for s in steps if "submit_batch_started" in s and "submit_batch_scheduled" in s],
        "wall_s": round(time.monotonic() - began, 1),
    }

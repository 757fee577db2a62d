"""`python -m bench saturation [--callback/--no-callback] --json`: do we keep every slot busy?

The sandbox keeps the documented limits (60 creations/min, 200 other requests/min, 25 batches
processing at once, a per-batch speed), all shrunk by `--time-scale F` so a run fits in about
two minutes; the worker's defaults are scaled alike so it still sits just under them:
CREATIONS_PER_MINUTE = 45·F, REQUESTS_PER_MINUTE = 180·F, POLL_INTERVAL_S = 15/F. A backlog of
`batches` (default 45 = 3 × MAX_CONCURRENT_BATCHES) full Bouncer batches is queued *before*
dispatch starts: the lane is paused (signal-with-start of its scheduler), the lists are
submitted and prepared, then the lane is resumed. So queued work exists from the first
creation at the API until the last one.

Every figure comes from the sandbox's own read-back (`/_sandbox/batches`: created, started,
completed per batch, real wall-clock UTC with ms; `/_sandbox/stats`: answers per endpoint and
status), never from our own bookkeeping.

slot_utilization
    t0 = the first batch's `created`, t1 = the last batch's `created` (the interval during which
    queued work remained: after t1 nothing is left to dispatch). A slot is busy from a batch's
    `created` until its `completed` at the API. busy = Σ over batches of the length of
    [created, completed] ∩ [t0, t1] (a batch still running at t1 counts up to t1); available =
    MAX_CONCURRENT_BATCHES × (t1 − t0). slot_utilization = busy / available. The losses are the
    initial ramp (creations are paced by CREATIONS_PER_MINUTE) and every turnover gap below.

slot_loss_s
    available − busy in slot-seconds, split: `ramp` = Σ over the first wave (the first
    MAX_CONCURRENT_BATCHES creations) of created − t0, the slots still empty while the first wave
    is created; `turnovers` = the rest (a slot idle between a completion and its refill). For
    0.98, the two together may come to 2% of `available`.

dispatch_gap_ms_p50 / _p95
    Creations and completions at the API are each sorted by time. The scheduler starts a batch
    only when one of its 15 slots (`--slots`) is free, and a slot is held at least from creation to
    completion at the API, so the (15+k)-th creation is the one that refilled the slot the k-th
    completion freed: gap_k = created[15+k] − completed[k], for every k with a creation left.
    Reported in real wall-clock ms.

dispatch_gap_ms_p50_scaled / _p95_scaled
    The same numbers, on purpose not multiplied by F. The time-scale shrinks the API's windows
    and processing times, not ours: callback delivery, the Temporal round trips, downloading and
    storing 10,000 results, packing and creating the next batch cost the same wall-clock
    milliseconds at any F. So the gap in API time is the wall-clock gap; only its *share* of a
    batch's life grows with F. `projected_utilization_unscaled` shows that share at F = 1: the
    mean API processing time × F against the same measured mean gap.

Without callbacks (`--no-callback`: CALLBACK_LISTEN and CALLBACK_PUBLIC_URL empty, so no
`callback` query is sent), completion is seen by polling, so the gap is bounded below by up to
POLL_INTERVAL_S (on average half of it) plus everything else.

`phases_ms_p50` splits a turnover into its parts from the Temporal histories of the Bouncer
batch workflows (event times are the server's wall clock): API completed → completion seen
(callback signal or the poll that saw it), → store_results started (task-queue wait) →
stored, → workflow closed (notifications), slot freed → the next child workflow started
(scheduler: signal, pack activity, child start; matched in sorted order like the gaps), child
started → submit_batch started → created at the API.

Defaults: F = 20 and 30 addresses/s per batch, so a 10,000 batch spends 16.7 s (wall) at the API
(333 s unscaled); a run takes ~1.5–2 minutes. Everything shares the machine's cores, the
sandbox included (it computes every verdict in Python, serially, on one event loop), so
`cpu_during_backlog` gives the CPU seconds of each part while the backlog lasted and the
machine's busy share; `--profile DIR` also samples the worker and the sandbox with py-spy
(raw collapsed stacks, for flame graphs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import psycopg

from bench.common import CpuMeter, bench_stack, percentile, submit, write_lists
from devstack import ROOT, DevStack
from settings import Settings

LANE = "deliverability"
SLOTS = 15


# ---- shared by the saturation, fairness and dispatch benchmarks ------------------------------


def scaled_env(time_scale: float, **extra: object) -> dict[str, str]:
    """The worker's default budgets (just under the documented limits), scaled."""
    field = Settings.model_fields
    env = {
        "CREATIONS_PER_MINUTE": f"{field['creations_per_minute'].default * time_scale:g}",
        "REQUESTS_PER_MINUTE": f"{field['requests_per_minute'].default * time_scale:g}",
        "POLL_INTERVAL_S": f"{field['poll_interval_s'].default / time_scale:g}",
        "MAX_CONCURRENT_BATCHES": str(SLOTS),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def documented_limits(time_scale: float, speed: float, credits: int) -> list[str]:
    return [
        "--time-scale", f"{time_scale:g}", "--speed", f"{speed:g}", "--max-processing", "25",
        "--create-per-minute", "60", "--requests-per-minute", "200", "--credits", str(credits),
    ]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def starter(st: DevStack, *args: str) -> str:
    proc = subprocess.run([sys.executable, "starter.py", *args], cwd=ROOT, env={**os.environ, **st.env()},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"starter.py {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return proc.stdout


def ts(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def api_batches(st: DevStack) -> list[dict]:
    """`/_sandbox/batches` with created/started/completed as epoch seconds."""
    out = httpx.get(f"{st.sandbox_url}/_sandbox/batches", timeout=30).json()
    for b in out:
        for k in ("created", "started", "completed"):
            b[k] = ts(b[k])
    return sorted(out, key=lambda b: b["created"])


def sandbox_stats(st: DevStack) -> dict:
    return httpx.get(f"{st.sandbox_url}/_sandbox/stats", timeout=30).json()


def responses_429(stats: dict) -> int:
    return sum(int(c.get("429", 0)) for c in stats["requests"].values())


def wait_user_batches(st: DevStack, ids: list[int], states: tuple[str, ...], timeout: float) -> float:
    """Block until every listed user batch is in one of `states`; returns time.time() then."""
    with psycopg.connect(st.database_url, autocommit=True) as conn:
        def done() -> bool:
            (n,) = conn.execute("select count(*) from user_batches where id = any(%s) and state = any(%s)",
                                (ids, list(states))).fetchone()
            return n == len(ids)
        wait_for(done, timeout, f"user batches {ids} to reach {states}", 0.02)
    return time.time()


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 1)


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---- where the CPU goes -----------------------------------------------------------------------


@contextlib.contextmanager
def profiled(st: DevStack, folder: str | None, names: tuple[str, ...] = ("worker", "sandbox")) -> Iterator[None]:
    """py-spy (from the venv) sampling the named processes while the block runs, if `folder`."""
    if not folder:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    procs = [
        subprocess.Popen([spy, "record", "--pid", str(st.pid(n)), "--rate", "50", "--format", "raw",
                          "--output", f"{folder}/{n}.txt", "--nonblocking"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for n in names if st.pid(n)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for proc in procs:
            proc.wait(timeout=30)


async def _histories(st: DevStack, workflow_ids: list[str]) -> dict[str, list]:
    import temporal_client

    client = await temporal_client.connect(st.settings())

    async def one(wid: str):
        return wid, (await client.get_workflow_handle(wid).fetch_history()).events

    return dict(await asyncio.gather(*(one(w) for w in workflow_ids)))


def batch_timelines(st: DevStack, api: list[dict]) -> list[dict]:
    """Per Bouncer batch: the API's timestamps joined with its workflow's history (epoch s)."""
    from temporalio.api.enums.v1 import EventType as E

    from workflows.models import bouncer_batch_workflow_id

    with psycopg.connect(st.database_url) as conn:
        rows = conn.execute("select id, provider_batch_id from bouncer_batches where provider_batch_id is not null")
        ours = {pid: bb for bb, pid in rows}
    wids = {bouncer_batch_workflow_id(LANE, ours[b["batchId"]]): b for b in api if b["batchId"] in ours}
    histories = asyncio.run(_histories(st, list(wids)))
    out = []
    for wid, events in histories.items():
        t: dict[str, float | None] = dict(wids[wid])
        names: dict[int, str] = {}
        for ev in events:
            at = ev.event_time.ToMicroseconds() / 1e6
            kind = ev.event_type
            if kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                t["wf_started"] = at
            elif kind == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
                name = ev.activity_task_scheduled_event_attributes.activity_type.name
                names[ev.event_id] = name
                t.setdefault(f"{name}_scheduled", at)
            elif kind == E.EVENT_TYPE_ACTIVITY_TASK_STARTED:
                name = names.get(ev.activity_task_started_event_attributes.scheduled_event_id, "?")
                t[f"{name}_started"] = at
            elif kind == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
                name = names.get(ev.activity_task_completed_event_attributes.scheduled_event_id, "?")
                t[f"{name}_completed"] = at
            elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
                if ev.workflow_execution_signaled_event_attributes.signal_name == "completed":
                    t.setdefault("callback_signal", at)
            elif kind == E.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED:
                t["wf_closed"] = at
        t["seen"] = min(filter(None, [t.get("callback_signal"), t.get("await_batch_completion_completed")]),
                        default=None)
        out.append(t)
    return out


def scheduler_breakdown(st: DevStack) -> dict:
    """The scheduler's side of a turnover, from its history (p50 ms over the `batch_finished`
    signals that led to a pack): signal → its workflow task started → pack scheduled → pack
    started → pack completed (→ first child start initiated → that child started, before release 3:
    since then the pack activity starts the batches itself)."""
    from temporalio.api.enums.v1 import EventType as E

    from workflows.models import scheduler_id

    events = asyncio.run(_histories(st, [scheduler_id(LANE)]))[scheduler_id(LANE)]
    at = [(ev.event_type, ev.event_time.ToMicroseconds() / 1e6, ev) for ev in events]
    steps: dict[str, list[float]] = {}
    for i, (kind, t, ev) in enumerate(at):
        if kind != E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        if ev.workflow_execution_signaled_event_attributes.signal_name != "batch_finished":
            continue
        marks = {"signal": t}
        for kind2, t2, ev2 in at[i + 1:]:
            if kind2 == E.EVENT_TYPE_WORKFLOW_TASK_STARTED and "wft_started" not in marks:
                marks["wft_started"] = t2
            elif kind2 == E.EVENT_TYPE_WORKFLOW_TASK_COMPLETED and "wft_completed" not in marks:
                marks["wft_completed"] = t2
            elif kind2 == E.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED and "pack_scheduled" not in marks:
                marks["pack_scheduled"] = t2
            elif kind2 == E.EVENT_TYPE_ACTIVITY_TASK_STARTED and "pack_started" not in marks and "pack_scheduled" in marks:
                marks["pack_started"] = t2
            elif kind2 == E.EVENT_TYPE_ACTIVITY_TASK_COMPLETED and "pack_completed" not in marks and "pack_scheduled" in marks:
                marks["pack_completed"] = t2
            elif kind2 == E.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED and "pack_completed" in marks:
                marks.setdefault("child_initiated", t2)
            elif kind2 == E.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED and "child_initiated" in marks:
                marks["child_started"] = t2
                break
            elif kind2 == E.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED and "pack_completed" in marks:
                break  # since release 3 the pack activity starts the batches: no child events
        if "pack_completed" not in marks:
            continue  # this signal's slot was refilled by an earlier pack (or never)
        names = list(marks)
        for a, b in zip(names, names[1:]):
            steps.setdefault(f"{a}_to_{b}", []).append(marks[b] - marks[a])
        steps.setdefault("signal_to_pack_completed", []).append(marks["pack_completed"] - t)
        if "child_started" in marks:
            steps.setdefault("signal_to_child_started", []).append(marks["child_started"] - t)
    return {k: ms(p50(v)) for k, v in steps.items()} | {"turnovers_seen": len(steps.get("signal_to_pack_completed", []))}


def phase_breakdown(timelines: list[dict], slots: int) -> dict:
    def med(a: str, b: str) -> float | None:
        vals = [t[b] - t[a] for t in timelines if t.get(a) and t.get(b)]
        return ms(p50(vals))

    closed = sorted(t["wf_closed"] for t in timelines if t.get("wf_closed"))
    started = sorted(t["wf_started"] for t in timelines if t.get("wf_started"))
    refill = [started[slots + k] - closed[k] for k in range(min(len(closed), len(started) - slots))]
    return {
        "api_completed_to_seen": med("completed", "seen"),
        "seen_to_store_started": med("seen", "store_results_started"),
        "store_results_run": med("store_results_started", "store_results_completed"),
        "stored_to_workflow_closed": med("store_results_completed", "wf_closed"),
        "slot_freed_to_next_child_started": ms(p50(refill)),
        "child_started_to_submit_started": med("wf_started", "submit_batch_started"),
        "child_started_to_submit_scheduled": med("wf_started", "submit_batch_scheduled"),
        "submit_scheduled_to_started": med("submit_batch_scheduled", "submit_batch_started"),
        "submit_started_to_api_created": med("submit_batch_started", "created"),
        "api_created_to_submit_completed": med("created", "submit_batch_completed"),
    }


def slot_metrics(api: list[dict], slots: int) -> dict:
    created = sorted(b["created"] for b in api)
    completed = sorted(b["completed"] for b in api if b["completed"] is not None)
    t0, t1 = created[0], created[-1]
    busy = sum(max(0.0, min(b["completed"] or t1, t1) - max(b["created"], t0)) for b in api)
    available = slots * (t1 - t0)
    # The ramp: slots still empty while the first wave is created (paced by the creation budget).
    ramp = sum(min(c, t1) - t0 for c in created[:slots])
    gaps = [created[slots + k] - completed[k] for k in range(min(len(completed), len(created) - slots))]
    # Most batches open at once at the API (a check that the slot count holds).
    edges = sorted([(b["created"], 1) for b in api] + [(b["completed"], -1) for b in api if b["completed"]],
                   key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, d in edges:
        level += d
        peak = max(peak, level)
    durations = [b["completed"] - b["created"] for b in api if b["completed"]]
    return {
        "slot_utilization": round(busy / available, 4) if available > 0 else None,
        "slot_loss_s": {"ramp": round(ramp, 2), "turnovers": round(available - busy - ramp, 2)},
        "backlog_interval_s": round(t1 - t0, 2),
        "gaps": gaps,
        "max_open_at_api": peak,
        "mean_api_batch_s": statistics.fmean(durations) if durations else None,
    }


# ---- the benchmark ------------------------------------------------------------------------


def run(callback: bool = True, time_scale: float = 20.0, speed: float = 30.0, batches: int = 3 * SLOTS,
        batch_size: int = 10_000, users: int = 3, timeout: float = 240.0, profile: str | None = None,
        slots: int = SLOTS) -> dict:
    addresses = batches * batch_size // users * users  # what `write_lists` writes
    env = scaled_env(time_scale, BATCH_SIZE=batch_size, MAX_CONCURRENT_BATCHES=slots)
    began = time.monotonic()
    with bench_stack(documented_limits(time_scale, speed, 2 * addresses), env, callbacks=callback) as st:
        stack_s = time.monotonic() - began
        files = write_lists(st.root / "lists", users, addresses // users, uuid.uuid4().hex[:6])
        starter(st, "pause", "--lane", LANE)  # the whole backlog is queued before dispatch starts
        with ThreadPoolExecutor(max_workers=2) as pool:
            submitted = list(pool.map(lambda i: submit(st, files[i], f"user{i}"), range(users)))
        ids = [s["user_batch_id"] for s in submitted]
        wait_user_batches(st, ids, ("queued",), timeout)
        prepared_s = time.monotonic() - began
        meter = CpuMeter(st)
        with profiled(st, profile):
            meter.start()
            starter(st, "resume", "--lane", LANE)
            resumed = time.time()
            wait_for(lambda: sandbox_stats(st)["addresses_received"] >= addresses, timeout, "all batches created", 0.2)
            cpu = meter.stop()
        api = api_batches(st)
        stats = sandbox_stats(st)
        timelines = batch_timelines(st, api)
        scheduler_phases = scheduler_breakdown(st)
    m = slot_metrics(api, slots)
    gaps_ms = [g * 1000.0 for g in m.pop("gaps")]
    mean_gap = statistics.fmean(gaps_ms) / 1000.0 if gaps_ms else 0.0
    api_s = m.pop("mean_api_batch_s")
    g50, g95 = percentile(gaps_ms, 0.5), percentile(gaps_ms, 0.95)
    return {
        "benchmark": "saturation",
        "callback": callback,
        "time_scale": time_scale,
        "speed_per_batch": speed,
        "batch_size": batch_size,
        "batches": len(api),
        "slots": slots,
        "slot_utilization": m["slot_utilization"],
        "slot_loss_s": m["slot_loss_s"],
        "responses_429": responses_429(stats),
        "dispatch_gap_ms_p50": round(g50, 1) if g50 is not None else None,
        "dispatch_gap_ms_p95": round(g95, 1) if g95 is not None else None,
        "dispatch_gap_ms_p50_scaled": round(g50, 1) if g50 is not None else None,
        "dispatch_gap_ms_p95_scaled": round(g95, 1) if g95 is not None else None,
        "dispatch_gap_ms_max": round(max(gaps_ms), 1) if gaps_ms else None,
        "turnovers": len(gaps_ms),
        "projected_utilization_unscaled": (
            round(api_s * time_scale / (api_s * time_scale + mean_gap), 4) if api_s else None),
        "mean_api_batch_s": round(api_s, 2) if api_s else None,
        "backlog_interval_s": m["backlog_interval_s"],
        "first_creation_after_resume_ms": ms(api[0]["created"] - resumed),
        "max_open_at_api": m["max_open_at_api"],
        "max_processing_seen": stats["max_processing_seen"],
        "requests": stats["requests"],
        "callbacks_sent": stats["callbacks_sent"],
        "addresses_sent_twice": stats["addresses_sent_twice"],
        "phases_ms_p50": phase_breakdown(timelines, slots),
        "scheduler_phases_ms_p50": scheduler_phases,
        "cpu_during_backlog": cpu,
        "setup_s": {"stack": round(stack_s, 1), "lists_prepared": round(prepared_s, 1)},
        "wall_s": round(time.monotonic() - began, 1),
    }

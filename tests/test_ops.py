"""Operations on real parts: a `python worker.py` process against the dev server, the stock
`temporal` CLI, Prometheus scrapes, an OTLP receiver, and `starter.py health`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client

from activities.user_batches import scheduler_input
from conftest import binary
from devstack import free_port
from helpers import Pipeline, eventually, make_settings, running_pipeline, settings_env, write_list
from settings import Settings
from workflows.models import LanePause, scheduler_id, scheduler_summary
from workflows.scheduler import GreedySchedulerWorkflow
from workflows.user_batch import UserBatchWorkflow

ROOT = Path(__file__).resolve().parent.parent
LANE = "deliverability"


def emails(tag: str, n: int) -> list[str]:
    return [f"{tag}.{i}@ops{i % 5}.example" for i in range(n)]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    text = httpx.get(url, timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@contextlib.asynccontextmanager
async def otlp_receiver():
    """An OTLP/HTTP trace endpoint that keeps the names of the spans it is sent."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    names: list[str] = []

    async def traces(request: Request) -> Response:
        req = ExportTraceServiceRequest.FromString(await request.body())
        names.extend(s.name for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans)
        return Response(b"", media_type="application/x-protobuf")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/traces", traces, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", names
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def worker_process(settings: Settings, log: Path):
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=settings_env(settings),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def end_schedulers(client: Client) -> None:
    for lane in ("deliverability", "catchall"):
        with contextlib.suppress(Exception):
            await client.get_workflow_handle(scheduler_id(lane)).terminate("a new test starts")


def temporal_list(address: str, query: str) -> list[dict]:
    """The stock Temporal CLI, as an operator runs it."""
    run = subprocess.run([binary("temporal"), "workflow", "list", "--address", address, "--query", query,
                          "-o", "json"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout or "[]")


async def expect_listed(address: str, query: str, expected: set[str]) -> None:
    """Visibility is eventually consistent: ask until the CLI lists exactly `expected`."""
    found: list[set[str]] = [set()]

    def check():
        found[0] = {w["execution"]["workflowId"] for w in temporal_list(address, query)}
        return found[0] == expected

    with contextlib.suppress(AssertionError):
        await eventually(check, query, timeout=15)
    assert found[0] == expected, query


def run_health(settings: Settings) -> tuple[int, dict]:
    run = subprocess.run([sys.executable, "starter.py", "health", "--json"], cwd=ROOT, env=settings_env(settings),
                         capture_output=True, text=True, timeout=60)
    assert "Traceback" not in run.stderr, run.stderr
    return run.returncode, json.loads(run.stdout)


async def test_a_run_shows_in_search_attributes_details_metrics_traces_and_health(
    dev_env, db_url, sandbox, tmp_path
):
    client = dev_env.client
    address = client.service_client.config.target_host
    await end_schedulers(client)
    async with otlp_receiver() as (otlp_url, span_names):
        port = free_port()
        settings = make_settings(
            db_url, sandbox, batch_size=100, temporal_address=address, metrics_listen=f"127.0.0.1:{port}",
            otlp_endpoint=otlp_url, metrics_sample_s=0.3, credits_sample_s=1, alert_check_s=0.3,
        )
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        with worker_process(settings, tmp_path / "worker.log") as proc:
            await eventually(lambda: proc.poll() is None and _ok(f"http://127.0.0.1:{port}/readyz"), "worker ready", 60)
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            before = scrape(metrics_url)
            p = Pipeline(client, settings)

            done = await p.submit_file(write_list(tmp_path / "a1.csv", emails("a1", 250)), "alice", priority="high")
            assert (await asyncio.wait_for(done.result(), 60)).state == "completed"

            # Hold a second list of alice's in `processing`: its lane is paused.
            await client.start_workflow(
                GreedySchedulerWorkflow.run, scheduler_input(settings, LANE), id=scheduler_id(LANE),
                task_queue=settings.task_queue, start_signal="pause", start_signal_args=[LanePause("held by the test")],
            )
            held = await p.submit_file(write_list(tmp_path / "a2.csv", emails("a2", 120)), "alice")
            bobs = await p.submit_file(write_list(tmp_path / "b.csv", emails("b", 30)), "bob")

            async def prepared():
                progress = await held.query(UserBatchWorkflow.progress)
                return progress if progress is not None and progress.state == "queued" else None

            await eventually(prepared, "the held batch prepared")

            # The stock CLI finds each by the search attributes the workflows keep current. (This
            # test's task queue keeps other tests' workflows on the shared server out.)
            mine = f' AND TaskQueue="{settings.task_queue}"'
            await expect_listed(address, 'UserId="alice" AND BatchState="processing"' + mine, {held.id})
            await expect_listed(address, 'UserId="alice" AND BatchState="completed"' + mine, {done.id})
            await expect_listed(address, 'UserId="alice" AND Priority="high"' + mine, {done.id})
            await expect_listed(address, 'UserId="bob"' + mine, {bobs.id})
            await expect_listed(address, 'Lane="deliverability" AND BatchState="paused"' + mine, {scheduler_id(LANE)})

            # What the Web UI shows: the static summary (scheduler) and current details in words.
            meta = await held.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
            assert meta.current_details.startswith("processing: 0 of 120 addresses verified; 0 Bouncer batches")
            sched_meta = await client.get_workflow_handle(scheduler_id(LANE)).query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata)
            assert sched_meta.current_details.startswith(f"lane {LANE} paused: held by the test; 0 Bouncer batches")

            # The queue-depth gauge sees the held work; the health check calls it degraded (lane paused).
            await eventually(lambda: total(scrape(metrics_url), "pipeline_queue_depth", lane=LANE) == 150,
                             "queue depth")
            code, report = await asyncio.to_thread(run_health, settings)
            assert (code, report["status"]) == (1, "degraded"), report
            assert {c["name"]: c["status"] for c in report["checks"]}[f"scheduler_{LANE}"] == "degraded"

            await client.get_workflow_handle(scheduler_id(LANE)).signal(GreedySchedulerWorkflow.resume)
            for h in (held, bobs):
                assert (await asyncio.wait_for(h.result(), 60)).state == "completed"
            await expect_listed(address, 'UserId="alice" AND BatchState="completed"' + mine, {done.id, held.id})
            desc = await client.get_workflow_handle(scheduler_id(LANE)).describe()
            assert await desc.static_summary() == scheduler_summary(LANE)

            # Our series moved during the run, and the SDK's are on the same page.
            await eventually(lambda: total(scrape(metrics_url), "pipeline_queue_depth", lane=LANE) == 0,
                             "queue drained")
            after = scrape(metrics_url)
            verified = total(after, "pipeline_addresses_verified_total", lane=LANE) - total(
                before, "pipeline_addresses_verified_total", lane=LANE)
            assert verified == 400
            assert total(after, "bouncer_api_requests_total", endpoint="create", code="200") >= 4
            assert total(after, "bouncer_api_requests_total", endpoint="download", code="200") >= 4
            assert total(after, "bouncer_api_request_duration_seconds_count", endpoint="create") >= 4
            assert total(after, "bouncer_credits_remaining") > 0
            assert total(after, "pipeline_rate_limit_budget_per_minute", budget="create") == 6000
            assert 0 < total(after, "pipeline_rate_limit_utilization", budget="create") < 0.01
            assert ("pipeline_in_flight_batches", (("lane", LANE),)) in after
            assert ("pipeline_dead_letters", (("lane", LANE),)) in after
            completed = "temporal_workflow_completed_total"  # the SDK's own series, on the same page
            assert total(after, completed) > total(before, completed)

            code, report = await asyncio.to_thread(run_health, settings)
            assert (code, report["status"]) == (0, "healthy"), report
        assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]

    # Tracing: the worker's spans reached the OTLP endpoint (flushed at the latest on shutdown).
    # (Workflows started by a client without the interceptor, here the user batches, trace their activities.)
    expected = {"RunWorkflow:GreedySchedulerWorkflow", "StartWorkflow:BouncerBatchWorkflow",  # by the pack activity
                "RunWorkflow:BouncerBatchWorkflow", "HandleSignal:pause", "RunActivity:prepare_user_batch",
                "RunActivity:submit_batch", "RunActivity:store_results"}
    assert expected <= set(span_names), " | ".join(sorted(set(span_names)))
    await end_schedulers(client)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ---- health: degraded, alerts once per crossing, down ------------------------------------------


def events(p: Pipeline) -> list[tuple[str, str]]:
    return [tuple(r) for r in p.sql("select kind, subject from events where kind like 'alert.%%' order by id")]


async def test_health_raises_each_alert_once_per_crossing_and_clears_it_when_back_under(
    dev_env, db_url, sandbox, tmp_path
):
    from ops import health
    from ops.metrics import ApiUsage
    from worker import bouncer_client

    client = dev_env.client
    settings = make_settings(db_url, sandbox, batch_size=10, alert_backlog_batches=1, alert_credits_floor=500,
                             alert_rate_utilization=0.9,
                             temporal_address=client.service_client.config.target_host)

    async def check() -> health.Report:
        return await health.check(settings, lambda lane: bouncer_client(settings, lane))

    async with running_pipeline(client, settings) as p:
        await client.start_workflow(
            GreedySchedulerWorkflow.run, scheduler_input(settings, LANE), id=scheduler_id(LANE),
            task_queue=settings.task_queue, start_signal="pause", start_signal_args=[LanePause("held by the test")],
        )
        handle = await p.submit_file(write_list(tmp_path / "c.csv", emails("c", 30)), "carol")
        await eventually(lambda: p.sql("select state from user_batches") == [("queued",)], "prepared")
        httpx.post(f"{sandbox.url}/_sandbox/credits", json={"credits": 100}).raise_for_status()
        # 5,500 creations this minute (as workers flush them) against a budget of 6,000 a minute.
        usage = ApiUsage()
        for _ in range(5500):
            usage.observe("create", "201", 0.01)
        import db as dbmod

        pool = dbmod.open_pool(settings.database_url, 1)
        await pool.open()
        await usage.flush(pool)
        await pool.close()

        first = await check()
        assert (first.status, first.exit_code) == ("degraded", 1)
        firing = {a["name"] for a in first.alerts if a["firing"]}
        assert firing == {"backlog", "credits", "rate_limit_create"}, first.alerts
        assert first.readings["backlog_batches"] == 3.0
        assert sorted(events(p)) == [("alert.raised", "backlog"), ("alert.raised", "credits"),
                                     ("alert.raised", "rate_limit_create")]

        again = await check()  # still over: no new events
        assert {a["name"] for a in again.alerts if a["firing"]} == firing
        assert not any(a["changed"] for a in again.alerts)
        assert len(events(p)) == 3

        httpx.post(f"{sandbox.url}/_sandbox/credits", json={"credits": 1_000_000}).raise_for_status()
        await client.get_workflow_handle(scheduler_id(LANE)).signal(GreedySchedulerWorkflow.resume)
        assert (await asyncio.wait_for(handle.result(), 60)).state == "completed"
        p.sql("update api_usage set minute = minute - interval '1 hour' returning 1")  # a quiet hour later

        cleared = await check()
        assert (cleared.status, cleared.exit_code) == ("healthy", 0), [c for c in cleared.checks if c.status != "ok"]
        assert events(p)[3:] and sorted(events(p)[3:]) == [("alert.cleared", "backlog"), ("alert.cleared", "credits"),
                                                           ("alert.cleared", "rate_limit_create")]
        assert len(events(p)) == 6
        await check()
        assert len(events(p)) == 6


def health_cli(**env: str) -> tuple[int, dict]:
    from typer.testing import CliRunner

    import starter

    overrides: dict[str, str | None] = {k: None for k in os.environ if k.startswith(("TEMPORAL_", "BOUNCER_", "CATCHALL_"))}
    overrides.update(env)
    result = CliRunner(env=overrides).invoke(starter.app, ["health", "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout)


def test_health_is_down_when_temporal_or_postgres_cannot_be_reached(db_url, sandbox, tmp_path):
    code, report = health_cli(DATABASE_URL=db_url, TEMPORAL_ADDRESS="127.0.0.1:1", BOUNCER_BASE_URL=sandbox.url,
                              BOUNCER_API_KEY=sandbox.api_key, CATCHALL_BASE_URL=f"{sandbox.url}/catchall",
                              CATCHALL_API_KEY=sandbox.api_key)
    assert (code, report["status"]) == (2, "down")
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["temporal"]["status"] == "down" and "127.0.0.1:1" in checks["temporal"]["detail"]
    assert checks["postgres"]["status"] == "ok" and checks["bouncer"]["status"] == "ok"
    assert checks["bouncer_catchall"]["status"] == "ok"
    assert checks["bouncer_catchall"]["detail"].startswith(f"{sandbox.url}/catchall: ")

    # The catchall lane's endpoint is checked too: down while the deliverability one answers.
    code, report = health_cli(DATABASE_URL=f"postgresql://postgres@/nodb?host={tmp_path}",
                              TEMPORAL_ADDRESS="127.0.0.1:1", BOUNCER_BASE_URL="http://127.0.0.1:1",
                              CATCHALL_BASE_URL="http://127.0.0.1:2", CATCHALL_API_KEY="k")
    assert (code, report["status"]) == (2, "down")
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks == {"temporal": "down", "postgres": "down", "bouncer": "degraded", "bouncer_catchall": "degraded"}
    detail = next(c["detail"] for c in report["checks"] if c["name"] == "bouncer_catchall")
    assert "catchall lane" in detail and "127.0.0.1:2" in detail


async def test_status_watch_redraws_lanes_api_use_credits_and_dead_letters(dev_env, db_url):
    from typer.testing import CliRunner

    import starter

    await end_schedulers(dev_env.client)  # a scheduler left by another test would show its lane as running

    env = {k: None for k in os.environ if k.startswith(("TEMPORAL_", "BOUNCER_"))}
    env.update(DATABASE_URL=db_url, TEMPORAL_ADDRESS=dev_env.client.service_client.config.target_host,
               COLUMNS="120", CREATIONS_PER_MINUTE="50")  # 25 creations this minute: half the budget
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("insert into alert_state (name, firing, value) values ('credits', false, 123456)")
        conn.execute("insert into api_usage (minute, budget, requests)"
                     " values (date_trunc('minute', now()), 'create', 25)")
    result = await asyncio.to_thread(
        CliRunner(env=env).invoke, starter.app, ["status", "--watch", "--interval", "0.05", "--count", "2"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("Ctrl-C to stop") >= 1
    for needle in ("lanes", "deliverability", "not started", "Bouncer API (all workers)", "50%",
                   "credits: 123,456", "dead letters: 0"):
        assert needle in result.stdout, needle

    doc = json.loads((await asyncio.to_thread(CliRunner(env=env).invoke, starter.app, ["status", "--json"])).stdout)
    assert doc["api"]["create"] == {"requests_per_minute": 25, "budget_per_minute": 50.0, "utilization": 0.5}
    assert doc["credits"]["credits"] == 123456


async def test_readyz_holds_while_every_pooled_connection_is_busy(db_url):
    """A worker whose pool is all in use (stores at full load) is busy, not unready: /readyz answers
    200 at once. It used to wait 2 s for a pooled connection and answer 503, and after two probes
    Kubernetes took the worker (and its callback receiver) out of service."""
    from psycopg_pool import AsyncConnectionPool

    from ops.server import create_app

    async with AsyncConnectionPool(db_url, min_size=1, max_size=1, open=False) as pool:
        await pool.open(wait=True)
        app = create_app(pool, None, alive=lambda: True, draining=lambda: False)
        async with pool.connection(), httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                                        base_url="http://worker") as http:
            answer = await http.get("/readyz")
        assert (answer.status_code, answer.json()) == (200, {"ready": True})
        broken = AsyncConnectionPool("postgresql://nobody@127.0.0.1:1/none", min_size=0, max_size=1, open=False)
        answer = await httpx.AsyncClient(transport=httpx.ASGITransport(
            app=create_app(broken, None, alive=lambda: True, draining=lambda: False)), base_url="http://w").get("/readyz")
        assert answer.status_code == 503 and answer.json()["reason"].startswith("postgres:")


def test_a_worker_whose_port_is_taken_stops_at_once_naming_the_setting(dev_env, db_url, sandbox):
    """CALLBACK_LISTEN on a port something else holds: the worker exits before it polls any work,
    with the setting named. It used to start its pollers, log "worker up", and then leave from
    inside uvicorn's task (sys.exit, past the drain) with a bare bind error."""
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = f"127.0.0.1:{held.getsockname()[1]}"
    settings = make_settings(db_url, sandbox, callback_listen=taken,
                             temporal_address=dev_env.client.service_client.config.target_host)
    try:
        run = subprocess.run([sys.executable, "worker.py"], cwd=ROOT, env=settings_env(settings),
                             capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert run.returncode != 0
    assert f"cannot listen on {taken} (CALLBACK_LISTEN)" in run.stderr, run.stderr[-2000:]
    assert "worker up" not in run.stderr

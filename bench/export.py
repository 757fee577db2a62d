"""`python -m bench export`: a verified list's per-row results handed back, through the real
`starter.py results` (CSV and JSON) and the HTTP API's `GET /v1/batches/{id}/results`.

The list is verified first by the pipeline with the API's limits lifted (`pipeline_s`, not part of
the export figures). Each export is then timed alone: wall time, rows/s, the exporting process's
CPU and peak RSS, and Postgres' CPU (it renders the rows). Rows are counted in the output, not
taken on trust. The CSV export runs first, right after the list completed, as after `submit
--wait`: its Postgres CPU includes setting the hint bits of the rows the pipeline just wrote,
which the later exports of the same rows no longer pay.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import orjson

from bench.common import bench_stack, cpu_seconds, peak_rss_mb, proc_cpu_s, submit, wait_completed, write_lists
from devstack import ROOT, free_port


def _timed(st, argv: list[str]) -> tuple[float, float, float]:
    """Run `argv` from the project root with the stack's environment: (wall s, CPU s, peak RSS MB)."""
    began = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **st.env()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv[1:4])} failed: {err.decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _figures(rows: int, wall: float, cpu: float, rss: float, pg_cpu: float) -> dict:
    return {"rows": rows, "wall_s": round(wall, 2), "rows_per_s": round(rows / wall), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(rss, 1), "postgres_cpu_s": round(pg_cpu, 2)}


def _cli(st, ub: int, fmt: str) -> dict:
    out = st.root / f"results.{fmt}"
    pg0 = cpu_seconds(st).get("postgres", 0.0)
    wall, cpu, rss = _timed(st, [sys.executable, "starter.py", "results", str(ub), "-o", str(out), "--format", fmt])
    pg_cpu = cpu_seconds(st).get("postgres", 0.0) - pg0
    if fmt == "csv":
        with out.open("rb") as f:
            rows = sum(1 for _ in f) - 1  # the header (no field holds a line break here)
    else:
        rows = len(orjson.loads(out.read_bytes()))
    figures = _figures(rows, wall, cpu, rss, pg_cpu) | {"file_mb": round(out.stat().st_size / 1e6, 1)}
    out.unlink()
    return figures


def _http(st, ub: int) -> dict:
    """`python -m api` as its own process; the client streams the CSV and counts its lines."""
    port = free_port()
    key = subprocess.run([sys.executable, "starter.py", "apikeys", "create", "--user", "user0"], cwd=ROOT,
                         env={**os.environ, **st.env()}, capture_output=True, check=True)
    token = key.stdout.decode().strip()
    api = subprocess.Popen([sys.executable, "-m", "api", "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                           env={**os.environ, **st.env()}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or api.poll() is not None:
                    raise RuntimeError("the HTTP API did not start") from None
                time.sleep(0.1)
        api_cpu0 = proc_cpu_s(api.pid, reaped=False)
        pg0 = cpu_seconds(st).get("postgres", 0.0)
        began = time.monotonic()
        lines = 0
        with httpx.stream("GET", f"{url}/v1/batches/{ub}/results", headers={"Authorization": f"Bearer {token}"},
                          timeout=600) as r:
            r.raise_for_status()
            for chunk in r.iter_bytes():
                lines += chunk.count(b"\n")
        wall = time.monotonic() - began
        pg_cpu = cpu_seconds(st).get("postgres", 0.0) - pg0
        api_cpu = proc_cpu_s(api.pid, reaped=False) - api_cpu0
        rss = peak_rss_mb(api.pid)
    finally:
        api.terminate()
        api.wait(10)
    return _figures(lines - 1, wall, api_cpu, rss, pg_cpu)


def run(rows: int) -> dict:
    env = {"CREATIONS_PER_MINUTE": "1000000", "REQUESTS_PER_MINUTE": "1000000", "POLL_INTERVAL_S": "1"}
    with bench_stack(["--no-limits", "--speed", "0", "--credits", str(10 * rows)], env) as st:
        (path,) = write_lists(st.root / "lists", 1, rows, uuid.uuid4().hex[:6])
        began = time.monotonic()
        ub = submit(st, path, "user0")["user_batch_id"]
        pipeline_s = wait_completed(st, [ub], 3600) - began
        result = {"benchmark": "export", "rows": rows, "pipeline_s": round(pipeline_s, 2),
                  "cli_csv": _cli(st, ub, "csv"), "cli_json": _cli(st, ub, "json"), "http_csv": _http(st, ub)}
    return result

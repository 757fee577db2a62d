"""`python -m bench ingest`: one large list through the real `starter.py submit --json`.

No worker runs: the figure is the starter's own cost of reading, checking and COPYing the
rows (`ingest_s`, measured by the starter from its first insert to its commit), plus the
whole process's wall time (imports, Temporal connection, workflow start) and peak RSS. CPU
seconds of the starter and of Postgres (the COPY runs there) say which side bounds the rate.
"""

from __future__ import annotations

import time
import uuid

from bench.common import bench_stack, cpu_seconds, submit, write_lists


def run(rows: int) -> dict:
    with bench_stack([], {}, workers=0) as st:
        (path,) = write_lists(st.root / "lists", 1, rows, uuid.uuid4().hex[:6])  # not timed
        size_mb = path.stat().st_size / 1e6
        pg_before = cpu_seconds(st).get("postgres", 0.0)
        began = time.monotonic()
        result = submit(st, path, "user0")
        wall = time.monotonic() - began
        pg_cpu = cpu_seconds(st).get("postgres", 0.0) - pg_before
    return {
        "benchmark": "ingest",
        "rows": result["rows"],
        "invalid": result["invalid"],
        "file_mb": round(size_mb, 1),
        "ingest_s": result["ingest_s"],
        "ingest_rows_per_s": round(result["rows"] / result["ingest_s"]),
        "submit_wall_s": round(wall, 2),
        "starter_cpu_s": round(result["cpu_s"], 2),
        "postgres_cpu_s": round(pg_cpu, 2),
        "starter_peak_rss_mb": round(result["peak_rss_mb"], 1),
    }

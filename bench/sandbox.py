"""`python -m bench sandbox`: the sandbox's own CPU per address, as the pipeline drives it.

The pipeline benchmark shares two cores with the sandbox, so every CPU second the sandbox
spends is taken from the pipeline it measures. This starts the sandbox alone
(`--no-limits --speed 0`, as `bench pipeline` does) and, like the worker, creates batches of
`--batch-size` {email, name} entries over HTTP, polls their status with stats, and downloads
the results; then it reads the sandbox's CPU seconds from /proc.

The addresses are the same on every run (`bench.common.write_lists`' shape, fixed tag), and
`results_sha256` hashes the SHA-256 of every downloaded body in creation order: equal
digests on two commits mean byte-identical answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

from bench.common import tree_cpu_s
from sandbox.process import running_sandbox

API_KEY = "bench-sandbox-key"
BATCH = "/v1.1/email/verify/batch"


def batch_body(start: int, size: int, users: int = 20) -> bytes:
    """Entries `start`..`start + size` of the run, shaped like the pipeline's lists and names."""
    return orjson.dumps([
        {"email": f"u{i % users}.bench.{i}@company{i % 997}.example", "name": str(i + 1)}
        for i in range(start, start + size)
    ])


@contextlib.contextmanager
def profiled(pid: int, path: str | None) -> Iterator[None]:
    """py-spy (from the venv) sampling `pid` into `path` (raw stacks) while the block runs."""
    if not path:
        yield
        return
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
                             "--output", path, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let py-spy attach before the load starts
    try:
        yield
    finally:
        proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        proc.wait(timeout=30)


async def _one_batch(http: httpx.AsyncClient, start: int, size: int) -> tuple[bytes, Counter[str], int]:
    """Create, poll until completed (status with stats, as the worker polls), download all."""
    created = await http.post(BATCH, content=batch_body(start, size), headers={"content-type": "application/json"})
    created.raise_for_status()
    batch_id = created.json()["batchId"]
    polls = 0
    while True:
        polls += 1
        status = await http.get(f"{BATCH}/{batch_id}", params={"with-stats": "true"})
        status.raise_for_status()
        if status.json()["status"] == "completed":
            break
        await asyncio.sleep(0.01)
    response = await http.get(f"{BATCH}/{batch_id}/download", params={"download": "all"})
    response.raise_for_status()
    statuses = Counter(record["status"] for record in orjson.loads(response.content))
    return hashlib.sha256(response.content).digest(), statuses, polls


async def _drive(url: str, addresses: int, batch_size: int, concurrency: int) -> dict:
    starts = list(range(0, addresses, batch_size))
    body_digests = [b""] * len(starts)
    statuses: Counter[str] = Counter()
    polls = 0
    queue = iter(enumerate(starts))

    async with httpx.AsyncClient(base_url=url, headers={"x-api-key": API_KEY}, timeout=120.0) as http:
        async def lane() -> None:
            nonlocal polls
            for index, start in queue:
                body, counts, n = await _one_batch(http, start, min(batch_size, addresses - start))
                body_digests[index] = body
                statuses.update(counts)
                polls += n

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        stats = (await http.get("/_sandbox/stats")).json()
    digest = hashlib.sha256(b"".join(body_digests))
    return {"batches": len(starts), "status_polls": polls, "statuses": dict(sorted(statuses.items())),
            "results_sha256": digest.hexdigest(), "sandbox_stats": stats}


def run(addresses: int, batch_size: int = 10_000, concurrency: int = 4, profile: str | None = None) -> dict:
    with running_sandbox(API_KEY, "--no-limits", "--speed", "0", "--credits", str(10 * addresses)) as sb:
        pid = sb.process.pid
        with profiled(pid, profile):
            cpu_before = tree_cpu_s(pid)
            began = time.monotonic()
            driven = asyncio.run(_drive(sb.url, addresses, batch_size, concurrency))
            wall = time.monotonic() - began
            cpu = tree_cpu_s(pid) - cpu_before
        rss = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")), None)
    stats = driven.pop("sandbox_stats")
    return {
        "benchmark": "sandbox",
        "addresses": addresses,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "sandbox_cpu_s": round(cpu, 2),
        "us_per_address": round(cpu / addresses * 1e6, 2),
        "wall_s": round(wall, 2),
        "sandbox_peak_rss_mb": round(rss, 1) if rss else None,
        **driven,
        "addresses_received": stats["addresses_received"],
        "unique_addresses_received": stats["unique_addresses_received"],
        "addresses_sent_twice": stats["addresses_sent_twice"],
        "credits_charged": stats["credits_charged"],
        "requests": stats["requests"],
    }

"""Run the sandbox as a child process (tests, benchmarks, dev scripts).

    with running_sandbox("KEY", "--time-scale", "100") as sb:
        httpx.get(sb.url + "/v1.1/credits", headers={"x-api-key": sb.api_key})

The child listens on a free port of 127.0.0.1 (`--port 0`) and announces its URL on stdout;
leaving the block stops it (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_ANNOUNCEMENT = "sandbox listening on "


@dataclass(frozen=True)
class RunningSandbox:
    url: str
    api_key: str
    process: subprocess.Popen[str]


def start_sandbox(api_key: str, *args: str, startup_timeout: float = 15.0) -> RunningSandbox:
    """Start `python -m sandbox` with extra CLI `args`; return once it accepts connections."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", "0", "--api-key", api_key, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=_PROJECT_ROOT,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + startup_timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or process.poll() is not None:
                stop_sandbox(process)
                raise RuntimeError(f"sandbox did not start (exit code {process.returncode})")
            if selector.select(timeout=remaining):
                line = process.stdout.readline()
                if line.startswith(_ANNOUNCEMENT):
                    return RunningSandbox(url=line[len(_ANNOUNCEMENT) :].strip(), api_key=api_key, process=process)
                if not line:  # EOF: the child is exiting
                    process.wait(timeout=5)


def stop_sandbox(process: subprocess.Popen[str], grace: float = 5.0) -> None:
    """SIGTERM (a graceful stop saves `--state-file`), then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def running_sandbox(api_key: str, *args: str) -> Iterator[RunningSandbox]:
    sandbox = start_sandbox(api_key, *args)
    try:
        yield sandbox
    finally:
        stop_sandbox(sandbox.process)

"""`python -m sandbox --host 127.0.0.1 --port 8299 --api-key KEY [...]`.

Prints `sandbox listening on http://HOST:PORT` once it accepts connections (`--port 0`
picks a free port and prints it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys

import uvicorn

from sandbox.app import SandboxConfig, create_app


def parse_args(argv: list[str] | None = None) -> SandboxConfig:
    p = argparse.ArgumentParser(prog="python -m sandbox", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8299)
    p.add_argument("--api-key", required=True)
    p.add_argument("--credits", type=int, default=1_000_000)
    p.add_argument("--time-scale", type=float, default=1.0, help="speed-up of processing and windows")
    p.add_argument("--speed", type=float, default=50.0, help="addresses/s per batch; <= 0 instant")
    p.add_argument("--max-processing", type=int, default=25)
    p.add_argument("--create-per-minute", type=int, default=60)
    p.add_argument("--requests-per-minute", type=int, default=200)
    p.add_argument("--no-limits", action="store_true", help="lift rate limits and max-processing")
    p.add_argument("--state-file", default=None, help="load at start, save at shutdown")
    a = p.parse_args(argv)
    if a.time_scale <= 0:
        p.error("--time-scale must be > 0")
    return SandboxConfig(
        api_key=a.api_key,
        host=a.host,
        port=a.port,
        credits=a.credits,
        time_scale=a.time_scale,
        speed=a.speed,
        max_processing=a.max_processing,
        create_per_minute=a.create_per_minute,
        requests_per_minute=a.requests_per_minute,
        no_limits=a.no_limits,
        state_file=a.state_file,
    )


class _AnnouncingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self._url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            print(f"sandbox listening on {self._url}", flush=True)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # protocol says TCP; without it every keep-alive answer waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sys.exit(f"sandbox: cannot listen on {config.host}:{config.port}: {exc}")
    sock.listen(2048)
    port = sock.getsockname()[1]
    host = f"[{config.host}]" if family == socket.AF_INET6 else config.host
    server_config = uvicorn.Config(
        create_app(config), log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    tune_gc()
    asyncio.run(_AnnouncingServer(server_config, f"http://{host}:{port}").serve(sockets=[sock]))


def tune_gc() -> None:
    """Collect young objects less often, and never re-scan what startup built.

    The sandbox keeps millions of long-lived objects (entries, digests) and allocates several
    containers per address it serves; at CPython's default threshold (700) the collector
    re-scanned that heap every few batches: ~40% of the sandbox's CPU in `bench sandbox`.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


if __name__ == "__main__":
    main()

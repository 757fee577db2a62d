"""`python -m api [--listen host:port]`: serve the HTTP API (API_LISTEN, default 127.0.0.1:8080)."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from api.app import create_app
from settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", help="host:port (overrides API_LISTEN)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    host, _, port = (args.listen or settings.api_listen).rpartition(":")
    # Access logs carry paths and query strings only (no bodies, no keys: those are headers).
    uvicorn.run(create_app(settings), host=host or "127.0.0.1", port=int(port), log_level="info")


if __name__ == "__main__":
    main()

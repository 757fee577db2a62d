"""Benchmarks: programs that start the embedded stack themselves and print one JSON object.

    python -m bench pipeline --addresses 2000000 --users 20 [--workers 2] --json
"""

from __future__ import annotations

import argparse
import os
import sys

import orjson


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("pipeline", help="our overhead end to end, API limits lifted")
    p.add_argument("--addresses", type=int, default=200_000)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")
    args = parser.parse_args()

    if args.name == "pipeline":
        from bench import pipeline

        result = pipeline.run(args.addresses, args.users, args.workers)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # see starter.main: the Temporal SDK's native threads can abort finalization


if __name__ == "__main__":
    main()

"""Benchmarks: programs that start the embedded stack themselves and print one JSON object.

    python -m bench pipeline --addresses 2000000 --users 20 [--workers 2] [--sql-stats] --json
    python -m bench saturation [--callback/--no-callback] --json
    python -m bench fairness --json
    python -m bench dispatch --json
    python -m bench ingest --rows 2000000 --json
    python -m bench export --rows 2000000 --json
    python -m bench chaos --addresses 200000 [--no-kills] [--no-temporal-restart] ... --json
    python -m bench sandbox --addresses 2000000 [--profile FILE] --json

BENCH_KEEP=1 keeps a run's stack directory (logs, Postgres data, Temporal's SQLite) and prints it.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    p.add_argument("--sql-stats", action="store_true", help="also report the top statements (pg_stat_statements), Postgres' CPU by statement (sampled) and its writes (pg_stat_io)")
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("saturation", help="slot utilization and dispatch gaps under the documented limits")
    p.add_argument("--callback", action=argparse.BooleanOptionalAction, default=True,
                   help="completion callbacks on (default) or off (polling only)")
    p.add_argument("--time-scale", type=float, default=20.0)
    p.add_argument("--speed", type=float, default=30.0, help="sandbox addresses/s per batch (before scaling)")
    p.add_argument("--batches", type=int, default=45, help="backlog in Bouncer batches (3 × 15 slots)")
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--slots", type=int, default=15,
                   help="MAX_CONCURRENT_BATCHES (1: turnovers one at a time, with nothing else running)")
    p.add_argument("--profile", metavar="DIR", help="py-spy the worker and the sandbox into DIR (raw stacks)")
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("fairness", help="a 100-address list behind a 1M import: fair share vs FIFO")
    p.add_argument("--big", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--time-scale", type=float, default=25.0)
    p.add_argument("--speed", type=float, default=50.0, help="sandbox addresses/s per batch (before scaling)")
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("dispatch", help="submit → first and last Bouncer batch created at the API")
    p.add_argument("--lists", type=int, default=5)
    p.add_argument("--per-list", type=int, default=10_000)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--warm", action="store_true", help="start the lane's scheduler before the first submit")
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("ingest", help="one list through `starter.py submit`: rows/s, wall time, peak RSS")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("export", help="a verified list's results out: starter.py results (CSV, JSON), HTTP API")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("chaos", help="the pipeline under crashes and API faults, then an audit")
    p.add_argument("--addresses", type=int, default=200_000)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2000)
    p.add_argument("--duration", type=float, help="seconds the faults are spread over (default: from --addresses)")
    p.add_argument("--kills", type=int, default=6, help="worker SIGKILLs (0: none)")
    p.add_argument("--no-kills", dest="kills", action="store_const", const=0)
    for flag, what in (("second-worker", "a second worker for part of the run"),
                       ("temporal-restart", "stop and restart the Temporal dev server once"),
                       ("postgres-restart", "stop and restart Postgres once"),
                       ("api-faults", "sandbox 5xx, 429, slow answers, dropped connections"),
                       ("credits-episode", "a 402 episode ended by a top-up")):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=True, help=what)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")

    p = sub.add_parser("sandbox", help="the sandbox's own CPU per address (create, poll, download)")
    p.add_argument("--addresses", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=4, help="batches in flight at once")
    p.add_argument("--profile", metavar="FILE", help="py-spy the sandbox into FILE (raw stacks)")
    p.add_argument("--json", action="store_true", help="print one JSON object (always on)")
    args = parser.parse_args()
    # `timeout` and Ctrl-C must still tear the stack down (the `finally` of bench_stack).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.name == "pipeline":
        from bench import pipeline

        result = pipeline.run(args.addresses, args.users, args.workers, sql_stats=args.sql_stats)
    elif args.name == "saturation":
        from bench import saturation

        result = saturation.run(args.callback, args.time_scale, args.speed, args.batches, args.batch_size,
                                profile=args.profile, slots=args.slots)
    elif args.name == "fairness":
        from bench import fairness

        result = fairness.run(args.big, args.small, args.time_scale, args.speed)
    elif args.name == "dispatch":
        from bench import dispatch

        result = dispatch.run(args.lists, args.per_list, args.time_scale, args.warm)
    elif args.name == "ingest":
        from bench import ingest

        result = ingest.run(args.rows)
    elif args.name == "export":
        from bench import export

        result = export.run(args.rows)
    elif args.name == "chaos":
        from bench import chaos

        faults = chaos.Faults(args.kills, args.second_worker, args.temporal_restart, args.postgres_restart,
                              args.api_faults, args.credits_episode)
        result = chaos.run(args.addresses, args.users, args.batch_size, args.duration, faults, args.seed)
    elif args.name == "sandbox":
        from bench import sandbox

        result = sandbox.run(args.addresses, args.batch_size, args.concurrency, args.profile)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # see starter.main: the Temporal SDK's native threads can abort finalization


if __name__ == "__main__":
    main()

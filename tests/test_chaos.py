"""A small chaos run in CI: every fault on, then the invariants (`python -m bench chaos` at scale).

It starts its own embedded stack (Postgres, Temporal dev server on a SQLite file, the sandbox,
worker processes) on free ports, like the benchmark does.
"""

from __future__ import annotations

from bench import chaos


def test_a_chaos_run_with_every_fault_loses_nothing_pays_once_and_leaks_nothing():
    result = chaos.run(2000, users=2, batch_size=250, duration=12.0, faults=chaos.Faults(kills=5), seed=7,
                       timeout=240.0)

    applied = result["faults_applied"]
    assert applied.get("kill_worker", 0) >= 5, result["timeline"]
    for fault in ("start_second_worker", "restart_temporal", "restart_postgres", "credits_low",
                  "credits_topped_up", "api_faults_before", "api_faults_after"):
        assert applied.get(fault) == 1, (fault, result["timeline"])

    assert result["items_in"] == 2000 and result["items_terminal"] == 2000
    assert result["items_lost"] == 0
    assert result["duplicate_results"] == 0
    assert result["addresses_sent_twice"] == 0  # never re-sent once a result had been downloaded
    assert result["user_batches_completed"] == 2
    assert result["queue_rows_left"] == 0
    assert result["addresses_in_histories"] == 0 and result["history_runs_scanned"] > 5
    # Rows in = rows out, each terminal; invalid rows never reached the API.
    assert sum(result["by_state"].values()) == 2000 and result["by_state"].get("invalid", 0) > 0
    # What faults cost is reported (ambiguous creates and abandoned batches are charged again).
    assert result["credits_wasted"] >= 0 and result["ambiguous_creates"] >= 0

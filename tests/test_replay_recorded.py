"""Histories recorded by earlier releases replay against today's workflow code.

Workflows run for hours (the schedulers forever), so a deploy meets histories written by the
previous code. `tests/histories/<release>/` holds histories captured from the scenario tests of
tests/test_workflows.py (`RECORD_HISTORIES=dir pytest tests/test_workflows.py`): polling,
callbacks, lane and batch pause, cancel, continue-as-new; since v10 also the event dispatcher's
(`RECORD_HISTORIES=dir pytest tests/test_events.py -k dead_subscriber`); v11 also the failure
scenarios of tests/test_failures.py (a stuck batch finished early, credits, a refused key), picked
so that every patch, activity, signal and event type recorded appears at least once; v12 the
messages handled before `run` began (`-k first_task`). A change that
would break them needs `workflow.patched()`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from worker import WORKFLOWS

FILES = sorted(Path(__file__).parent.glob("histories/*/*.json.gz"))


def test_recorded_histories_exist():
    assert len(FILES) >= 30


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name.removesuffix('.json.gz')}")
async def test_recorded_history_replays(path: Path):
    history = WorkflowHistory.from_json(path.name.removesuffix(".json.gz").rsplit("-", 1)[0], gzip.decompress(path.read_bytes()).decode())
    await Replayer(workflows=WORKFLOWS).replay_workflow(history)

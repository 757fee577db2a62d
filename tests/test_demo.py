"""`make demo` (demo.main) and a dev stack the user already runs (`starter.py dev up`)."""

from __future__ import annotations

import os

import pytest

import demo
from devstack import DevStack


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """demo.main() with the stack's parts and the demo's run replaced by a record of the calls."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dev").mkdir()
    made: list[str] = []
    monkeypatch.setattr(DevStack, "up", lambda self, worker=True: made.append("up"))
    monkeypatch.setattr(DevStack, "down", lambda self: made.append("down"))
    monkeypatch.setattr(demo, "run_demo", lambda st, began, shared=False: made.append(f"run shared={shared}"))
    monkeypatch.delenv("KEEP", raising=False)
    return made


def test_the_demo_leaves_a_stack_it_did_not_start_running(calls, tmp_path):
    # A worker started by `starter.py dev up` (any live process will do for its pid file).
    (tmp_path / ".dev" / "worker.pid").write_text(str(os.getpid()))
    demo.main()
    assert calls == ["up", "run shared=True"]


def test_the_demo_stops_the_stack_it_started(calls):
    demo.main()
    assert calls == ["up", "run shared=False", "down"]

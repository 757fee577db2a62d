"""The dev stack's pid files: `dev down` signals only the processes `dev up` started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from devstack import DevStack, _alive, _started


def test_a_pid_file_naming_a_process_we_did_not_start_is_never_signalled(tmp_path):
    stack = DevStack(tmp_path)
    ours = stack._spawn("sandbox", [sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)  # start times count 10 ms ticks
    # Someone else's process group, as a pid named in a stale pid file may be after a reboot.
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert stack.pid("sandbox") == ours.pid
        written = (tmp_path / "sandbox.pid").read_text()
        assert written == f"{ours.pid} {_started(ours.pid)}"
        # The file as if `theirs` had been given our pid: its start time is not the one recorded.
        (tmp_path / "sandbox.pid").write_text(f"{theirs.pid} {_started(ours.pid)}")
        assert stack.pid("sandbox") is None
        stack.down()
        assert theirs.poll() is None and _alive(theirs.pid), "dev down stopped a process it did not start"
        assert ours.poll() is None  # not named by the file any more: left alone too
        (tmp_path / "sandbox.pid").write_text(written)
        stack.stop("sandbox")
        assert ours.wait(timeout=10) is not None
    finally:
        for proc in (ours, theirs):
            proc.kill()
            proc.wait()


def test_settings_files_can_be_named_or_turned_off(tmp_path):
    """A dev stack's `.dev/stack.env` is read from the working directory unless SETTINGS_FILES says
    otherwise: the tests set it empty, so a stack running in the checkout does not steer their workers."""
    (tmp_path / ".dev").mkdir()
    (tmp_path / ".dev" / "stack.env").write_text("CATCHALL_BASE_URL=http://127.0.0.1:8299/catchall\n")
    (tmp_path / "other.env").write_text("CATCHALL_BASE_URL=http://other.example\n")
    probe = [sys.executable, "-c", "from settings import Settings; print(Settings().catchall_base_url)"]
    env = {k: v for k, v in os.environ.items() if k not in ("SETTINGS_FILES", "CATCHALL_BASE_URL")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)

    def read(**extra: str) -> str:
        return subprocess.run(probe, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert read() == "http://127.0.0.1:8299/catchall"
    assert read(SETTINGS_FILES="") == ""
    assert read(SETTINGS_FILES=".dev/stack.env, other.env") == "http://other.example"

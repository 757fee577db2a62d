"""After its commit a store signals `progressed` to the user batches it touched. A user batch
that has finished (the server answers NOT_FOUND) needs no news; any other failure fails the
activity, so that its retry (which finds the batch stored) signals again instead of leaving the
list to its slow recheck."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from helpers import make_settings
from temporalio.service import RPCError, RPCStatusCode

from activities.bouncer_api import BouncerApiActivities
from workflows.models import StoreRequest

REQUEST = StoreRequest(1, "deliverability", download=True, notify=True)


def _api(db_url: str, client) -> BouncerApiActivities:
    settings = make_settings(db_url, SimpleNamespace(url="http://127.0.0.1:9", api_key="unused"))
    return BouncerApiActivities(settings, None, None, client)


async def test_a_finished_user_batch_is_not_an_error(db_url, skipping_env):
    # No such workflow on the real (time-skipping) server: NOT_FOUND, as for a finished one.
    await _api(db_url, skipping_env.client)._notify(REQUEST, ["user-batch-does-not-exist-1"])


class Unavailable:
    """A client whose server cannot be reached for the moment."""

    def get_workflow_handle(self, workflow_id: str):
        async def signal(name: str) -> None:
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        return SimpleNamespace(signal=signal)


async def test_a_signal_that_could_not_be_sent_fails_the_store_for_a_retry(db_url):
    with pytest.raises(RPCError) as raised:
        await _api(db_url, Unavailable())._notify(REQUEST, ["user-batch-1"])
    assert raised.value.status == RPCStatusCode.UNAVAILABLE

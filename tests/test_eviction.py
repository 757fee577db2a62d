"""A Bouncer batch run that a stopped worker drops from its cache is closed by Python's garbage
collector: `GeneratorExit` at its current await, outside any workflow task. That is not the end
of the batch (the run goes on from its history elsewhere), so it must not try to tell the
scheduler, which would raise there ("Exception ignored" on the worker)."""

import asyncio

from workflows.bouncer_batch import BouncerBatchWorkflow
from workflows.models import BouncerBatchInput


async def test_a_run_closed_by_the_garbage_collector_signals_nothing_and_raises_nothing():
    wf = BouncerBatchWorkflow()
    finished: list = []

    async def suspended(_inp):  # the run waits at the API, as a cached run does
        await asyncio.get_running_loop().create_future()

    async def batch_finished(_inp, end):
        finished.append(end)

    wf._submit_and_wait = suspended
    wf._batch_finished = batch_finished
    run = wf.run(BouncerBatchInput(bouncer_batch_id=7, lane="deliverability"))
    run.send(None)  # now suspended at its first await
    run.close()  # what the garbage collector does; raises if the coroutine does not exit cleanly
    assert finished == []


async def test_a_run_that_ends_by_an_error_still_tells_the_scheduler():
    wf = BouncerBatchWorkflow()
    finished: list = []

    async def failing(_inp):
        raise RuntimeError("submit failed")

    async def batch_finished(_inp, end):
        finished.append(end)

    wf._submit_and_wait = failing
    wf._batch_finished = batch_finished
    try:
        await wf.run(BouncerBatchInput(bouncer_batch_id=7, lane="deliverability"))
    except RuntimeError:
        pass
    assert [f.bouncer_batch_id for f in finished] == [7]

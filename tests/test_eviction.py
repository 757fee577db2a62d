"""A Bouncer batch run that a stopped worker drops from its cache is closed by Python's garbage
collector: `GeneratorExit` at its current await, outside any workflow task. That is not the end
of the batch (the run goes on from its history elsewhere), so it must not try to tell the
scheduler, which would raise there ("Exception ignored" on the worker)."""

import asyncio

from workflows.bouncer_batch import BouncerBatchWorkflow
from workflows.models import BouncerBatchInput

INPUT = BouncerBatchInput(bouncer_batch_id=7, lane="deliverability")


def workflow_with(submit_and_wait) -> tuple[BouncerBatchWorkflow, list]:
    """The workflow with its submit replaced and the ends it reports to the scheduler recorded."""
    wf, ends = BouncerBatchWorkflow(), []

    async def batch_finished(_inp, end):
        ends.append(end)

    wf._submit_and_wait = submit_and_wait
    wf._batch_finished = batch_finished
    return wf, ends


async def test_a_run_closed_by_the_garbage_collector_signals_nothing_and_raises_nothing():
    async def suspended(_inp):  # the run waits at the API, as a cached run does
        await asyncio.get_running_loop().create_future()

    wf, ends = workflow_with(suspended)
    run = wf.run(INPUT)
    run.send(None)  # now suspended at its first await
    run.close()  # what the garbage collector does; raises if the coroutine does not exit cleanly
    assert ends == []


async def test_a_run_that_ends_by_an_error_still_tells_the_scheduler():
    async def failing(_inp):
        raise RuntimeError("submit failed")

    wf, ends = workflow_with(failing)
    try:
        await wf.run(INPUT)
    except RuntimeError:
        pass
    assert [e.bouncer_batch_id for e in ends] == [7]

"""The greedy scheduler of one lane: keeps every slot busy while queued work exists.

One per lane (`scheduler-<lane>`), runs forever through continue-as-new. It is the single
owner of the lane's slot count and the only packer. It wakes on `work_available` (a user
batch enqueued), `batch_finished` (a slot freed) and `resume`; no timer polls the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import Priority, RetryPolicy
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.bouncer_api import BouncerApiActivities
    from activities.events import EventActivities
    from activities.heartbeat import HEARTBEAT_TIMEOUT
    from activities.packing import PackingActivities
    from workflows import search
    from workflows.bouncer_batch import BouncerBatchWorkflow
    from workflows.models import (
        DONE_AT_API,
        EXPRESS_PRIORITY,
        BatchFinished,
        BouncerBatchInput,
        LaneEvent,
        LaneHold,
        LanePause,
        PackRequest,
        SchedulerInput,
        SchedulerState,
        SchedulerStatus,
        StandbyRefresh,
        bouncer_batch_summary,
        bouncer_batch_workflow_id,
    )

CREDITS_PAUSE = "out of credits"
DB_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30))


@workflow.defn
class GreedySchedulerWorkflow:
    def __init__(self) -> None:
        self._state = SchedulerState()
        self._input: SchedulerInput | None = None
        self._cap_storing = False
        self._express_hints = False
        self._starting: set[asyncio.Future] = set()  # child starts under way (not yet started)
        self._started: list[asyncio.Future] = []  # finished ones, to re-raise their errors
        # Bouncer batches heard of (`batch_finished`) before the result of the pack that formed
        # them: batch id (str) -> the last outcome heard. The pack starts their workflows, so one
        # can leave the API, or end, while this workflow's task for the pack's result is delayed
        # (a worker restart, a sticky timeout); signals are handled before that result. Matched
        # and cleared when the result is taken (so it never outlives a run).
        self._early: dict[str, str] = {}
        self._early_on = False
        # Messages handled before `run` began (delivered with the run's first task, e.g. right
        # after a continue-as-new): they met the empty default state, not the one `run` carries
        # in. Applied again to the carried state (patch `messages-before-run`).
        self._before_run: list[tuple[str, object]] = []

    # ---- messages ---------------------------------------------------------------------

    @workflow.signal
    def work_available(self) -> None:
        if self._input is None:
            self._before_run.append(("work_available", None))
        self._state.work_hint = True
        self._state.new_work = True
        self._state.express_hint = True
        self._state.ahead_drained = False
        self._state.standby_stale = True

    @workflow.signal
    def batch_finished(self, finished: BatchFinished) -> None:
        if self._input is None:
            self._before_run.append(("batch_finished", finished))
        key = str(finished.bouncer_batch_id)
        if key in self._state.standby:  # a standby batch heard of before the one it follows
            self._state.in_flight[key] = self._state.standby.pop(key)[1]
        if not any(key in slots for slots in (self._state.in_flight, self._state.storing,
                                               self._state.express_in_flight)):
            if finished.outcome != DONE_AT_API or key not in self._early:
                self._early[key] = finished.outcome
        size = self._state.in_flight.pop(key, None)
        if finished.outcome == DONE_AT_API:
            if size is not None:  # its API slot is free; its store is still to come
                self._state.storing[key] = size
        else:
            self._state.storing.pop(key, None)
        self._state.express_in_flight.pop(key, None)
        self._promote_followers(finished.bouncer_batch_id)
        self._state.work_hint = True  # a freed slot, and possibly re-queued addresses
        self._describe()  # the main loop may not wake (paused)

    @workflow.signal
    async def pause(self, request: LanePause) -> None:
        """In-flight batches finish; nothing new is dispatched until `resume`."""
        if self._input is None:
            self._before_run.append(("pause", request))
        newly = self._mark_paused(request.reason)
        self._describe()
        if newly and workflow.patched("lane-paused-event"):
            # Subscribers hear it once per pause (not once per batch that hit the 402).
            lane = workflow.info().workflow_id.removeprefix("scheduler-")
            await workflow.execute_activity_method(
                EventActivities.record_lane_paused,
                LaneEvent(lane, request.reason),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=DB_RETRY,
            )
            if request.reason == CREDITS_PAUSE and workflow.patched("credits-exhausted-event"):
                await workflow.execute_activity_method(
                    EventActivities.record_credits_exhausted,
                    LaneEvent(lane, request.reason),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=DB_RETRY,
                )

    @workflow.signal
    async def resume(self) -> None:
        if self._input is None:
            self._before_run.append(("resume", None))
        reason = self._mark_resumed()
        self._describe()
        if reason is not None and workflow.patched("lane-resumed-event"):
            # Subscribers who heard `lane.paused` hear that it ended (once per pause).
            await self._record_resumed(reason)

    def _mark_paused(self, reason: str) -> bool:
        """The state paused for `reason`; whether it was not paused before."""
        newly = not self._state.paused
        self._state.paused, self._state.pause_reason = True, reason
        return newly

    def _mark_resumed(self) -> str | None:
        """The state resumed; the reason it had been paused for (None: it was not paused)."""
        reason = self._state.pause_reason if self._state.paused else None
        self._state.paused, self._state.pause_reason, self._state.work_hint = False, "", True
        return reason

    async def _record_resumed(self, reason: str) -> None:
        await workflow.execute_activity_method(
            EventActivities.record_lane_resumed,
            LaneEvent(workflow.info().workflow_id.removeprefix("scheduler-"), reason),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )

    @workflow.query
    def status(self) -> SchedulerStatus:
        inp = self._input
        slots = inp.max_concurrent_batches if inp else 0
        return SchedulerStatus(
            lane=inp.lane if inp else "",
            paused=self._state.paused,
            pause_reason=self._state.pause_reason,
            in_flight=len(self._state.in_flight),
            in_flight_addresses=sum(self._state.in_flight.values()),
            free_slots=max(self._free_slots(), 0) if inp else 0,
            dispatched_batches=self._state.dispatched_batches,
            queued=self._state.queued,
            express_in_flight=len(self._state.express_in_flight),
            storing=len(self._state.storing),
            free_express_slots=max(self._free_express(), 0) if inp else 0,
            standby=len(self._state.standby),
        )

    # ---- main loop ----------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: SchedulerInput) -> None:
        self._cap_storing = workflow.patched("cap-batches-storing")
        self._express_hints = workflow.patched("express-hint")
        self._standby_on = inp.standby_batches > 0 and workflow.patched("standby-batches")
        self._refresh_on = self._standby_on and workflow.patched("standby-refresh")
        # Before this patch a batch that finished before its pack's result was handled kept its
        # slot for good; histories recorded before it replay that.
        self._early_on = workflow.patched("batch-finished-before-its-pack")
        self._input = inp
        if inp.state is not None:
            self._state = inp.state
            # Before this patch a message delivered with a continued run's first task was lost
            # (a `batch_finished` then held its slot for good); histories recorded before it replay that.
            if self._before_run and workflow.patched("messages-before-run"):
                await self._handle_again(self._before_run)
        else:
            # A fresh start (first ever, or after a termination): adopt batches left mid-way.
            adopted = await workflow.execute_activity_method(
                PackingActivities.unfinished_batches,
                inp.lane,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=DB_RETRY,
            )
            self._take_slots(adopted)
            await self._start_children(adopted)
        self._describe()
        # Before this patch a pause for credits that arrived while the loop waited without a
        # timeout never started the credit-check timer (the lane stayed paused until an operator
        # resumed it); histories recorded before it replay the old wait.
        wake_on_credit_pause = workflow.patched("credit-pause-wakes-the-loop")

        while not self._should_continue():
            credit_wait = self._credit_paused()
            try:
                await workflow.wait_condition(
                    lambda: self._can_pack()
                    or self._can_refresh()
                    or self._can_pack_ahead()
                    or self._hold_stale()
                    or self._should_continue()
                    or bool(self._started)
                    or (wake_on_credit_pause and self._credit_paused() != credit_wait),
                    timeout=timedelta(seconds=inp.credit_check_s) if credit_wait else None,
                )
            except asyncio.TimeoutError:
                await self._check_credits()
                continue
            self._reap()
            if self._hold_stale():
                await self._write_hold()
            if self._can_pack():
                await self._pack()
            elif self._can_refresh():
                await self._refresh_standby()
            elif self._can_pack_ahead():
                await self._pack_ahead()
            self._describe()

        await workflow.wait_condition(lambda: not self._starting)
        self._reap()
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(dataclasses.replace(inp, state=self._state))

    async def _handle_again(self, messages: list[tuple[str, object]]) -> None:
        """Apply the messages handled before `run` began to the state it carried in. Their events
        (`lane.paused`) were recorded then; a resume of a carried pause records `lane.resumed` here."""
        self._early.clear()  # each batch met an empty state: heard again below
        carried_pause = self._state.pause_reason if self._state.paused else None
        for kind, arg in messages:
            if kind == "batch_finished":
                self.batch_finished(arg)
            elif kind == "work_available":
                self.work_available()
            elif kind == "pause":
                self._mark_paused(arg.reason)
            else:  # resume
                self._mark_resumed()
        if carried_pause is not None and not self._state.paused:
            await self._record_resumed(carried_pause)

    def _credit_paused(self) -> bool:
        return self._state.paused and self._state.pause_reason == CREDITS_PAUSE

    def _free_slots(self) -> int:
        """API slots free, and (since release 2) room among the batches being stored: when stores
        fall behind the API, at most one more slot's worth of batches waits to be stored."""
        assert self._input is not None
        slots = self._input.max_concurrent_batches
        free = slots - len(self._state.in_flight)
        if self._cap_storing:
            free = min(free, 2 * slots - len(self._state.in_flight) - len(self._state.storing))
        return free

    def _free_express(self) -> int:
        assert self._input is not None
        if self._input.express_max_addresses <= 0:
            return 0
        return self._input.express_slots - len(self._state.express_in_flight)

    def _can_pack(self) -> bool:
        if self._express_hints:
            # Since release 2 free express slots alone do not start a pack on every signal: only
            # while a small list may be waiting (new work arrived, or the last pack filled them).
            return not self._state.paused and (
                (self._state.work_hint and self._free_slots() > 0)
                or (self._state.express_hint and self._free_express() > 0)
            )
        return (
            not self._state.paused
            and self._state.work_hint
            and (self._free_slots() > 0 or self._free_express() > 0)
        )

    def _should_continue(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or info.get_current_history_length() > 4000

    def _batch_template(self) -> BouncerBatchInput:
        """The input of the Bouncer batch workflows a pack starts (the pack fills in each id)."""
        assert self._input is not None
        inp = self._input
        return BouncerBatchInput(
            bouncer_batch_id=0,
            lane=inp.lane,
            poll_interval_s=inp.poll_interval_s,
            deadline_s=inp.deadline_s,
            api_create_task_queue=inp.api_create_task_queue,
            api_task_queue=inp.api_task_queue,
        )

    async def _pack(self) -> None:
        assert self._input is not None
        inp = self._input
        # Since release 2 the pack activity lingers (to the millisecond, and only when less than
        # a full batch is queued), and the hint is cleared before packing so that a signal
        # arriving during the pack is not lost. Histories of release 1 replay the old path.
        linger_in_activity = workflow.patched("linger-in-pack-activity")
        linger_s = 0.0
        if linger_in_activity:
            self._state.work_hint = False
            if self._state.new_work:
                linger_s = inp.pack_linger_s
        elif self._state.new_work and inp.pack_linger_s > 0:
            # Lists submitted together share Bouncer batches (the seed's John + Alice + Bob).
            await workflow.sleep(timedelta(seconds=inp.pack_linger_s))
        self._state.new_work = False
        self._state.packs += 1
        express_asked = max(self._free_express(), 0)
        if express_asked:
            self._state.express_hint = False  # a small list arriving during the pack sets it again
        pack_starts = workflow.patched("pack-starts-batches")
        result = await workflow.execute_activity_method(
            PackingActivities.pack_batches,
            PackRequest(
                lane=inp.lane,
                pack_key=f"{workflow.info().run_id}:{self._state.packs}",
                slots=self._free_slots(),
                batch_size=min(inp.batch_size, self._state.credit_cap or inp.batch_size),
                fair_share=inp.fair_share,
                express_slots=express_asked,
                express_max_addresses=inp.express_max_addresses,
                linger_s=linger_s,
                start=self._batch_template() if pack_starts else None,
                start_task_queue=workflow.info().task_queue if pack_starts else "",
            ),
            start_to_close_timeout=timedelta(seconds=120),
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        self._state.queued = result.queued_after
        self._state.credit_cap = 0  # one pack: a batch the credits do not cover is refused (402) and re-queued
        if express_asked and sum(b.express for b in result.batches) == express_asked:
            self._state.express_hint = True  # every express slot filled: more small lists may wait
        if not linger_in_activity and result.queue_drained:
            self._state.work_hint = False
        self._take_slots(result.batches)
        if pack_starts:
            # Since release 3 the pack activity started them: its retries and a fresh scheduler's
            # adoption (`unfinished_batches`) start any it could not.
            self._state.dispatched_batches += len(result.batches)
        elif workflow.patched("start-children-in-background"):
            # The loop does not wait for the children to start (a workflow task round trip or
            # two): a slot freed meanwhile is packed at once (the slots are taken above).
            task = asyncio.ensure_future(self._start_children(result.batches))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
            task.add_done_callback(self._started.append)
        else:
            await self._start_children(result.batches)

    # ---- standby batches (release 6) ---------------------------------------------------------
    # While every slot is busy, up to `standby_batches` batches are packed ahead, their workflows
    # started and their request bodies built; each follows one in-flight batch and is created the
    # moment that one leaves the API (the callback receiver's or the poll's NOTIFY wakes its submit
    # activity). So a freed slot is refilled without this workflow on the path. A standby batch
    # takes its slot when the batch it follows ends (or, if that one ended while the pack ran, at
    # once): it is never at the API before its predecessor left, so the lane stays within its slots.

    def _followable(self) -> list[int]:
        """In-flight regular batches no standby batch follows yet, oldest (soonest done) first."""
        followed = {after for after, _size in self._state.standby.values()}
        return sorted(int(k) for k in self._state.in_flight if int(k) not in followed)

    def _can_pack_ahead(self) -> bool:
        if not self._standby_on or self._state.paused or self._state.ahead_drained:
            return False
        assert self._input is not None
        slots = self._input.max_concurrent_batches
        waiting = len(self._state.standby)
        return (
            self._free_slots() <= 0  # a free slot is packed for directly
            and waiting < self._input.standby_batches
            # with the stores behind, at most a slot's worth waits to be stored (as `_free_slots`)
            and (not self._cap_storing
                 or 2 * slots - len(self._state.in_flight) - len(self._state.storing) - waiting > 0)
            and bool(self._followable())
        )

    def _can_refresh(self) -> bool:
        return self._refresh_on and self._state.standby_stale and bool(self._state.standby)

    async def _refresh_standby(self) -> None:
        """New work arrived while batches stood by (release 7): those it is owed (by priority or
        fair share) are emptied and forgotten, and the loop packs ahead again with it in the queue.
        Without this a list submitted behind a big import waits for every standby batch."""
        assert self._input is not None
        self._state.standby_stale = False
        emptied = await workflow.execute_activity_method(
            PackingActivities.refresh_standby,
            StandbyRefresh(self._input.lane, sorted(int(k) for k in self._state.standby), self._input.fair_share),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=DB_RETRY,
        )
        for bb in emptied:  # never sent: their workflows end, and their `batch_finished` finds nothing
            self._state.standby.pop(str(bb), None)
            self._state.in_flight.pop(str(bb), None)  # promoted while the activity ran
        if emptied:
            self._state.ahead_drained = False

    async def _pack_ahead(self) -> None:
        assert self._input is not None
        inp = self._input
        self._state.standby_stale = False  # this pack sees every list queued so far
        follow = self._followable()[: inp.standby_batches - len(self._state.standby)]
        self._state.packs += 1
        result = await workflow.execute_activity_method(
            PackingActivities.pack_batches,
            PackRequest(
                lane=inp.lane,
                pack_key=f"{workflow.info().run_id}:{self._state.packs}",
                slots=len(follow),
                batch_size=inp.batch_size,
                fair_share=inp.fair_share,
                start=self._batch_template(),
                start_task_queue=workflow.info().task_queue,
                follow=follow,
            ),
            start_to_close_timeout=timedelta(seconds=120),
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=DB_RETRY,
        )
        self._state.queued = result.queued_after
        if len(result.batches) < len(follow):
            self._state.ahead_drained = True  # until new work arrives
        for b in result.batches:
            if self._finished_early(b):
                continue
            self._state.standby[str(b.bouncer_batch_id)] = [b.after, b.size]
            self._promote_followers(b.after, ended_only=True)
        self._early.clear()
        self._state.dispatched_batches += len(result.batches)

    def _promote_followers(self, bouncer_batch_id: int, ended_only: bool = False) -> None:
        """The standby batch following this one takes its slot (with `ended_only`: if it has left)."""
        if ended_only and str(bouncer_batch_id) in self._state.in_flight:
            return
        for key, (after, size) in list(self._state.standby.items()):
            if after == bouncer_batch_id:
                del self._state.standby[key]
                self._state.in_flight[key] = size

    def _hold_stale(self) -> bool:
        """The lane's hold row (which standby batches obey) is not known to match `paused`."""
        return self._standby_on and self._state.held != self._state.paused

    async def _write_hold(self) -> None:
        assert self._input is not None
        held = self._state.paused
        await workflow.execute_activity_method(
            PackingActivities.hold_lane,
            LaneHold(self._input.lane, held, self._state.pause_reason),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )
        self._state.held = held

    def _take_slots(self, batches: list) -> None:
        for b in batches:
            if not self._finished_early(b):
                (self._state.express_in_flight if b.express else self._state.in_flight)[str(b.bouncer_batch_id)] = b.size
        self._early.clear()

    def _finished_early(self, b) -> bool:
        """A batch whose `batch_finished` came before its pack's result takes no API slot: if it has
        only left the API it is being stored (as the signal would have done)."""
        outcome = self._early.get(str(b.bouncer_batch_id)) if self._early_on else None
        if outcome is None:
            return False
        if outcome == DONE_AT_API and not b.express:
            self._state.storing[str(b.bouncer_batch_id)] = b.size
        return True

    def _reap(self) -> None:
        """Raise what a background child start raised (it fails the workflow task, as before)."""
        while self._started:
            self._started.pop().result()

    async def _start_children(self, batches: list) -> None:
        assert self._input is not None
        inp = self._input

        express_first = workflow.patched("express-priority")  # EXPRESS_PRIORITY, since release 3

        async def start(bouncer_batch_id: int, size: int, express: bool) -> None:
            try:
                await workflow.start_child_workflow(
                    BouncerBatchWorkflow.run,
                    dataclasses.replace(self._batch_template(), bouncer_batch_id=bouncer_batch_id),
                    id=bouncer_batch_workflow_id(inp.lane, bouncer_batch_id),
                    parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                    static_summary=bouncer_batch_summary(inp.lane, bouncer_batch_id, size),
                    priority=EXPRESS_PRIORITY if express and express_first else Priority.default,
                )
            except WorkflowAlreadyStartedError:
                pass  # adopted: it is already running and will signal batch_finished
            self._state.dispatched_batches += 1

        await asyncio.gather(*(start(b.bouncer_batch_id, b.size, b.express) for b in batches))

    async def _check_credits(self) -> None:
        assert self._input is not None
        try:
            credits = await workflow.execute_activity_method(
                BouncerApiActivities.read_credits,
                task_queue=self._input.api_task_queue,
                start_to_close_timeout=timedelta(seconds=60),
                retry_policy=RetryPolicy(maximum_attempts=3),
            )
        except ActivityError as err:
            workflow.logger.warning("credit check failed, trying again later: %s", err.cause)
            return
        if credits >= self._input.batch_size:
            await self.resume()
        elif credits > 0 and workflow.patched("credits-below-a-batch"):
            self._state.credit_cap = credits
            await self.resume()

    def _describe(self) -> None:
        """The Web UI's current details, and Lane / BatchState (paused, dispatching, idle)."""
        if self._input is None:  # a signal delivered with the start, before `run` began
            return
        s = self.status()
        flight = (f"{s.in_flight} Bouncer batches in flight ({s.in_flight_addresses:,} addresses), "
                  f"{s.storing} being stored")
        if s.paused:  # nothing is packed while paused, so the last pack's queue count would be stale
            details = f"lane {s.lane} paused: {s.pause_reason}; {flight}, {s.dispatched_batches} dispatched"
        else:
            details = (f"lane {s.lane}: {flight}, {s.free_slots} slots free, {s.express_in_flight} express, "
                       f"{s.queued:,} addresses queued after the last pack, {s.dispatched_batches} dispatched")
        workflow.set_current_details(details)
        state = "paused" if s.paused else ("dispatching" if s.in_flight or s.queued else "idle")
        search.show({search.LANE: s.lane, search.BATCH_STATE: state})

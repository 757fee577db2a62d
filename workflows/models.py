"""Inputs, outputs and state of workflows and activities: ids and counts only, never an address.

One dataclass per message so fields can be added later in a backward-compatible way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from temporalio.common import Priority

PRIORITIES = ("critical", "high", "normal", "low")
FINISHED_STATES = ("completed", "cancelled", "failed")  # a user batch's end states


def scheduler_id(lane: str) -> str:
    return f"scheduler-{lane}"


def scheduler_summary(lane: str) -> str:
    """The scheduler's static summary in the Web UI."""
    return f"Greedy scheduler of lane {lane}: packs queued addresses into Bouncer batches"


def user_batch_workflow_id(user_batch_id: int) -> str:
    return f"user-batch-{user_batch_id}"


def bouncer_batch_workflow_id(lane: str, bouncer_batch_id: int) -> str:
    return f"bouncer-batch-{lane}-{bouncer_batch_id}"


def bouncer_batch_summary(lane: str, bouncer_batch_id: int, size: int) -> str:
    """A Bouncer batch workflow's static summary in the Web UI."""
    return f"Bouncer batch {bouncer_batch_id}: {size:,} addresses, lane {lane}"


# Since release 3 an express Bouncer batch (one small list) and its activities go first in every
# task queue that has a backlog (Temporal task priority; the default key is 3): its creation is
# not queued behind a big list's paced creations on the create queue.
EXPRESS_PRIORITY = Priority(priority_key=1)


# ---- user batch -------------------------------------------------------------------------


@dataclass
class SourceSpec:
    """A list the worker reads itself (SDK clients): a file path or an http(s) URL, not its rows."""

    uri: str
    user_id: str
    name: str = ""
    priority: str = "normal"
    lanes: list[str] = field(default_factory=lambda: ["deliverability"])
    column: str | None = None
    max_result_age_s: float | None = None  # reuse only results younger than this (None: RESULT_TTL_DAYS)


@dataclass
class UserBatchInput:
    user_batch_id: int = 0  # rows already stored (starter.py); 0: register and ingest `source`
    progress_recheck_s: float = 60.0  # slow timer: re-read the database in case a signal was missed
    source: SourceSpec | None = None
    ingest_heartbeat_s: float = 60.0
    # A run continues as new past this many history events (or when the server suggests it): a
    # list paused or queued for days re-reads its counts every `progress_recheck_s`.
    max_history_events: int = 5_000


@dataclass
class RegisterRequest:
    workflow_id: str
    source: SourceSpec


@dataclass
class IngestRequest:
    user_batch_id: int
    uri: str
    column: str | None = None


@dataclass
class IngestOutcome:
    rows: int
    invalid: int
    resumed_after_line: int = 0  # > 0 when a previous attempt had committed rows up to this line


@dataclass
class LaneProgress:
    lane: str
    unique_addresses: int = 0
    cached: int = 0
    shared: int = 0
    enqueued: int = 0
    remaining: int = 0
    failed: int = 0


@dataclass
class Progress:
    user_batch_id: int
    state: str
    rows: int = 0
    invalid: int = 0
    duplicates: int = 0
    lanes: list[LaneProgress] = field(default_factory=list)
    # For search attributes and the Web UI's details (ids and counts only).
    user_id: str = ""
    priority: str = ""
    in_flight_batches: int = 0  # Bouncer batches at the API holding some of this batch's addresses
    summary: Summary | None = None  # set by `advance_user_batch` when it finalized the batch

    @property
    def remaining(self) -> int:
        return sum(lane.remaining for lane in self.lanes)

    @property
    def unique_addresses(self) -> int:
        return sum(lane.unique_addresses for lane in self.lanes)

    @property
    def failed(self) -> int:
        return sum(lane.failed for lane in self.lanes)


@dataclass
class Summary:
    """What a finished user batch returns: item counts by terminal state and verdict."""

    user_batch_id: int
    state: str
    rows: int
    by_state: dict[str, int] = field(default_factory=dict)
    by_status: dict[str, int] = field(default_factory=dict)
    by_catchall_status: dict[str, int] = field(default_factory=dict)  # the catchall lane's verdicts


@dataclass
class PauseRequest:
    user_batch_id: int
    paused: bool


# ---- scheduler ---------------------------------------------------------------------------


@dataclass
class SchedulerInput:
    lane: str
    batch_size: int = 10_000
    max_concurrent_batches: int = 15
    poll_interval_s: float = 15.0
    deadline_s: float = 6 * 3600.0
    api_create_task_queue: str = "verify-api-create"
    api_task_queue: str = "verify-api"
    credit_check_s: float = 300.0
    pack_linger_s: float = 0.5  # after new work arrives, gather concurrent submissions this long
    fair_share: bool = True  # False: plain FIFO within a priority (for comparison)
    express_slots: int = 0  # extra slots for small lists only (see PackRequest)
    express_max_addresses: int = 0
    # While every slot is busy, keep up to this many batches packed ahead, each waiting in its
    # submit activity for one in-flight batch to leave the API (0: none, as before release 6).
    standby_batches: int = 0
    # Carried across continue-as-new (a fresh start leaves it None and adopts unfinished batches).
    state: SchedulerState | None = None


@dataclass
class SchedulerState:
    in_flight: dict[str, int] = field(default_factory=dict)  # bouncer batch id (str) -> size
    express_in_flight: dict[str, int] = field(default_factory=dict)  # the same, in express slots
    paused: bool = False
    pause_reason: str = ""
    packs: int = 0
    dispatched_batches: int = 0
    work_hint: bool = True
    new_work: bool = False
    queued: int = 0  # as of the last pack
    storing: dict[str, int] = field(default_factory=dict)  # done at the API, results not yet stored
    express_hint: bool = True  # a small list may be queued (cleared by a pack that found none)
    # Packed ahead, not yet at the API: bouncer batch id (str) -> [the in-flight batch it follows, size].
    standby: dict[str, list[int]] = field(default_factory=dict)
    ahead_drained: bool = False  # the last pack ahead found the queue empty (until new work arrives)
    held: bool | None = None  # the lane's hold row (lane_holds) as last written; None: not known
    # New work arrived since the standby batches were packed: it may be owed their places (release 7).
    standby_stale: bool = False
    # Credits read while paused for credits, fewer than a batch (release 10): the next pack's batches
    # are no larger, so a top-up below BATCH_SIZE is spent rather than waited on for good.
    credit_cap: int = 0


@dataclass
class SchedulerStatus:
    lane: str
    paused: bool
    pause_reason: str
    in_flight: int
    in_flight_addresses: int
    free_slots: int
    dispatched_batches: int
    queued: int  # addresses waiting in the lane's queues, as of the last pack
    express_in_flight: int = 0
    storing: int = 0  # Bouncer batches done at the API whose results are being stored
    free_express_slots: int = 0
    standby: int = 0  # Bouncer batches packed ahead, waiting for an in-flight one to leave the API


@dataclass
class LaneHold:
    """The lane's row in `lane_holds`: standby batches are not sent while it is held."""
    lane: str
    held: bool
    reason: str = ""


@dataclass
class PackRequest:
    lane: str
    pack_key: str
    slots: int
    batch_size: int
    fair_share: bool = True
    # Express slots carry small lists alone (no padding from a big import), so a 100-address
    # list is not processed at the pace of a 10,000-address Bouncer batch.
    express_slots: int = 0
    express_max_addresses: int = 0
    # Wait this long first if less than one full batch is queued (lists submitted together share).
    linger_s: float = 0.0
    # Since release 3 the pack activity starts each batch's workflow itself (`start`, with the
    # batch's id filled in, on `start_task_queue`), as soon as its transaction commits: not one
    # scheduler workflow task later, and eagerly on the packing worker. None: the scheduler does.
    start: BouncerBatchInput | None = None
    start_task_queue: str = ""
    # Pack ahead (release 6): at most one regular batch per id listed, each to follow that
    # in-flight batch (sent once it has left the API); no express batches.
    follow: list[int] = field(default_factory=list)


@dataclass
class StandbyRefresh:
    """New work arrived while standby batches wait: empty those that now jump the queue."""
    lane: str
    standby: list[int]  # the scheduler's standby batches (not yet promoted to a slot)
    fair_share: bool = True


@dataclass
class PackedBatch:
    bouncer_batch_id: int
    size: int
    express: bool = False
    after: int = 0  # a standby batch: the in-flight batch whose slot it takes


@dataclass
class PackResult:
    batches: list[PackedBatch]
    queue_drained: bool
    queued_after: int = 0  # addresses still queued in the lane (from cursors: an upper bound)


@dataclass
class LanePause:
    reason: str = "paused by operator"


# ---- bouncer batch -----------------------------------------------------------------------


@dataclass
class BouncerBatchInput:
    bouncer_batch_id: int
    lane: str
    poll_interval_s: float = 15.0
    deadline_s: float = 6 * 3600.0
    api_create_task_queue: str = "verify-api-create"
    api_task_queue: str = "verify-api"
    after: int = 0  # a standby batch: created once this Bouncer batch has left the API


@dataclass
class SubmitOutcome:
    sent: int
    submitted: bool  # False when nothing was left to send (all had fresh results meanwhile)
    callback: bool = False  # the API was given our callback URL: polling is only the fallback
    # The lane's latest completion came by callback (callbacks work): the fallback polls are sparse.
    callbacks_heard: bool = False


@dataclass
class StoreRequest:
    bouncer_batch_id: int
    lane: str
    download: bool  # False: nothing to fetch (abandoned or empty); only re-queue or resolve
    failure_reason: str = ""  # non-empty: dead-letter the batch's addresses with this reason
    count_attempt: bool = True  # False when the addresses were never sent (e.g. out of credits)
    notify: bool = False  # the activity signals `progressed` to the user batches it touched
    # The API finished the batch early at our request: its `unknown`/`unknown` records are the
    # addresses it never verified (re-queued, not stored).
    finished_early: bool = False


@dataclass
class StoreOutcome:
    stored: int
    requeued: int
    dead_lettered: int
    touched_workflow_ids: list[str] = field(default_factory=list)
    handed_off: int = 0  # addresses queued on `handoff_lane` (accept-all ones, for the catchall lane)
    handoff_lane: str = ""


@dataclass
class BatchFinished:
    bouncer_batch_id: int
    outcome: str  # DONE_AT_API, then stored, failed, out_of_credits, finished_early, abandoned


DONE_AT_API = "done_at_api"  # BatchFinished.outcome when only the API's part is over


# ---- events to subscribers ----------------------------------------------------------------


@dataclass
class DispatcherInput:
    fetch_wait_s: float = 5.0  # a fetch with nothing to send waits this long for a NOTIFY
    max_attempts: int = 8
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    timeout_s: float = 10.0  # one POST
    cursor: int = 0  # deliveries up to this ready_seq were handed out (carried across continue-as-new)
    max_history_events: int = 4000  # continue-as-new past this many events (or when the server suggests)


@dataclass
class FetchRequest:
    cursor: int
    wait_s: float


@dataclass
class DeliveryRef:
    delivery_id: int
    key: str  # `<subscription>:<user batch>`: deliveries with one key go out one at a time, in order
    ready_seq: int


@dataclass
class DeliveryBatch:
    deliveries: list[DeliveryRef]
    cursor: int


@dataclass
class DeliveryFailure:
    delivery_id: int
    reason: str


@dataclass
class LaneEvent:
    lane: str
    reason: str


@dataclass
class UserBatchFailure:
    user_batch_id: int
    reason: str


# ---- recurring lists and cleanup ---------------------------------------------------------


def recurring_schedule_id(user_batch_id: int) -> str:
    return f"recurring-list-{user_batch_id}"


CLEANUP_SCHEDULE_ID = "cleanup-daily"


@dataclass
class RecurringRun:
    """One scheduled re-verification of a stored list (the schedule's action input)."""

    schedule_id: str
    progress_recheck_s: float = 60.0


@dataclass
class CopyRequest:
    schedule_id: str
    run_key: str  # the scheduled workflow's id: a retried copy finds the batch it already made


@dataclass
class CopyOutcome:
    user_batch_id: int  # 0: skipped, the list's latest run (`source_user_batch_id`) is still verifying
    source_user_batch_id: int
    rows: int


@dataclass
class CleanupInput:
    older_than_days: float
    result_ttl_days: float
    chunk_rows: int = 10_000


@dataclass
class CleanupChunk:
    """Delete at most `chunk_rows` rows of one kind older than `cutoff` (ISO timestamp)."""

    kind: str  # items (then their user batches), results, events, bouncer_batches, pack_runs
    cutoff: str
    chunk_rows: int


@dataclass
class ChunkOutcome:
    deleted: int
    user_batches: int = 0  # user batches removed with their last items
    more: bool = False  # there may be more to delete of this kind


@dataclass
class CleanupSummary:
    cutoff: str
    results_cutoff: str
    deleted: dict[str, int] = field(default_factory=dict)  # rows by kind
    user_batches: int = 0
    chunks: int = 0


@dataclass
class ResultsCutoffRequest:
    cutoff: str
    result_ttl_days: float

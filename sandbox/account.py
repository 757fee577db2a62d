"""One simulated Bouncer account: credits, batches, the processing queue and counters.

No HTTP here. Time is a float of wall-clock seconds from `Clock` (monotonic underneath).
Progress is computed from elapsed time, not from ticks: `advance(now)` replays every
completion that fell due since the last call, in order, and starts the next queued batch
at the exact moment a slot freed. So results do not depend on how often it is called.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import operator
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sandbox.verdicts import STATUSES, Decision, add_verdict, decide, decide_unverified


class Clock:
    """Wall-clock seconds that never jump: anchored once, advanced by `time.monotonic`."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)


def iso(ts: float | None) -> str | None:
    """ISO 8601 UTC with milliseconds and a `Z`, as Bouncer prints it."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


# An entry as stored: a bare email, an (email, name) pair, or the entry dict as received
# for any other shape. A dict costs ~130 bytes more per address than a pair, which adds
# up over millions of addresses.
StoredEntry = str | tuple[str, Any] | dict[str, Any]


def compact(entry: dict[str, Any]) -> StoredEntry:
    if len(entry) == 1:
        return entry["email"]
    if len(entry) == 2 and "name" in entry and not isinstance(entry["name"], dict):
        return (entry["email"], entry["name"])
    return entry


def email_of(stored: StoredEntry) -> str:
    if isinstance(stored, tuple):  # the usual shape first
        return stored[0]
    if isinstance(stored, str):
        return stored
    return stored["email"]


def properties_of(stored: StoredEntry) -> dict[str, Any]:
    if isinstance(stored, str):
        return {"email": stored}
    if isinstance(stored, tuple):
        return {"email": stored[0], "name": stored[1]}
    return stored


@dataclass
class Batch:
    batch_id: str
    entries: list[StoredEntry]  # unique entries, first occurrence kept
    quantity: int  # entries received, duplicates included
    duplicates: int
    created: float
    callback_url: str | None
    credits: int  # charged at creation
    status: str = "queued"  # queued | processing | completed | deleted
    started: float | None = None
    completed: float | None = None
    due: float | None = None  # when a processing batch will be done
    verified: int | None = None  # set when completed: entries that got a real verdict
    stats: Counter[str] = field(default_factory=Counter)
    tallied: int = 0  # entries counted into `stats` so far
    # Digests of the entries' exact addresses, in entry order: the objects `Account.seen` holds.
    digests: tuple[bytes, ...] = ()

    @property
    def unique(self) -> int:
        return len(self.entries)


# Decisions kept between a batch's status poll and its download, at most this many in all
# (~45 MB): enough for every batch a client has polled and not yet downloaded.
DECISIONS_KEPT = 200_000


def _digest(exact: str) -> bytes:
    # 8-byte digests, not strings: millions of addresses stay affordable.
    return hashlib.blake2b(exact.encode(), digest_size=8).digest()


class Account:
    """State and rules of the simulated account. Call `advance(now)` before reading it."""

    decide = staticmethod(decide)  # what a verified address gets (the catch-all endpoint's differs)

    def __init__(
        self,
        *,
        credits: int,
        speed: float,
        time_scale: float,
        max_processing: int | None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        # Addresses per real second per processing batch; inf means instant.
        self.rate = speed * time_scale if speed > 0 else math.inf
        self.max_processing = max_processing if max_processing is not None else math.inf
        self.initial_credits = credits
        self.reset()

    def reset(self) -> None:
        self.credits = self.initial_credits
        self.batches: dict[str, Batch] = {}
        self.queue: deque[str] = deque()
        self.processing: list[tuple[float, int, str]] = []  # heap of (due, seq, id)
        self._seq = 0
        self._active = 0  # batches in `processing` now
        self.completed_since: list[Batch] = []  # drained by the app to send callbacks
        self.credits_charged = 0
        self.addresses_received = 0
        self.seen: set[bytes] = set()
        self.seen_twice: set[bytes] = set()
        # Addresses whose record was downloaded, and those sent again after that: the client
        # had a result and paid a second time (the chaos audit's `addresses_sent_twice`).
        self.delivered: set[bytes] = set()
        self.sent_after_result: set[bytes] = set()
        self.max_processing_seen = 0
        self._forget_decisions()

    def _forget_decisions(self) -> None:
        self._decisions: dict[str, list[Decision]] = {}  # by batch id, oldest first
        self._decisions_kept = 0

    def __getstate__(self) -> dict[str, Any]:
        # The decisions are a cache: a saved state leaves them out.
        state = self.__dict__.copy()
        del state["_decisions"], state["_decisions_kept"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._forget_decisions()

    # ---- creation -----------------------------------------------------------------------

    def create(self, entries: list[dict[str, Any]], callback_url: str | None, now: float) -> Batch | int:
        """Accept a batch, or return the credits left when they do not cover it."""
        unique: list[StoredEntry] = []
        unique_digests: list[bytes] = []
        keys: set[str] = set()
        # "Sent twice" is judged on the exact address (the client's pay-once promise), while the
        # charge (duplicates within the batch) also folds case, like a mailbox provider would.
        digests: dict[str, bytes] = {}
        for entry in entries:
            exact = entry["email"].strip()
            digest = digests.get(exact)
            if digest is None:
                digest = digests[exact] = _digest(exact)
            key = exact.lower()
            if key not in keys:  # the first entry of an address is the one kept
                keys.add(key)
                unique.append(compact(entry))
                unique_digests.append(digest)
        if len(unique) > self.credits:
            return self.credits
        self.credits -= len(unique)
        self.credits_charged += len(unique)
        self.addresses_received += len(entries)
        for digest in digests.values():
            if digest in self.seen:
                self.seen_twice.add(digest)
                if digest in self.delivered:
                    self.sent_after_result.add(digest)
            else:
                self.seen.add(digest)
        batch = Batch(
            batch_id=secrets.token_hex(12),
            entries=unique,
            quantity=len(entries),
            duplicates=len(entries) - len(unique),
            created=now,
            callback_url=callback_url,
            credits=len(unique),
            digests=tuple(unique_digests),
        )
        self.batches[batch.batch_id] = batch
        self.queue.append(batch.batch_id)
        self._fill_slots(now)
        return batch

    # ---- time ---------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the earliest processing batch completes (a stale heap entry may come first:
        waking for it is harmless), or None."""
        return self.processing[0][0] if self.processing else None

    def advance(self, now: float) -> None:
        """Complete every batch due by `now`, starting queued ones as slots free."""
        while self.processing and self.processing[0][0] <= now:
            due, _, batch_id = heapq.heappop(self.processing)
            batch = self.batches[batch_id]
            if batch.status != "processing" or batch.due != due:
                continue  # finished early or deleted; its heap entry is stale
            self._complete(batch, due, verified=batch.unique)
            self._fill_slots(due)
        self._fill_slots(now)

    def _fill_slots(self, at: float) -> None:
        while self.queue and self._active < self.max_processing:
            batch = self.batches[self.queue.popleft()]
            batch.status = "processing"
            batch.started = max(at, batch.created)
            batch.due = batch.started + batch.unique / self.rate
            self._active += 1
            self.max_processing_seen = max(self.max_processing_seen, self._active)
            if batch.due <= at:
                # Instant: complete now, which frees the slot for the next one.
                self._complete(batch, batch.due, verified=batch.unique)
            else:
                self._seq += 1
                heapq.heappush(self.processing, (batch.due, self._seq, batch.batch_id))

    def _complete(self, batch: Batch, at: float, *, verified: int) -> None:
        if batch.status == "processing":
            self._active -= 1
        batch.status = "completed"
        batch.completed = at
        batch.verified = verified
        batch.due = None
        if batch.callback_url:
            self.completed_since.append(batch)

    def processed(self, batch: Batch, now: float) -> int:
        if batch.status == "completed":
            return batch.unique
        if batch.status != "processing" or batch.started is None:
            return 0
        return min(batch.unique, int((now - batch.started) * self.rate))

    # ---- reads and commands -------------------------------------------------------------

    def get(self, batch_id: str) -> Batch | None:
        batch = self.batches.get(batch_id)
        return None if batch is None or batch.status == "deleted" else batch

    def stats_of(self, batch: Batch, now: float) -> dict[str, int]:
        """Counts by status of the addresses processed so far (tallied incrementally)."""
        real = batch.verified if batch.status == "completed" else self.processed(batch, now)
        assert real is not None
        if real > batch.tallied:
            batch.stats.update(map(operator.itemgetter(1), self._decided(batch, batch.tallied, real)))
            batch.tallied = real
        out = {status: batch.stats.get(status, 0) for status in STATUSES}
        if batch.status == "completed":
            out["unknown"] += batch.unique - real
        return out

    def records(self, batch: Batch) -> list[dict[str, Any]]:
        """One record per unique entry, the entry's own properties carried through."""
        entries = batch.entries
        verified = batch.verified or 0
        decisions = self._decided(batch, 0, verified)
        decisions += [decide_unverified(email_of(entry)) for entry in entries[verified:]]
        out = []
        for entry, decision in zip(entries, decisions):
            if type(entry) is tuple:  # the usual shape: no properties dict to merge
                email, name = entry
                out.append(add_verdict({"email": email, "name": name}, decision))
            else:
                out.append(add_verdict({"email": email_of(entry), **properties_of(entry)}, decision))
        return out

    def _decided(self, batch: Batch, start: int, stop: int) -> list[Decision]:
        """The decisions of `batch.entries[start:stop]`, each address decided once while kept."""
        decided = self._decisions.pop(batch.batch_id, [])
        self._decisions_kept -= len(decided)
        decide = self.decide
        if len(decided) < start:  # forgotten since the last call: decide only what is asked
            return [decide(email_of(entry)) for entry in batch.entries[start:stop]]
        decided += [decide(email_of(entry)) for entry in batch.entries[len(decided) : stop]]
        self._decisions[batch.batch_id] = decided  # now the newest
        self._decisions_kept += len(decided)
        while self._decisions_kept > DECISIONS_KEPT:
            self._decisions_kept -= len(self._decisions.pop(next(iter(self._decisions))))
        return decided[start:stop]

    def _forget(self, batch: Batch) -> None:
        self._decisions_kept -= len(self._decisions.pop(batch.batch_id, ()))

    def mark_delivered(self, batch: Batch) -> None:
        """The batch's records were downloaded: the client now holds a result for each address."""
        # A state saved before batches kept their digests has none: hash again.
        self.delivered.update(batch.digests or (_digest(email_of(entry).strip()) for entry in batch.entries))
        self._forget(batch)

    def finish(self, batch: Batch, now: float) -> None:
        """Complete now; what was not processed yet comes back `unknown`."""
        if batch.status == "completed":
            return
        if batch.status == "queued":
            self.queue.remove(batch.batch_id)
        verified = self.processed(batch, now)
        self._complete(batch, now, verified=verified)
        self._fill_slots(now)

    def delete(self, batch: Batch, now: float) -> None:
        if batch.status == "queued":
            self.queue.remove(batch.batch_id)
        if batch.status == "processing":
            self._active -= 1
        batch.status = "deleted"
        batch.entries = []
        batch.digests = ()
        self._forget(batch)
        batch.due = None
        self._fill_slots(now)

    def counts(self) -> dict[str, int]:
        out = {"queued": 0, "processing": 0, "completed": 0, "deleted": 0}
        for batch in self.batches.values():
            out[batch.status] += 1
        return out

"""What the batch API answers, as typed values."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp ("2024-01-02T03:04:05.678Z") or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """A stats count: an integer (also written 12.0); None for null or anything else."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _int(value)


def _batch_id(data: dict[str, Any]) -> str:
    """The answer's `batchId`: a non-empty string or an integer (null would be the id 'None')."""
    value = data.get("batchId")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"batchId is {value!r}" if "batchId" in data else "no batchId")
    return str(value)


def _status(data: dict[str, Any]) -> str:
    value = data.get("status")
    if not isinstance(value, str) or not value:
        raise ValueError(f"status is {value!r}" if "status" in data else "no status")
    return value


@dataclass(frozen=True)
class CreatedBatch:
    """The answer to a batch creation."""

    batch_id: str
    status: str  # "queued"
    quantity: int  # addresses received, duplicates included
    duplicates: int
    created: datetime | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CreatedBatch:
        """Raises ValueError naming what is wrong when `batchId` is missing, null or empty."""
        return cls(
            batch_id=_batch_id(data),
            status=str(data.get("status", "queued")),
            quantity=_int(data.get("quantity")) or 0,
            duplicates=_int(data.get("duplicates")) or 0,
            created=parse_time(data.get("created")),
        )


@dataclass(frozen=True)
class BatchStatus:
    """A batch's state. `processed`/`stats` only when asked for stats; `credits` once completed."""

    batch_id: str
    status: str  # "queued" | "processing" | "completed"
    quantity: int
    duplicates: int
    created: datetime | None
    started: datetime | None
    completed: datetime | None
    processed: int | None
    stats: dict[str, int] | None  # deliverable, risky, undeliverable, unknown
    credits: int | None

    @property
    def is_completed(self) -> bool:
        return self.status == "completed"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchStatus:
        """Raises ValueError naming what is wrong when `batchId` or `status` is missing or not a
        non-empty string (an integer batchId too); a stats count that is null or not a number is
        left out."""
        stats = data.get("stats")
        return cls(
            batch_id=_batch_id(data),
            status=_status(data),
            quantity=_int(data.get("quantity")) or 0,
            duplicates=_int(data.get("duplicates")) or 0,
            created=parse_time(data.get("created")),
            started=parse_time(data.get("started")),
            completed=parse_time(data.get("completed")),
            processed=_int(data.get("processed")),
            stats={str(k): n for k, v in stats.items() if (n := _count(v)) is not None}
            if isinstance(stats, dict) else None,
            credits=_int(data.get("credits")),
        )

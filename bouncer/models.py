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
        return cls(
            batch_id=str(data["batchId"]),
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
        stats = data.get("stats")
        return cls(
            batch_id=str(data["batchId"]),
            status=str(data["status"]),
            quantity=_int(data.get("quantity")) or 0,
            duplicates=_int(data.get("duplicates")) or 0,
            created=parse_time(data.get("created")),
            started=parse_time(data.get("started")),
            completed=parse_time(data.get("completed")),
            processed=_int(data.get("processed")),
            stats={str(k): int(v) for k, v in stats.items()} if isinstance(stats, dict) else None,
            credits=_int(data.get("credits")),
        )

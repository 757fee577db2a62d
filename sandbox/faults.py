"""Fault injection for chaos runs: a seeded share of API requests misbehave.

Each /v1.1 request draws, in this order: drop, 5xx, 429, slow. The first three are
exclusive; `slow` can add its delay to any answer that is not dropped before handling.
A drop or a 5xx happens before handling (nothing happened: a clear answer, or none) or, with
`drop_when` / `error_5xx_when` "after", once the request was handled (a create made and charged
its batch), the ambiguous cases.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class FaultConfig:
    error_5xx: float = 0.0  # share answered error_5xx_status
    error_5xx_status: int = 503  # 500-599: 503 as an overloaded API answers; 502/504 as a gateway does
    # "before": answered instead of handling (nothing happened). "after": handled, then the
    # answer replaced by the error (e.g. a gateway timing out on a create that went through).
    error_5xx_when: str = "before"
    rate_429: float = 0.0  # share answered 429 with Retry-After: retry_after
    slow: float = 0.0  # share delayed by slow_seconds before they are handled
    slow_seconds: float = 0.0
    drop: float = 0.0  # share whose connection is closed without an answer
    # "before": dropped unhandled (nothing happened). "after": handled, then the answer
    # is lost (e.g. the batch was created and charged), the ambiguous case.
    drop_when: str = "before"
    retry_after: float = 1.0  # Retry-After of injected 429s, in real seconds
    seed: int = 0

    @classmethod
    def parse(cls, body: Any) -> FaultConfig:
        if not isinstance(body, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(body) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        config = cls(**body)
        for name in ("error_5xx", "rate_429", "slow", "drop"):
            value = getattr(config, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1]")
        if config.drop_when not in ("before", "after") or config.error_5xx_when not in ("before", "after"):
            raise ValueError("drop_when and error_5xx_when must be 'before' or 'after'")
        status = config.error_5xx_status
        if isinstance(status, bool) or not isinstance(status, int) or not 500 <= status <= 599:
            raise ValueError("error_5xx_status must be an integer in [500, 599]")
        if float(config.slow_seconds) < 0 or float(config.retry_after) < 0:
            raise ValueError("slow_seconds and retry_after must be >= 0")
        return config

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Fault:
    kind: str | None  # None, "drop", "5xx", "429"
    delay: float  # seconds to wait before handling


class FaultInjector:
    def __init__(self) -> None:
        self.configure(FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        self.config = config
        self._random = random.Random(config.seed)

    def draw(self) -> Fault:
        c = self.config
        if not (c.drop or c.error_5xx or c.rate_429 or c.slow):
            return Fault(None, 0.0)
        rnd = self._random.random
        kind = None
        if rnd() < c.drop:
            kind = "drop"
        elif rnd() < c.error_5xx:
            kind = "5xx"
        elif rnd() < c.rate_429:
            kind = "429"
        delay = float(c.slow_seconds) if rnd() < c.slow else 0.0
        return Fault(kind, delay)

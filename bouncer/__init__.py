"""Async client for the Bouncer batch verification API (httpx). Knows HTTP, not Temporal."""

from bouncer.client import BouncerClient
from bouncer.errors import (
    BadRequest,
    BouncerError,
    Forbidden,
    NotFound,
    OutOfCredits,
    RateLimited,
    Transient,
    Unauthorized,
)
from bouncer.limits import RateGate, TokenBucket
from bouncer.models import BatchStatus, CreatedBatch

__all__ = [
    "BadRequest",
    "BatchStatus",
    "BouncerClient",
    "BouncerError",
    "CreatedBatch",
    "Forbidden",
    "NotFound",
    "OutOfCredits",
    "RateGate",
    "RateLimited",
    "TokenBucket",
    "Transient",
    "Unauthorized",
]

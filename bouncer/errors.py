"""The client's errors: one tree, so callers catch at the level they handle.

    BouncerError                 status, message
    ├── RateLimited   429        retry_after (seconds or None)
    ├── OutOfCredits  402        credits_left (int or None)
    ├── Unauthorized  401
    │   └── Forbidden 403
    ├── BadRequest    400, 413, 422, other 4xx; invalid URL or request  (our fault: do not retry)
    ├── NotFound      404
    └── Transient     5xx, connect/read/write/pool errors and timeouts, dropped connections,
                      a 2xx whose body is not the JSON promised            (retry with backoff)
                      `ambiguous` when it may have been acted on (not a 503, a 408 or an unsent request)

Messages never contain the API key.
"""

from __future__ import annotations

from typing import Any


class BouncerError(Exception):
    """Any failure of a Bouncer API call. `status` is the HTTP status, None without one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes survive pickling (e.g. across process pools).
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[BouncerError], state: dict[str, Any]) -> BouncerError:
    error = cls.__new__(cls)
    Exception.__init__(error, state.get("message", ""))
    error.__dict__.update(state)
    return error


class RateLimited(BouncerError):
    """429. `retry_after` is the server's `Retry-After` in seconds, None if absent."""

    def __init__(self, message: str, *, status: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class OutOfCredits(BouncerError):
    """402. `credits_left` is parsed from the message ("13 credits left") when present."""

    def __init__(self, message: str, *, status: int | None = 402, credits_left: int | None = None) -> None:
        super().__init__(message, status=status)
        self.credits_left = credits_left


class Unauthorized(BouncerError):
    """401: the API key is missing or wrong."""


class Forbidden(Unauthorized):
    """403: the key is valid but may not do this."""


class BadRequest(BouncerError):
    """The request itself is wrong (400, 413, 422, other 4xx): retrying cannot help."""


class NotFound(BouncerError):
    """404: no such batch (never created, deleted, or expired)."""


class Transient(BouncerError):
    """Worth retrying with backoff: 5xx, network failures, timeouts, garbled 2xx bodies.

    `ambiguous` is True when the request may have reached the server and been acted on
    (the answer was lost: read timeout, dropped connection, garbled 2xx; or a 5xx other than
    503, which a gateway or the API may answer after the work was done). For a create that
    means a batch may exist and be charged. `retry_after` is the server's hint, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        ambiguous: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status)
        self.ambiguous = ambiguous
        self.retry_after = retry_after

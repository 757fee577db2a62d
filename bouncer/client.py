"""`BouncerClient`: the batch API over httpx, every failure mapped to `bouncer.errors`."""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import orjson

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
    "MAX_RETRY_AFTER_S", "BatchStatus", "BouncerClient", "CreatedBatch", "error_from_response", "parse_retry_after",
]

DOWNLOAD_KINDS = frozenset({"all", "deliverable", "risky", "undeliverable", "unknown"})
_BATCH = "/v1.1/email/verify/batch"
_CREDITS_LEFT = re.compile(r"(-?\d+)\s+credits?\s+left", re.IGNORECASE)
_MESSAGE_LIMIT = 300
MAX_RETRY_AFTER_S = 3600.0  # a longer Retry-After is read as this (a wait, not a failure)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: decimal seconds or an HTTP date (in GMT, also
    when it names no zone: the asctime form, `-0000`).

    Returns None when absent, unreadable, negative or not finite; a date already past is 0.
    Never more than MAX_RETRY_AFTER_S (a wait past it would only stall the retry).
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # read as the host's local time, it was off by the host's UTC offset
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _message_of(response: httpx.Response) -> str:
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, Mapping):
        message = body.get("message") or body.get("error")
        if message:
            return str(message)[:_MESSAGE_LIMIT]
    text = response.text.strip()
    return text[:_MESSAGE_LIMIT] if text else response.reason_phrase or "no message"


def error_from_response(response: httpx.Response) -> BouncerError:
    """The error for a non-2xx answer: the one place HTTP statuses map to the error tree."""
    status = response.status_code
    message = _message_of(response)
    if status == 429:
        return RateLimited(message, retry_after=parse_retry_after(response.headers.get("retry-after")))
    if status == 402:
        match = _CREDITS_LEFT.search(message)
        return OutOfCredits(message, credits_left=int(match.group(1)) if match else None)
    if status == 401:
        return Unauthorized(message, status=status)
    if status == 403:
        return Forbidden(message, status=status)
    if status == 404:
        return NotFound(message, status=status)
    if status == 408 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        # 503 (the API shedding load) and 408 refuse a request unhandled. Any other 5xx may come
        # after the work was done (a gateway timing out on the API, an error past its commit).
        return Transient(message, status=status, retry_after=retry_after, ambiguous=status not in (408, 503))
    return BadRequest(message, status=status)


class BouncerClient:
    """Async client of Bouncer's batch API.

    Creations and all other calls pass separate gates (a semaphore of `max_concurrency`
    and a token bucket each), so a burst of polls cannot starve creations or the reverse.
    Every method raises only `bouncer.errors.BouncerError` subclasses for API and network
    failures (plus ValueError for arguments that could never be valid). The API key is
    sent as `x-api-key` and appears in no repr and no error message.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_concurrency: int = 10,
        create_per_minute: float = 50,
        requests_per_minute: float = 180,
        transport: httpx.AsyncBaseTransport | None = None,
        on_response: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """`on_response(endpoint, code, seconds)` is called after every request (for metrics):
        endpoint is create, status, download, finish, delete or credits; code the HTTP status,
        or "error" when no answer came."""
        self.base_url = base_url.rstrip("/")
        self._on_response = on_response
        self._api_key = api_key
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"x-api-key": api_key, "accept": "application/json"},
            timeout=timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=2 * max_concurrency, max_keepalive_connections=2 * max_concurrency),
        )
        self._create_gate = RateGate(max_concurrency, TokenBucket(create_per_minute))
        self._request_gate = RateGate(max_concurrency, TokenBucket(requests_per_minute))

    def __repr__(self) -> str:
        return f"BouncerClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> BouncerClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._http.aclose()

    # ---- the API --------------------------------------------------------------------------

    async def create_batch(
        self, entries: Sequence[tuple[str, str]], *, callback_url: str | None = None
    ) -> CreatedBatch:
        """Create a batch of `(email, name)` entries; `name` comes back in each result.

        Returns the `CreatedBatch` (status "queued"). Raises OutOfCredits (402),
        RateLimited, Unauthorized/Forbidden, BadRequest (e.g. over 100,000 entries),
        Transient. A Transient with `ambiguous=True` means the batch may exist anyway.
        Raises ValueError for an empty `entries`.
        """
        if not entries:
            raise ValueError("a batch needs at least one entry")
        body = orjson.dumps([{"email": email, "name": name} for email, name in entries])
        return await self.create_batch_body(body, callback_url=callback_url)

    @property
    def create_gate(self) -> RateGate:
        """The creations' gate: hold it (`async with`) while building a body that must not go
        stale waiting for its turn, then call `create_batch_body(..., gate_held=True)`."""
        return self._create_gate

    async def create_batch_body(
        self, body: bytes, *, callback_url: str | None = None, gate_held: bool = False
    ) -> CreatedBatch:
        """`create_batch` with the JSON array already encoded (e.g. by the database); raises alike."""
        params = {"callback": callback_url} if callback_url else None
        data = await self._json(
            "POST",
            _BATCH,
            gate=contextlib.nullcontext() if gate_held else self._create_gate,
            params=params,
            content=body,
            headers={"content-type": "application/json"},
        )
        try:
            return CreatedBatch.from_json(self._mapping(data))
        except (KeyError, TypeError, ValueError) as exc:  # a 2xx without a batchId: made or not, we cannot tell
            raise Transient(f"a successful create answer without a batchId ({exc})", status=200,
                            ambiguous=True) from None

    async def get_status(self, batch_id: str, *, with_stats: bool = True) -> BatchStatus:
        """The batch's `BatchStatus` (not-ready is a status, not an error).

        Raises NotFound, RateLimited, Unauthorized/Forbidden, BadRequest, Transient (also for a
        2xx answer without a `batchId` or a `status`).
        """
        params = {"with-stats": "true"} if with_stats else None
        data = await self._json("GET", self._batch_path(batch_id), params=params)
        try:
            return BatchStatus.from_json(self._mapping(data))
        except (KeyError, TypeError, ValueError) as exc:  # as garbled as invalid JSON: asked again
            raise Transient(f"a status answer the client cannot read ({exc})", status=200) from None

    async def download(self, batch_id: str, *, which: str = "all") -> list[dict[str, Any]]:
        """The result records (dicts of the documented shape), filtered by `which`.

        Raises BadRequest if the batch is not completed yet, NotFound, RateLimited,
        Unauthorized/Forbidden, Transient (also for a body that is not a JSON array).
        """
        data = _loads_2xx(await self.download_raw(batch_id, which=which))
        if not isinstance(data, list):
            raise Transient("download answered something other than a JSON array", ambiguous=True)
        return data

    async def download_raw(self, batch_id: str, which: str = "all") -> bytes:
        """The download's JSON body as bytes, unparsed (for streaming parsers).

        Raises as `download`, except that the body is not checked. ValueError for an
        unknown `which`.
        """
        if which not in DOWNLOAD_KINDS:
            raise ValueError(f"which must be one of {sorted(DOWNLOAD_KINDS)}")
        response = await self._request(
            "GET", self._batch_path(batch_id) + "/download", params={"download": which}
        )
        return response.content

    async def finish(self, batch_id: str) -> None:
        """Ask the API to finish the batch now (unverified addresses come back unknown).

        Returns None on 2xx. Raises NotFound, RateLimited, Unauthorized/Forbidden,
        BadRequest, Transient.
        """
        await self._request("POST", self._batch_path(batch_id) + "/finish")

    async def delete(self, batch_id: str) -> None:
        """Delete the batch and its results at the API. Returns None on 2xx.

        Raises NotFound (already gone: callers that want idempotence catch it),
        RateLimited, Unauthorized/Forbidden, BadRequest, Transient.
        """
        await self._request("DELETE", self._batch_path(batch_id))

    async def credits(self) -> int:
        """Credits left on the account. Raises RateLimited, Unauthorized/Forbidden, Transient."""
        data = self._mapping(await self._json("GET", "/v1.1/credits"))
        value = data.get("credits")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise Transient("credits answer without a numeric 'credits'", status=200)
        return int(value)

    # ---- plumbing -------------------------------------------------------------------------

    @staticmethod
    def _batch_path(batch_id: str) -> str:
        if not batch_id:
            raise ValueError("batch_id is empty")
        return f"{_BATCH}/{quote(batch_id, safe='')}"

    @staticmethod
    def _mapping(data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Transient("expected a JSON object", status=200, ambiguous=True)
        return data

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        return _loads_2xx(response.content, status=response.status_code)

    async def _request(
        self, method: str, path: str, *, gate: AbstractAsyncContextManager | None = None, **kwargs: Any
    ) -> httpx.Response:
        async with gate or self._request_gate:
            began = time.perf_counter()
            try:
                response = await self._http.request(method, path, **kwargs)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                self._observe(method, path, "error", began)
                raise self._transport_error(exc) from None
            self._observe(method, path, str(response.status_code), began)
        if response.is_success:
            return response
        error = error_from_response(response)
        error.message = self._redact(error.message)
        error.args = (error.message,)
        raise error

    def _observe(self, method: str, path: str, code: str, began: float) -> None:
        if self._on_response is not None:
            self._on_response(endpoint_of(method, path), code, time.perf_counter() - began)

    def _transport_error(self, exc: httpx.HTTPError | httpx.InvalidURL) -> BouncerError:
        detail = self._redact(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)):
            return BadRequest(f"request not sendable: {detail}")
        # Not sent at all: connecting failed or no pooled connection came free.
        unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
        return Transient(f"network: {detail}", ambiguous=not unsent)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def endpoint_of(method: str, path: str) -> str:
    """The API endpoint a request went to, as a metrics label (no batch ids)."""
    if path.endswith("/credits"):
        return "credits"
    if path == _BATCH:
        return "create"
    if method == "DELETE":
        return "delete"
    for suffix in ("download", "finish"):
        if path.endswith("/" + suffix):
            return suffix
    return "status"


def _loads_2xx(content: bytes, *, status: int = 200) -> Any:
    """Parse a 2xx body; a garbled one is Transient (the answer was lost in transit)."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        raise Transient("invalid JSON in a successful answer", status=status, ambiguous=True) from None

"""Request bodies of `POST /v1/batches`, streamed: never the whole list in memory.

The body is read chunk by chunk from the ASGI stream by an async generator; the COPY into
Postgres runs in a worker thread (psycopg's sync COPY, the same code as `starter.py submit`)
and pulls the next chunk from the event loop only when it needs it, so a slow database slows
the upload instead of buffering it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator

import ijson
from python_multipart.multipart import MultipartParser, parse_options_header

from activities.ingest import _Prefixed, iter_rows, normalize_address


class BadBody(Exception):
    """The request body cannot be read as a list; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


async def limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    """Pass chunks through, refusing bodies over `max_bytes` (413)."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > max_bytes:
            raise BadBody(f"body larger than {max_bytes:,} bytes (API_MAX_UPLOAD_MB)", 413)
        if chunk:
            yield chunk


async def multipart_file(stream: AsyncIterator[bytes], content_type: str) -> AsyncIterator[bytes]:
    """The bytes of the part named `file` of a multipart/form-data body, as they arrive."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadBody("multipart body without a boundary in its Content-Type")
    state = {"field": b"", "value": b"", "name": None, "found": False}
    out: list[bytes] = []

    def on_part_begin() -> None:
        state["name"] = None

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].lower() == b"content-disposition":
            _, opts = parse_options_header(state["value"])
            state["name"] = opts.get(b"name")
        state["field"] = state["value"] = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == b"file":
            state["found"] = True
            out.append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data,
    })
    try:
        async for chunk in stream:
            parser.write(chunk)
            while out:
                yield out.pop(0)
        parser.finalize()
    except BadBody:
        raise
    except Exception as exc:  # python-multipart's parse errors carry the reason
        raise BadBody(f"malformed multipart body: {exc}") from None
    if not state["found"]:
        raise BadBody("multipart body has no part named `file` (send the list as -F file=@list.csv)")


def pull(agen: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """A sync iterator (for the COPY thread) over an async one running on `loop`."""
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
        except StopAsyncIteration:
            return


def csv_rows(chunks: Iterator[bytes], column: str | None) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Rows of a CSV (or one-address-per-line) body: the CLI's parser, line numbers included."""
    return iter_rows(chunks, column)


def json_rows(chunks: Iterator[bytes]) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Rows of a JSON array of address strings; row n is the array's n-th element (1-based).

    A non-string element is an invalid row (reported, never sent); a body that is not a JSON
    array is refused as a whole.
    """
    stream = io.BufferedReader(_Prefixed(b"", chunks), 256 * 1024)
    n = 0
    try:
        for prefix, event, value in ijson.parse(stream):
            if prefix == "":
                if event not in ("start_array", "end_array"):
                    raise BadBody("body must be a JSON array of address strings")
            elif prefix == "item" and event not in ("end_map", "end_array", "map_key"):
                n += 1
                if event == "string":
                    if "\x00" in value:
                        yield n, value.replace("\x00", "\ufffd"), None, "contains a NUL byte"
                        continue
                    email, reason = normalize_address(value)
                    yield n, value, email, reason
                else:
                    yield n, "" if value is None else str(value), None, f"not a string (JSON {event})"
    except ijson.JSONError as exc:
        raise BadBody(f"body is not valid JSON (after element {n}): {exc}") from None

"""Request bodies of `POST /v1/batches`, streamed: never the whole list in memory.

The body is read chunk by chunk from the ASGI stream by an async generator; the COPY into
Postgres runs in a worker thread (psycopg's sync COPY, the same code as `starter.py submit`)
and pulls the next chunk from the event loop only when it needs it, so a slow database slows
the upload instead of buffering it.
"""

from __future__ import annotations

import asyncio
import codecs
import io
import itertools
from collections.abc import AsyncIterator, Iterator

import ijson
from python_multipart.multipart import MultipartParser, parse_options_header

from activities.ingest import _WIDE_BOMS, _Prefixed, as_utf8, decompressed, iter_rows, normalize_address


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

    def on_headers_finished() -> None:
        if state["name"] == b"file":
            if state["found"]:  # two lists would be read as one, the first's last line joined to the next's header
                raise BadBody("multipart body has more than one part named `file`: send one list per request")
            state["found"] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["name"] == b"file":
            out.append(data[start:end])

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
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


def charset_codec(content_type: str) -> str | None:
    """The Python codec of the Content-Type's `charset` (None: none declared, or UTF-8)."""
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset")
    if charset is None:
        return None
    label = charset.decode("latin-1")
    try:
        info = codecs.lookup(label)
        name = info.name
    except LookupError:
        raise BadBody(f"charset {label!r} is unknown: send UTF-8, or name the list's"
                      " encoding (for example charset=windows-1252)", 415) from None
    # Python also knows bytes-to-bytes codecs (base64, zlib), rot13, `undefined`, and idna, which
    # refuses errors="replace": only a codec that decodes to text as `as_utf8` uses it will do.
    try:
        text = info._is_text_encoding and codecs.getincrementaldecoder(name)(errors="replace").decode(b"", final=True)
    except Exception:  # noqa: BLE001 - a codec may refuse the probe in its own way (UnicodeError, AssertionError)
        text = None
    if not isinstance(text, str):
        raise BadBody(f"charset {label!r} is not a text encoding: send UTF-8, or name the list's"
                      " encoding (for example charset=windows-1252)", 415) from None
    return None if name == "utf-8" else name


def gunzipped(chunks: Iterator[bytes], source: str, max_bytes: int) -> Iterator[bytes]:
    """The body decompressed if it is gzip (told by its magic bytes), refused (413) once it passes
    `max_bytes` decompressed: API_MAX_UPLOAD_MB bounds the list as read, not only as sent, so a
    zip bomb is stopped at the same size as a plain body."""
    seen = 0
    for chunk in decompressed(chunks, source):
        seen += len(chunk)
        if seen > max_bytes:
            raise BadBody(f"list larger than {max_bytes:,} bytes once decompressed (API_MAX_UPLOAD_MB)", 413)
        yield chunk


def decoded(chunks: Iterator[bytes], codec: str | None) -> Iterator[bytes]:
    """The body as UTF-8, transcoded from its declared charset when that is another."""
    return chunks if codec is None else as_utf8(chunks, codec)


def pull(agen: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """A sync iterator (for the COPY thread) over an async one running on `loop`."""
    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(agen.__anext__(), loop).result()
        except StopAsyncIteration:
            return


def csv_rows(chunks: Iterator[bytes], column: str | None) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Rows of a CSV (or one-address-per-line) body: the CLI's parser, line numbers included, and
    the line taken as the header (a `HeaderRow`, reported in the answer). `chunks` come
    through `gunzipped` already: a gzip inside the gzip is not opened too."""
    return iter_rows(chunks, column, with_header=True, gunzip=False)


def json_rows(chunks: Iterator[bytes]) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Rows of a JSON array of address strings; row n is the array's n-th element (1-based).

    A non-string element is an invalid row (reported, never sent); a body that is not a JSON
    array is refused as a whole.
    """
    # A byte-order mark: UTF-8's is dropped (RFC 8259 lets a parser ignore it); UTF-16/32 are read as text.
    rest, head = iter(chunks), b""
    while len(head) < 4 and (chunk := next(rest, None)) is not None:
        head += chunk
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    elif encoding := next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None):
        head, rest = b"", as_utf8(itertools.chain([head], rest), encoding)
    stream = io.BufferedReader(_Prefixed(head, rest), 256 * 1024)
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
        # yajl's message is bytes or text, with the offending snippet on the lines after the first.
        why = exc.args[0] if exc.args else exc
        why = (why.decode("utf-8", "replace") if isinstance(why, bytes) else str(why)).strip().splitlines()[0]
        raise BadBody(f"body is not valid JSON (after element {n}): {why}") from None

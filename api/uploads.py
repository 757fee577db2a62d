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
import re
from collections.abc import AsyncIterator, Iterator

import ijson
from python_multipart.multipart import MultipartParser, parse_options_header

from activities.ingest import _MAX_FIELD, _WIDE_BOMS, _Prefixed, as_utf8, decompressed, iter_rows, normalize_address


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


MIN_UPLOAD_RATE = 1024  # bytes a second, averaged over API_CLIENT_IDLE_TIMEOUT_S of waiting


async def arriving(stream: AsyncIterator[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """Pass chunks through, refusing (408) a body that stalls: less than `MIN_UPLOAD_RATE` bytes a
    second arrive over `idle_s` seconds (nothing at all, or a trickle that would hold its upload
    slot for hours).

    The clock runs only while the COPY waits for the client (a chunk is asked for when the COPY
    needs it), so a slow database never counts against the client.
    """
    chunks, clock = aiter(stream), asyncio.get_running_loop().time
    waited, got = 0.0, 0  # since the client last sent its due: `idle_s` at the least rate
    while True:
        asked = clock()
        try:
            chunk = await asyncio.wait_for(anext(chunks), idle_s - waited)
        except StopAsyncIteration:
            return
        except TimeoutError:
            what = (f"only {got:,} bytes of the body arrived in {idle_s:g} s (at least {MIN_UPLOAD_RATE:,} a second"
                    " are needed)") if got else f"nothing of the body arrived for {idle_s:g} s"
            raise BadBody(f"{what} (API_CLIENT_IDLE_TIMEOUT_S): the upload is dropped, nothing stored", 408) from None
        waited, got = waited + clock() - asked, got + len(chunk)
        if got >= MIN_UPLOAD_RATE * idle_s:
            waited, got = 0.0, 0
        yield chunk


async def multipart_file(stream: AsyncIterator[bytes], content_type: str,
                         part: dict[str, str] | None = None) -> AsyncIterator[bytes]:
    """The bytes of the part named `file` of a multipart/form-data body, as they arrive; `part`
    gets that part's own Content-Type (key "content_type") before its first bytes are yielded."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadBody("multipart body without a boundary in its Content-Type")
    state = {"field": b"", "value": b"", "name": None, "found": False, "type": b""}
    out: list[bytes] = []

    def on_part_begin() -> None:
        state["name"], state["type"] = None, b""

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].lower() == b"content-disposition":
            _, opts = parse_options_header(state["value"])
            state["name"] = opts.get(b"name")
        elif state["field"].lower() == b"content-type":
            state["type"] = state["value"]
        state["field"] = state["value"] = b""

    def on_headers_finished() -> None:
        if state["name"] == b"file":
            if state["found"]:  # two lists would be read as one, the first's last line joined to the next's header
                raise BadBody("multipart body has more than one part named `file`: send one list per request")
            state["found"] = True
            if part is not None:
                part["content_type"] = state["type"].decode("latin-1")

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


def part_decoded(chunks: Iterator[bytes], part: dict[str, str]) -> Iterator[bytes]:
    """The `file` part as UTF-8, transcoded from the charset its own Content-Type names
    (`-F 'file=@list.csv;type=text/csv; charset=windows-1252'`); known once its first bytes came."""
    chunks = iter(chunks)
    if (first := next(chunks, None)) is None:
        return
    yield from decoded(itertools.chain([first], chunks), charset_codec(part.get("content_type", "")))


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

    A non-string element is an invalid row (reported, never sent), and so is a string longer than
    16 MiB (as CSV's over-long line: its first 1,000 characters kept, the rest never held); a body
    that is not a JSON array is refused as a whole.
    """
    # A byte-order mark: UTF-8's is dropped (RFC 8259 lets a parser ignore it); UTF-16/32 are read as text.
    rest, head = iter(chunks), b""
    while len(head) < 4 and (chunk := next(rest, None)) is not None:
        head += chunk
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:]
    elif encoding := next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None):
        head, rest = b"", as_utf8(itertools.chain([head], rest), encoding)
    overlong: dict[int, int] = {}  # ordinal of a string in the body -> its length in bytes
    stream = io.BufferedReader(_Prefixed(b"", _capped_strings(itertools.chain([head], rest), overlong)), 256 * 1024)
    n = strings = 0
    try:
        # use_float: an integer past 64 bits is a parse error ("integer overflow"); without it yajl's
        # C backend hands Python an integer of any length, and past 4,300 digits the process crashed.
        for prefix, event, value in ijson.parse(stream, use_float=True):
            if event in ("string", "map_key"):
                strings += 1
            if prefix == "":
                if event not in ("start_array", "end_array"):
                    raise BadBody("body must be a JSON array of address strings")
            elif prefix == "item" and event not in ("end_map", "end_array", "map_key"):
                n += 1
                if event == "string":
                    if (length := overlong.get(strings)) is not None:
                        yield (n, value[:1000].replace("\x00", "\ufffd"), None,
                               f"element longer than {_MAX_FIELD // 2**20} MiB ({length:,} bytes): not read")
                        continue
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
        if "integer overflow" in why:
            raise BadBody(f"element {n + 1} is a number too large to read; send addresses as JSON strings") from None
        raise BadBody(f"body is not valid JSON (after element {n}): {why}") from None


def _string_end(data: bytes, i: int, escaped: bool) -> tuple[int, bool]:
    """Where the JSON string that `data[i:]` is inside of closes (-1: not in `data`), and whether
    `data` ends on a backslash that escapes the next chunk's first byte."""
    if escaped:
        if i >= len(data):
            return -1, True
        i += 1
    while True:
        quote = data.find(b'"', i)
        backslash = data.find(b"\\", i, len(data) if quote < 0 else quote)
        if backslash < 0:
            return quote, False
        if backslash + 1 == len(data):
            return -1, True
        i = backslash + 2  # `\uXXXX`'s hex digits hold no quote or backslash


_HEAD_BYTES = 8 * 1024  # of an over-long string, passed on (at least the 1,000 characters kept)
_ESCAPE_OR_TEXT = re.compile(rb"\\u[0-9A-Fa-f]{0,4}|\\.?|[^\\]+", re.S)


def _safe_head(held: list[bytes], length: int) -> bytes:
    """The first bytes of a string's content (`held` from its opening quote, `length` bytes long),
    cut neither inside a UTF-8 sequence nor inside an escape."""
    first = bytearray()
    for piece in held:
        first += piece[:_HEAD_BYTES + 2]
        if len(first) > _HEAD_BYTES + 1:
            break
    content = bytes(first[1:length + 1])
    cut = min(_HEAD_BYTES, len(content))
    while 0 < cut < len(content) and 0x80 <= content[cut] < 0xC0:  # a continuation byte: the sequence goes on
        cut -= 1
    head = content[:cut]
    last = None
    for last in _ESCAPE_OR_TEXT.finditer(head):
        pass
    if last is not None and last[0][:1] == b"\\" and len(last[0]) < (6 if last[0][1:2] == b"u" else 2):
        head = head[:last.start()]  # an escape the cut left incomplete
    return head


def _capped_strings(chunks: Iterator[bytes], overlong: dict[int, int]) -> Iterator[bytes]:
    """The JSON text of `chunks`, each string longer than `_MAX_FIELD` bytes cut to its first few
    KiB; `overlong` maps such a string's ordinal (1-based, keys included) to its whole length.

    yajl buffers a string until it ends and re-scans it on every read (quadratic), then ijson
    copies it: a 150 MB element took 72 s and 880 MB. Here a string still open at a chunk's end
    is held (at most `_MAX_FIELD` bytes) until it ends or is known too long; the rest of one too
    long is only counted. The string's closing quote passes on only once its length is known.
    """
    in_string = escaped = skipping = False
    ordinal = 0
    held: list[bytes] = []  # the open string, from its opening quote
    held_len = 0
    for data in chunks:
        out: list[bytes] = []
        mark = i = 0  # data[mark:] is not passed on yet
        # Most chunks: no string in them can be too long, and each ends at its next quote.
        if not skipping and not escaped and held_len + len(data) <= _MAX_FIELD and b"\\" not in data:
            quotes = data.count(b'"')
            if in_string and quotes:  # the held string ends at the first
                i = data.index(b'"') + 1
                out.extend(held)
                out.append(data[:i])
                held, held_len, in_string, quotes, mark = [], 0, False, quotes - 1, i
            if not in_string:
                ordinal += quotes // 2
                if quotes % 2 == 0:
                    yield b"".join(out) + data[mark:] if out else data
                    continue
                i = data.rindex(b'"')  # the last string is still open: the loop below holds it
                out.append(data[mark:i])
                mark = i
                i += 1
                in_string, ordinal, held, held_len = True, ordinal + 1, [], 0
        while True:
            if not in_string:
                quote = data.find(b'"', i)
                if quote < 0:
                    out.append(data[mark:])
                    break
                out.append(data[mark:quote])
                mark, i = quote, quote + 1
                in_string, escaped, ordinal, held, held_len = True, False, ordinal + 1, [], 0
                continue
            end, escaped = _string_end(data, i, escaped)
            if skipping:
                overlong[ordinal] += (len(data) if end < 0 else end) - i
                if end < 0:
                    break
                out.append(b'"')
                skipping = in_string = False
                mark = i = end + 1
                continue
            held.append(data[mark:] if end < 0 else data[mark:end + 1])
            held_len += (len(data) if end < 0 else end + 1) - mark
            if held_len - (1 if end < 0 else 2) > _MAX_FIELD:  # the quotes are not content
                overlong[ordinal] = held_len - (1 if end < 0 else 2)
                out.append(b'"' + _safe_head(held, overlong[ordinal]))
                held, held_len, skipping = [], 0, True
                if end < 0:
                    break
                out.append(b'"')
                skipping = in_string = False
            elif end >= 0:
                out.extend(held)
                held, held_len, in_string = [], 0, False
            else:
                break
            mark = i = end + 1
        if out := b"".join(out):
            yield out
    if held:
        yield b"".join(held)  # a string the body ends inside: yajl says so

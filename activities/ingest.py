"""Reading submitted lists: detect the CSV shape, normalize and syntax-check each address, COPY rows.

Every input row becomes exactly one `items` row: `pending` with its normalized address, or
`invalid` with a reason a person understands. Nothing is dropped; invalid rows never reach the API.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import csv
import functools
import io
import itertools
import math
import re
import socket
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import psycopg
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from psycopg.copy import LibpqWriter
from temporalio import activity
from temporalio.exceptions import ApplicationError

from db import copy_text
from workflows.models import FINISHED_STATES, IngestOutcome, IngestRequest

EMAIL_HEADERS = ("email", "e-mail", "email_address", "emailaddress", "mail", "address", "e-mail address")
_MAX_FIELD = 16 * 1024 * 1024
csv.field_size_limit(_MAX_FIELD)

# Plain ASCII addresses (almost all rows) take this fast path; anything else goes through
# email-validator, the well-kept reference, so IDN domains and odd forms are judged by it.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# One match for the common case: optional mailto:, dot-atom local part, LDH labels, alphabetic
# start of the TLD, optional trailing dot. Groups: local part, domain.
_FAST = re.compile(rf"(?i:mailto:)?\s*({_ATOM}(?:\.{_ATOM})*)@((?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z])?)\.?")

_SPECIAL_USE = frozenset(SPECIAL_USE_DOMAIN_NAMES)  # .test, .local, ...: email-validator refuses them


class UnreadableInput(Exception):
    """The file cannot be read at all; nothing was queued."""


class SourceUnavailable(Exception):
    """The source could not be read just now (the connection failed or dropped, HTTP 5xx or 429);
    a later attempt may succeed, and resumes after the rows already committed."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# A source that stays unavailable fails the list after this many attempts of the ingest activity
# (its retry policy backs off to 30 s: about 15 minutes in all).
SOURCE_ATTEMPTS = 35


def normalize_address(value: str) -> tuple[str | None, str | None]:
    """Return (normalized address, None) or (None, reason).

    Normalization: trim, drop a `mailto:` prefix and a trailing dot on the domain, lower-case
    and punycode the domain. The local part keeps its case (RFC 5321), so dedupe is
    case-insensitive on the domain only.
    """
    m = _FAST.fullmatch(value.strip())
    if m is not None:
        local, domain = m.groups()
        domain = domain.lower()
        email = f"{local}@{domain}"
        # `--` (punycode and reserved labels) is left to email-validator's IDNA checks.
        if len(local) <= 64 and len(email) <= 254 and "--" not in domain and domain.rpartition(".")[2] not in _SPECIAL_USE:
            return email, None
    return _normalize_slow(value)


def _normalize_slow(value: str) -> tuple[str | None, str | None]:
    s = value.strip()
    if s[:7].lower() == "mailto:":
        s = s[7:].strip()
    if not s:
        return None, "empty address"
    if "\ufffd" in s:
        return None, "not valid UTF-8"
    if "@" not in s:
        return None, "missing @"
    local, _, domain = s.rpartition("@")
    if not local:
        return None, "empty local part"
    domain = domain.rstrip(".").lower()
    if not domain:
        return None, "empty domain"
    if len(local) > 64:
        return None, "local part longer than 64 characters"
    try:
        checked = validate_email(f"{local}@{domain}", check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return None, str(exc)
    email = f"{checked.local_part}@{checked.ascii_domain}"
    if len(email) > 254:
        return None, "address longer than 254 characters"
    return email, None


INVALID_ROWS_KEPT = 100  # invalid rows a submission reports at once (all are in `items`)


@dataclass
class IngestStats:
    rows: int = 0
    pending: int = 0
    invalid: int = 0
    bytes_read: int = 0
    invalid_rows: list[dict] = field(default_factory=list)  # the first: {"row": line, "reason": why}
    header: dict | None = None  # the line taken as the header, if any (`HeaderRow.report`)


@dataclass
class HeaderRow:
    """The line read as the header: not a row, but the submitter is told which line it was."""

    line: int
    names: list[str]
    column: int  # the address column, from 0

    def report(self) -> dict:
        """{"line", "names" (the first 50, each cut at 100 characters), "column" (from 1)}."""
        return {"line": self.line, "names": [n[:100] for n in self.names[:50]], "column": self.column + 1}


@dataclass
class CsvShape:
    delimiter: str
    has_header: bool
    column: int


_DELIMITERS = (",", ";", "\t", "|")
# A header cell that names an email column: "Email", "E-Mail", "Work Email", "email_address",
# "EmailAddress", "E-mail Address". Words only: "not-an-email" or "ann.mail.com" is data.
_EMAIL_NAME = re.compile(r"(?:[a-z]+[ _-]?)?e-?mails?(?:[ _-]?(?:address(?:es)?|addr|adresse|id))?")
# Other names a header gives the column that holds the addresses (compared whole, lower-cased).
_ADDRESS_NAMES = frozenset(EMAIL_HEADERS) | {"contact", "contacts", "recipient", "recipients", "to", "login",
                                             "user", "username", "courriel", "correo"}
_LABEL = re.compile(r"[^\W\d_][\w ]{0,39}")  # a column name: a word or a few, no punctuation


def _guess_delimiter(lines: list[str]) -> str:
    """The delimiter that splits the first record most often, counted outside quotes (a quoted
    `"Doe, John"` holds no delimiter); ties go to the one that splits the sample more often."""
    def splits(d: str) -> tuple[int, int]:
        records = [r for r in csv.reader(io.StringIO("\n".join(lines)), delimiter=d) if r]
        return (len(records[0]) - 1, sum(len(r) - 1 for r in records)) if records else (0, 0)

    scores = {d: splits(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: scores[d])  # max keeps the first of equals: "," before the others
    return best if scores[best] > (0, 0) else ","


def _is_header(first: list[str], column: int, later_at: list[int]) -> bool:
    """Whether the first row (lower-cased cells, none with `@`) names columns rather than holds data.

    Only names make a header: a cell naming an email column, the address column (`column`)
    under a name such a column has, or two or more address columns all under plain words
    (`work,home`). Anything else is data, so a bad first address is reported on line 1
    instead of being skipped as a header.
    """
    if any(_EMAIL_NAME.fullmatch(c) or c in EMAIL_HEADERS for c in first):
        return True
    if column < len(first) and first[column] in _ADDRESS_NAMES:
        return True
    return len(later_at) >= 2 and all(i < len(first) and _LABEL.fullmatch(first[i]) for i in later_at)


def detect_shape(sample: str, column: str | None) -> CsvShape:
    """Guess delimiter, header and the email column from the first lines of the file."""
    lines = [ln for ln in sample.splitlines() if ln.strip()][:20]
    if not lines:
        return CsvShape(",", False, 0)
    delimiter = _guess_delimiter(lines)
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [c.strip().lower().lstrip("\ufeff").strip() for c in rows[0]]
    first_has_at = any("@" in c for c in rows[0])
    width = max(map(len, rows))
    # Columns holding addresses in the rows after the first.
    later_at = [i for i in range(width) if any(i < len(r) and "@" in r[i] for r in rows[1:])]
    if column is not None:
        if column.isascii() and column.isdecimal():  # "²" and "٣" are digits to str.isdigit, not to int()
            number = int(column)
            if not 1 <= number <= width:
                raise UnreadableInput(f"column {number} not found: columns are numbered from 1, and the first"
                                      f" lines have {width}")
            return CsvShape(delimiter, not first_has_at and _is_header(header, number - 1, later_at), number - 1)
        if column.lower() not in header:
            if first_has_at:  # data, not a header: never echo it (addresses stay out of Temporal)
                raise UnreadableInput(f"column {column!r} not found: the first line is not a header (it holds an"
                                      " address); give the column by its number, from 1")
            raise UnreadableInput(f"column {column!r} not found in the header: {', '.join(rows[0])[:500]}")
        return CsvShape(delimiter, True, header.index(column.lower()))
    if first_has_at:
        with_at = [i for i in range(width) if any(i < len(r) and "@" in r[i] for r in rows)]
        return CsvShape(delimiter, False, with_at[0] if with_at else 0)
    mailish = [i for i, name in enumerate(header) if name in EMAIL_HEADERS or "mail" in name]
    exact = next((header.index(name) for name in EMAIL_HEADERS if name in header), None)  # an exact email header wins
    if exact is not None:
        guess = exact
    else:  # "Work Email" over "Mailing Street": the one whose data has addresses
        guess = next((i for i in mailish if i in later_at), later_at[0] if later_at else mailish[0] if mailish else 0)
    if _is_header(header, guess, later_at):
        return CsvShape(delimiter, True, guess)
    return CsvShape(delimiter, False, later_at[0] if later_at else 0)


class _Prefixed(io.RawIOBase):
    """A non-seekable byte stream with its first bytes already read (for shape detection)."""

    def __init__(self, head: bytes, rest: Iterator[bytes]) -> None:
        self._buf = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - io protocol
        while not self._buf:
            try:
                self._buf = next(self._rest)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (only the delta-seconds form; a date is left to the retry policy)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return min(max(seconds, 0.0), 600.0) if seconds is not None and math.isfinite(seconds) else None


def shown_uri(uri: str) -> str:
    """`uri` as messages, names and events show it: an http(s) URL without its userinfo's password
    and its query (a presigned URL's signature, a token), which must not reach a failure message
    (Temporal's history), a `user_batch.failed` event's subscribers or the rows' `reason`."""
    if not uri.lower().startswith(("http://", "https://")):
        return uri
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # an unparsable port or host: show the scheme only
        return uri.split(":", 1)[0] + "://(unparsable URL)"
    user = "***@" if parts.username is not None or parts.password is not None else ""  # a user, a token...
    host = f"[{host}]" if ":" in host else host
    return (f"{parts.scheme}://{user}{host}{f':{port}' if port is not None else ''}{parts.path}"
            + ("?(query hidden)" if parts.query else ""))


def list_name(uri: str) -> str:
    """A list's default name: the last segment of its path (no query, no credentials)."""
    from urllib.parse import unquote, urlsplit

    path = urlsplit(uri).path if uri.lower().startswith(("http://", "https://", "file:")) else uri
    return unquote(path.rstrip("/").rsplit("/", 1)[-1])[:500] or shown_uri(uri)


def _local_path(text: str) -> Path:
    """A plain path, or a `file:` URI (percent-decoded; host empty or `localhost`)."""
    if not text.lower().startswith("file:"):
        return Path(text)
    from urllib.parse import urlsplit
    from urllib.request import url2pathname

    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost"):
        raise UnreadableInput(f"cannot read {text}: a file URI names a file on this machine (file:///path or"
                              f" file://localhost/path), not on host {parts.netloc!r}")
    return Path(url2pathname(parts.path))


def _head_and_stream(chunks: Iterator[bytes]) -> tuple[bytes, io.RawIOBase]:
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 64 * 1024:
            break
    return head[: 64 * 1024], _Prefixed(head, chunks)


GZIP_MAGIC = b"\x1f\x8b"  # a control character, then no UTF-8 lead byte: no list of text starts so
_GZIP_READ = 256 * 1024  # compressed bytes read at a time


def _gunzip(chunks: Iterable[bytes], source: str) -> Iterator[bytes]:
    """The decompressed bytes of a gzip stream, at most `_BLOCK_BYTES` at a time.

    `max_length` bounds each piece, so a chunk that inflates a thousandfold (a zip bomb) is
    handed out a block at a time, never held whole. Members that follow one another are read on
    (`cat a.gz b.gz` is gzip), zero padding after a member is ignored (as `gzip -d` does); corrupt
    or truncated data, or anything else after a member, raises UnreadableInput naming `source`.
    """
    d = zlib.decompressobj(wbits=31)
    between = False  # after a member's end: padding, or the next member
    try:
        for data in chunks:
            while data:
                if between:
                    if not (data := data.lstrip(b"\0")):
                        break
                    if not GZIP_MAGIC.startswith(data[:2]):
                        raise UnreadableInput(f"cannot read {source}: bytes that are not gzip follow its gzip data"
                                              " (two files joined?)")
                    d, between = zlib.decompressobj(wbits=31), False
                if out := d.decompress(data, _BLOCK_BYTES):
                    yield out
                data, between = (d.unused_data, True) if d.eof else (d.unconsumed_tail, False)
        if not between:
            if out := d.flush():  # the last bytes of a block cut short by max_length
                yield out
            if not d.eof:
                raise UnreadableInput(f"cannot read {source}: its gzip data ends early (truncated: an"
                                      " interrupted download or copy?)")
    except zlib.error as exc:
        raise UnreadableInput(f"cannot read {source}: it is gzip (starts with bytes 1f 8b) but its data is"
                              f" corrupt ({exc})") from None


def decompressed(chunks: Iterable[bytes], source: str) -> Iterator[bytes]:
    """`chunks` as they are, or decompressed (`_gunzip`) when they start with gzip's magic bytes:
    the content tells, not the name. Lazy: nothing is read before the first item is asked for."""
    rest, head = iter(chunks), b""
    while len(head) < len(GZIP_MAGIC) and (chunk := next(rest, None)) is not None:
        head += chunk
    if head.startswith(GZIP_MAGIC):
        yield from _gunzip(itertools.chain([head], rest), source)
        return
    if head:
        yield head
    yield from rest


@contextlib.contextmanager
def open_source(uri: str | Path | Iterable[bytes], name: str = "the upload", gunzip: bool = True
                ) -> Iterator[tuple[bytes, io.RawIOBase]]:
    """(first 64 KiB, a byte stream from the start) for a file path (a regular file, or a pipe
    such as `<(zcat x.gz)`), an http(s) URL, or byte chunks (an upload, or stdin; `name` says
    which in messages).

    gzip data (told by its magic bytes, not the name) is decompressed as it is read, unless
    `gunzip` is False (the HTTP API decompresses bodies itself, before their charset applies):
    the head, the stream and so the line numbers are those of the decompressed text.
    """
    with _opened(uri) as (head, raw):
        if not (gunzip and head.startswith(GZIP_MAGIC)):
            yield head, raw
            return
        source = name if not isinstance(uri, (str, Path)) else shown_uri(str(uri))
        yield _head_and_stream(_gunzip(iter(functools.partial(raw.read, _GZIP_READ), b""), source))


@contextlib.contextmanager
def _opened(uri: str | Path | Iterable[bytes]) -> Iterator[tuple[bytes, io.RawIOBase]]:
    """`open_source` before any decompression."""
    if not isinstance(uri, (str, Path)):
        yield _head_and_stream(iter(uri))
        return
    text = str(uri)
    if text.startswith(("http://", "https://")):
        shown = shown_uri(text)
        import httpx  # here: `starter.py submit` reads files, and httpx costs ~0.08 CPU-s to import

        try:
            # gzip in transit is decoded by `_gunzip`, as a gzip file is: a block at a time. httpx's own
            # decoder inflates each network read whole (a 64 KiB read of a zip bomb is 64 MiB at once).
            with httpx.stream("GET", text, timeout=60.0, follow_redirects=True,
                              headers={"Accept-Encoding": "gzip"}) as resp:
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise SourceUnavailable(f"cannot read {shown} now: HTTP {resp.status_code}",
                                            _retry_after(resp.headers.get("retry-after")))
                if resp.status_code != 200:
                    raise UnreadableInput(f"cannot read {shown}: HTTP {resp.status_code} (check the URL and that"
                                          " the workers may read it)")
                coding = resp.headers.get("content-encoding", "").strip().lower()
                if coding in ("", "identity"):
                    yield _head_and_stream(resp.iter_raw(256 * 1024))
                elif coding in ("gzip", "x-gzip"):
                    yield _head_and_stream(_gunzip(resp.iter_raw(_GZIP_READ), f"{shown} (Content-Encoding gzip)"))
                else:
                    raise UnreadableInput(f"cannot read {shown}: it is sent with Content-Encoding {coding!r};"
                                          " serve it plain or gzip")
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # Also raised mid-download (a dropped connection): transient, unlike a bad URL.
            raise SourceUnavailable(f"cannot read {shown} now: {exc or type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise UnreadableInput(f"cannot read {shown}: {exc}") from exc
        return
    path = _local_path(text)
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UnreadableInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    with raw:
        if not raw.seekable():  # a pipe: what was read for the head cannot be read again
            yield _head_and_stream(iter(functools.partial(raw.read, _BLOCK_BYTES), b""))
            return
        head = raw.read(64 * 1024)
        raw.seek(0)
        yield head, raw


# Cells that are already normalized addresses, recognized a block at a time. The language is
# `_FAST`'s, narrowed to what `normalize_address` returns unchanged (lower-case domain, no
# `mailto:`, whitespace or trailing dot, no `--`, no special-use TLD) and to lines of at most 64
# characters, so that every length limit holds. One match covers a run of such lines. Any other
# line is checked alone: `_FOLDABLE_LINE` (the same, but the domain needs lower-casing, as in
# `Ann@Gmail.COM`), else `normalize_address` (IDN, invalid, blank, header...).
# Every choice is decided by the next character, so possessive quantifiers (no backtracking
# state) match the same language as greedy ones, about 4x faster (measured).


def _address_lines(alpha: str) -> str:
    ldh = rf"[{alpha}0-9]++(?:-[{alpha}0-9]++)*+"  # a label: no hyphen at either end, no "--"
    tld = rf"[{alpha}][{alpha}0-9]*+(?:-[{alpha}0-9]++)*+(?<=[{alpha}])"
    special = "|".join(sorted(re.escape(d) for d in _SPECIAL_USE if "." not in d))
    return rf"(?=[^\n]{{1,64}}\n){_ATOM}+(?:\.{_ATOM}+)*+@(?:{ldh}\.)++(?!(?ai:{special})\n){tld}\n"


_NORMALIZED_LINES = re.compile(rf"(?:{_address_lines('a-z')})*+")
_FOLDABLE_LINE = re.compile(_address_lines("A-Za-z"))
_BLOCK_BYTES = 1024 * 1024


@dataclass
class _Run:
    """Rows whose raw cell is its own normalized address: pending, no reason."""

    lines: Sequence[int]
    cells: list[str]

    def split(self, k: int) -> tuple[_Run, _Run]:
        return _Run(self.lines[:k], self.cells[:k]), _Run(self.lines[k:], self.cells[k:])


@dataclass
class _Overlong:
    """A physical line longer than `_MAX_FIELD` characters (csv's field limit): one invalid row,
    its first characters kept, the rest never held in memory."""

    head: str
    length: int


def _text_blocks(raw: io.RawIOBase) -> Iterator[str | _Overlong]:
    """The decoded stream in blocks of about `_BLOCK_BYTES` that end at a `\n` (the last may not),
    and an `_Overlong` in place of each line longer than `_MAX_FIELD` characters.

    utf-8-sig drops a BOM; undecodable bytes become U+FFFD and the row is reported invalid. A
    `\n` never occurs inside a UTF-8 sequence, so cutting there decodes exactly like one stream.
    Text with bare CRs (old Mac line ends) is kept whole up to its next `\n`, as csv reads it.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")

    def texts() -> Iterator[str]:
        while data := raw.read(_BLOCK_BYTES):
            yield decoder.decode(data)
        yield decoder.decode(b"", final=True)

    parts: list[str] = []  # a line longer than a block accumulates here
    size, has_cr = 0, False  # of the text in `parts`
    skipping: _Overlong | None = None  # a line too long to read, dropped up to its end
    for text in texts():
        if skipping is not None:
            nl = text.find("\n")
            if nl < 0:
                skipping.length += len(text)
                continue
            skipping.length += nl
            yield skipping
            skipping, text = None, text[nl + 1:]
        cut = text.rfind("\n") + 1
        if cut and not has_cr and size + (nl := text.find("\n")) > _MAX_FIELD and "\r" not in text[:nl]:
            yield _Overlong(("".join(parts) + text[:1000])[:1000], size + nl)  # the line in progress ends here
            parts, size, text, cut = [], 0, text[nl + 1:], cut - nl - 1
        if cut == 0:
            parts.append(text)
            size, has_cr = size + len(text), has_cr or "\r" in text
            if size > _MAX_FIELD and not has_cr:
                skipping = _Overlong("".join(parts)[:1000], size)
                parts, size = [], 0
            continue
        parts.append(text[:cut])
        yield "".join(parts)
        parts = [text[cut:]]
        size, has_cr = len(parts[0]), "\r" in parts[0]
    if skipping is not None:
        yield skipping
    elif last := "".join(parts):
        yield last


def _plain_lines(block: str) -> list[str] | None:
    """The lines of a block csv would read as plain `split(delimiter)` records, else None.

    Plain: no quote character, no bare CR (`\r\n` endings are fine: csv drops them, and the
    stream counts them as one line), and short enough that csv's field limit cannot apply.
    """
    if '"' in block or len(block) > _MAX_FIELD:
        return None
    if "\r" in block:
        if block.count("\r") != block.count("\r\n"):
            return None
        block = block.replace("\r\n", "\n")
    lines = block.split("\n")
    if block.endswith("\n"):
        lines.pop()
    return lines


class _RowReader:
    """Turns a stream's blocks into rows: `_Run`s for already-normalized cells, else tuples.

    Plain blocks are split with str methods; blocks with quotes or bare CRs go through
    csv.reader (a quoted record that crosses a block boundary pulls in the next block). Either
    way the cells are checked in bulk with `_NORMALIZED_LINES`, and only the others one by one
    (`_FOLDABLE_LINE`, else `normalize_address`).
    """

    def __init__(self, shape: CsvShape, skip_through: int) -> None:
        self.shape = shape
        self.skip_through = skip_through
        self.header_pending = shape.has_header
        self.line = 1  # the physical line the next block starts at

    def pieces(self, blocks: Iterator[str | _Overlong]) -> Iterator[list[_Run | tuple]]:
        for block in blocks:
            if isinstance(block, _Overlong):
                yield [r] if (r := self.overlong(block)) is not None else []
                continue
            lines = _plain_lines(block)
            if lines is not None:
                numbers = range(self.line, self.line + len(lines))
                self.line += len(lines)
                yield list(self._plain(numbers, lines, self.shape.delimiter in block))
            else:
                yield list(self._quoted(block, blocks))

    def row(self, start: int, record: list[str]) -> tuple | HeaderRow | None:
        """One record as (line, raw cell, address or None, reason or None); None if not a row."""
        if not record or (len(record) == 1 and not record[0].strip()):
            return None  # blank line: not a row
        if self.header_pending:
            self.header_pending = False
            return HeaderRow(start, [c.replace("\x00", "\ufffd") for c in record], self.shape.column)
        if start <= self.skip_through:
            return None
        column = self.shape.column
        if column >= len(record):
            cell = self.shape.delimiter.join(record).replace("\x00", "\ufffd")
            return start, cell, None, f"no value in column {column + 1}"
        cell = record[column]
        if "\x00" in cell:  # Postgres text cannot hold NUL; keep the row, report it
            return start, cell.replace("\x00", "\ufffd"), None, "contains a NUL byte"
        email, reason = normalize_address(cell)
        return start, cell, email, reason

    def overlong(self, block: _Overlong) -> tuple | None:
        """A line too long to read: one invalid row (the header, if it was due, is not looked for)."""
        start = self.line
        self.line += 1
        self.header_pending = False
        if start <= self.skip_through:
            return None
        return (start, block.head.replace("\x00", "\ufffd"), None,
                f"line longer than {_MAX_FIELD // 2**20} MiB ({block.length:,} characters): not read")

    def _plain(self, numbers: range, lines: list[str], delimited: bool) -> Iterator[_Run | tuple]:
        delimiter, column = self.shape.delimiter, self.shape.column
        if not delimited:
            cells = lines if column == 0 else [""] * len(lines)
        elif column == 0:
            cells = [line.partition(delimiter)[0] for line in lines]
        else:
            fields = (line.split(delimiter, column + 1) for line in lines)
            cells = [f[column] if len(f) > column else "" for f in fields]
        # "" is never a normalized address: those lines get their real record in `row`.
        yield from self._checked(numbers, cells, lambda i: lines[i].split(delimiter))

    def _quoted(self, block: str, blocks: Iterator[str]) -> Iterator[_Run | tuple]:
        starts: list[int] = []
        cells: list[str] = []
        records: list[list[str]] = []
        in_record = False
        column = self.shape.column

        def lines() -> Iterator[str]:
            nonlocal in_record
            source = io.StringIO(block, newline="")
            while True:
                for text in source:
                    in_record = True
                    yield text
                if not in_record:
                    return  # the block ends between records
                following = next(blocks, None)  # a quoted field goes on in the next block
                if following is None:
                    return
                if isinstance(following, _Overlong):
                    raise UnreadableInput(f"cannot read the row that starts on line {line}: its quoted field runs"
                                          f" into a line longer than {_MAX_FIELD // 2**20} MiB (is a quote"
                                          " left open?)")
                source = io.StringIO(following, newline="")

        reader = csv.reader(lines(), delimiter=self.shape.delimiter)
        base = line = self.line
        try:
            for record in reader:
                start, line = line, base + reader.line_num
                in_record = False
                starts.append(start)
                records.append(record)
                # A record over several lines has a CR or LF in a cell: never a normalized address.
                plain = line == start + 1 and column < len(record)
                cells.append(record[column] if plain else "")
        except csv.Error as exc:  # a quoted field over csv's limit, spread over many lines
            raise UnreadableInput(f"cannot read the row that starts on line {line}: {exc} (a quoted field longer"
                                  f" than {_MAX_FIELD // 2**20} MiB; is a quote left open?)") from None
        self.line = base + reader.line_num
        yield from self._checked(starts, cells, records.__getitem__)

    def _checked(self, numbers: Sequence[int], cells: list[str], record: Callable[[int], list[str]]
                 ) -> Iterator[_Run | tuple]:
        """Runs of already-normalized cells, and every other row checked on its own."""
        i, n = 0, len(cells)
        while self.header_pending and i < n:
            if (r := self.row(numbers[i], record(i))) is not None:
                yield r
            i += 1
        i = max(i, bisect.bisect_right(numbers, self.skip_through))  # committed before a resume
        text = "\n".join(cells[i:]) + "\n"
        pos = 0
        while i < n:
            end = _NORMALIZED_LINES.match(text, pos).end()
            if end > pos:
                k = text.count("\n", pos, end)
                yield _Run(numbers[i:i + k], cells[i:i + k])
                i, pos = i + k, end
            if i < n:
                if _FOLDABLE_LINE.match(text, pos):
                    local, _, domain = cells[i].partition("@")
                    yield numbers[i], cells[i], f"{local}@{domain.lower()}", None
                elif (r := self.row(numbers[i], record(i))) is not None:
                    yield r
                i, pos = i + 1, text.index("\n", pos) + 1


# Byte-order marks of the encodings read by transcoding to UTF-8 (UTF-32's first: it starts like UTF-16's).
_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
              (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def as_utf8(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """`chunks` of text in `encoding` (a name Python's codecs know) as UTF-8; bytes the encoding
    cannot decode become U+FFFD, so their row is reported invalid, never dropped."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
    try:
        for data in chunks:
            yield decoder.decode(data).encode()
        yield decoder.decode(b"", final=True).encode()
    except UnicodeError as exc:  # a few codecs refuse some input even so (utf-16 without a BOM, punycode)
        raise UnreadableInput(f"cannot read the list as {encoding}: {exc}") from None


def _pieces(uri: str | Path | Iterable[bytes], column: str | None, skip_through: int, name: str = "the upload",
            gunzip: bool = True) -> Iterator[list[_Run | tuple]]:
    with open_source(uri, name, gunzip) as (head, raw):
        # A file with a UTF-16 or UTF-32 byte-order mark (Excel's "Unicode Text" export is UTF-16)
        # is read as the UTF-8 it stands for; anything else as UTF-8, whose BOM is dropped.
        encoding = next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)
        if encoding is not None:
            sample = codecs.decode(head, encoding, errors="replace")
            raw = _Prefixed(b"", as_utf8(iter(functools.partial(raw.read, _BLOCK_BYTES), b""), encoding))
        else:
            sample = codecs.decode(head, "utf-8-sig", errors="replace")
        shape = detect_shape(sample, column)
        yield from _RowReader(shape, skip_through).pieces(_text_blocks(raw))


def iter_rows(uri: str | Path | Iterable[bytes], column: str | None = None, skip_through: int = 0,
              with_header: bool = False, gunzip: bool = True) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Yield (line number, raw cell, normalized address or None, reason or None) for every row.

    `skip_through`: rows starting at or before this line are parsed but not checked or yielded
    (a resumed ingest skips what the database already holds). `with_header`: the line taken as
    the header is yielded too, as a `HeaderRow` (`copy_rows` reports it). `gunzip`: see `open_source`.
    """
    for pieces in _pieces(uri, column, skip_through, gunzip=gunzip):
        for piece in pieces:
            if isinstance(piece, _Run):
                for line, cell in zip(piece.lines, piece.cells):
                    yield line, cell, cell, None
            elif not isinstance(piece, HeaderRow) or with_header:
                yield piece


class _ItemWriter:
    """Formats `items` rows as COPY text and writes them in blocks (see `db.copy_text`)."""

    BLOCK = 4096

    def __init__(self, copy, user_batch_id: int, stats: IngestStats) -> None:
        self.copy = copy
        self.prefix = f"{user_batch_id}\t"
        self.stats = stats
        self.lines: list[str] = []

    def add(self, row: tuple) -> None:
        row_no, cell, email, reason = row
        stats = self.stats
        stats.rows += 1
        raw = copy_text(cell[:1000])
        if email is None:
            stats.invalid += 1
            if len(stats.invalid_rows) < INVALID_ROWS_KEPT:
                stats.invalid_rows.append({"row": row_no, "reason": reason or ""})
            self.lines.append(f"{self.prefix}{row_no}\t{raw}\t\\N\tinvalid\t{copy_text(reason or '')}\n")
        else:
            stats.pending += 1
            self.lines.append(f"{self.prefix}{row_no}\t{raw}\t{copy_text(email)}\tpending\t\\N\n")
        if len(self.lines) >= self.BLOCK:
            self.flush()

    def add_run(self, run: _Run) -> None:
        """A run's cells need no escaping: `_NORMALIZED_LINES` admits no tab, backslash or newline."""
        prefix = self.prefix
        self.flush()
        self.copy.write("".join([f"{prefix}{n}\t{c}\t{c}\tpending\t\\N\n" for n, c in zip(run.lines, run.cells)]))
        self.stats.rows += len(run.cells)
        self.stats.pending += len(run.cells)

    def add_piece(self, piece: _Run | HeaderRow | tuple) -> None:
        if isinstance(piece, _Run):
            self.add_run(piece)
        elif isinstance(piece, HeaderRow):
            self.stats.header = piece.report()
        else:
            self.add(piece)

    def flush(self) -> None:
        if self.lines:
            self.copy.write("".join(self.lines))
            self.lines.clear()


_COPY_ITEMS = "copy items (user_batch_id, row_no, raw, email, state, reason) from stdin"
_SEND_BUFFER = 4 * 1024 * 1024


def _copy_in(cur: psycopg.Cursor) -> contextlib.AbstractContextManager[psycopg.Copy]:
    """COPY into `items`, each write pushed into the socket before parsing goes on.

    Postgres parses the COPY in its own process, on the other core, but only what has reached
    its socket: with psycopg's default writer (flush every 1 MiB) 228 KiB were queued when a
    write returned, ~5 ms of Postgres work against ~20 ms to parse the next block. Flushing each
    write into a 4 MiB send buffer left ~2 MiB queued (measured; bench/RESULTS.md, "ingest").
    """
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=cur.connection.pgconn.socket)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        finally:
            sock.detach()  # the connection keeps its descriptor
    return cur.copy(_COPY_ITEMS, writer=LibpqWriter(cur, flush_threshold=0))


def copy_items(
    conn: psycopg.Connection,
    user_batch_id: int,
    path: str | Path | Iterable[bytes],
    column: str | None = None,
    on_progress: Callable[[IngestStats], None] | None = None,
    name: str = "the upload",
) -> IngestStats:
    """Stream the file (or byte chunks, named `name` in messages) into `items` with COPY inside
    the caller's transaction; gzip data is decompressed on the way (`open_source`).

    Works a block at a time (see `_RowReader`): runs of already-normalized cells are formatted
    in one comprehension, other rows one by one. Postgres parses the COPY in its own process
    while the next block is read here.
    """
    return _copy_blocks(conn, user_batch_id, _pieces(path, column, 0, name), on_progress)


def copy_rows(
    conn: psycopg.Connection,
    user_batch_id: int,
    rows: Iterable[tuple[int, str, str | None, str | None]],
    on_progress: Callable[[IngestStats], None] | None = None,
) -> IngestStats:
    """COPY already-parsed rows (line, raw cell, address or None, reason or None) into `items`."""
    rows = iter(rows)
    blocks = iter(lambda: list(itertools.islice(rows, _ItemWriter.BLOCK)), [])
    return _copy_blocks(conn, user_batch_id, blocks, on_progress)


def _copy_blocks(
    conn: psycopg.Connection,
    user_batch_id: int,
    blocks: Iterable[Iterable],
    on_progress: Callable[[IngestStats], None] | None,
) -> IngestStats:
    """COPY blocks of pieces (runs or single rows, see `_ItemWriter.add_piece`) into `items`;
    `on_progress` after each block that crosses a multiple of 50,000 rows, and at the end."""
    stats = IngestStats()
    with conn.cursor() as cur, _copy_in(cur) as copy:
        writer = _ItemWriter(copy, user_batch_id, stats)
        for pieces in blocks:
            before = stats.rows
            for piece in pieces:
                writer.add_piece(piece)
            if on_progress is not None and stats.rows // 50_000 != before // 50_000:
                on_progress(stats)
        writer.flush()
    if on_progress is not None:
        on_progress(stats)
    return stats


class BatchEnded(Exception):
    """The user batch being read was cancelled (or deleted) meanwhile."""


def _stop_if_ended(cur: psycopg.Cursor, user_batch_id: int) -> None:
    """A cancel commits at once while an ingest runs in its thread: no chunk may add pending rows
    to a finished batch. The share lock orders each chunk against the cancel's update."""
    row = cur.execute("select state from user_batches where id = %s for share", (user_batch_id,)).fetchone()
    if row is None or row[0] in FINISHED_STATES:
        raise BatchEnded(f"user batch {user_batch_id} is {row[0] if row else 'gone'}: its list is not read further")


def copy_items_resumable(
    database_url: str,
    user_batch_id: int,
    uri: str,
    column: str | None,
    chunk_rows: int,
    on_chunk: Callable[[int, IngestStats], None],
) -> IngestStats:
    """Stream a source into `items` in committed chunks; safe to re-run after a crash.

    The database is the truth: rows up to the last committed line are skipped, so a re-run
    neither loses nor duplicates a row. `on_chunk(last_line, stats)` follows each commit.
    Returns the counts over the whole source (committed before and now).
    """
    with psycopg.connect(database_url, autocommit=True) as conn:  # each chunk commits on its own
        (done_through,) = conn.execute(
            "select coalesce(max(row_no), 0) from items where user_batch_id = %s", (user_batch_id,)
        ).fetchone()
        stats = IngestStats()
        pieces = itertools.chain.from_iterable(_pieces(uri, column, done_through))
        carry: _Run | tuple | None = None
        while True:
            last_line, room = 0, chunk_rows
            with conn.transaction(), conn.cursor() as cur:
                _stop_if_ended(cur, user_batch_id)
                with _copy_in(cur) as copy:
                    writer = _ItemWriter(copy, user_batch_id, stats)
                    while room:
                        piece, carry = carry if carry is not None else next(pieces, None), None
                        if piece is None:
                            break
                        if isinstance(piece, HeaderRow):
                            writer.add_piece(piece)
                            continue
                        if isinstance(piece, _Run):
                            if len(piece.cells) > room:  # a chunk ends inside the run
                                piece, carry = piece.split(room)
                            room -= len(piece.cells)
                            last_line = piece.lines[-1]
                        else:
                            room -= 1
                            last_line = piece[0]
                        writer.add_piece(piece)
                    writer.flush()
            if last_line == 0:
                break
            on_chunk(last_line, stats)
        total = conn.execute(
            "select count(*), count(*) filter (where state = 'invalid') from items where user_batch_id = %s",
            (user_batch_id,),
        ).fetchone()
    return IngestStats(rows=total[0], pending=total[0] - total[1], invalid=total[1])


class IngestActivities:
    """The ingest activity of SDK submissions: the worker streams the source itself."""

    def __init__(self, database_url: str, chunk_rows: int) -> None:
        self.database_url = database_url
        self.chunk_rows = chunk_rows

    @activity.defn
    def ingest_source(self, request: IngestRequest) -> IngestOutcome:
        """Stream `request.uri` into `items` in committed chunks, heartbeating the last line.

        A sync activity (run in the worker's thread pool): parsing is CPU work. After a crash
        the retry skips what was committed, so rows in = rows out. Unreadable sources fail
        without retry, naming the source and the problem.
        """
        details = activity.info().heartbeat_details
        resumed = int(details[0]) if details else 0

        def on_chunk(last_line: int, stats: IngestStats) -> None:
            activity.heartbeat(last_line, stats.rows)

        try:
            stats = copy_items_resumable(
                self.database_url, request.user_batch_id, request.uri, request.column, self.chunk_rows, on_chunk
            )
        except UnreadableInput as exc:
            raise ApplicationError(str(exc), type="UnreadableInput", non_retryable=True) from None
        except BatchEnded as exc:
            raise ApplicationError(str(exc), type="BatchEnded", non_retryable=True) from None
        except SourceUnavailable as exc:
            # Retried (the next attempt resumes after the last committed chunk) until SOURCE_ATTEMPTS.
            attempt = activity.info().attempt
            if attempt >= SOURCE_ATTEMPTS:
                raise ApplicationError(f"{exc} (gave up after {attempt} attempts)", type="SourceUnavailable",
                                       non_retryable=True) from None
            delay = timedelta(seconds=exc.retry_after_s) if exc.retry_after_s is not None else None
            raise ApplicationError(str(exc), type="SourceUnavailable", next_retry_delay=delay) from None
        if stats.rows == 0:  # as `submit` and the HTTP API refuse such a list
            raise ApplicationError(f"{shown_uri(request.uri)} has no rows (empty, or a header only): nothing to verify",
                                   type="UnreadableInput", non_retryable=True)
        with psycopg.connect(self.database_url) as conn:
            conn.execute("update user_batches set rows_total = %s, invalid = %s where id = %s",
                         (stats.rows, stats.invalid, request.user_batch_id))
        return IngestOutcome(rows=stats.rows, invalid=stats.invalid, resumed_after_line=resumed)

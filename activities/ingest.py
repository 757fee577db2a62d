"""Reading submitted lists: detect the CSV shape, normalize and syntax-check each address, COPY rows.

Every input row becomes exactly one `items` row: `pending` with its normalized address, or
`invalid` with a reason a person understands. Nothing is dropped; invalid rows never reach the API.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from temporalio import activity
from temporalio.exceptions import ApplicationError

from db import copy_text
from workflows.models import IngestOutcome, IngestRequest

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


@dataclass
class IngestStats:
    rows: int = 0
    pending: int = 0
    invalid: int = 0
    bytes_read: int = 0


@dataclass
class CsvShape:
    delimiter: str
    has_header: bool
    column: int


def detect_shape(sample: str, column: str | None) -> CsvShape:
    """Guess delimiter, header and the email column from the first lines of the file."""
    lines = [ln for ln in sample.splitlines() if ln.strip()][:20]
    if not lines:
        return CsvShape(",", False, 0)
    first = lines[0]
    counts = {d: first.count(d) for d in (",", ";", "\t", "|")}
    delimiter = max(counts, key=lambda d: counts[d]) if any(counts.values()) else ","
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    header = [c.strip().lower().lstrip("\ufeff") for c in rows[0]]
    if column is not None:
        if column.isdigit():
            return CsvShape(delimiter, "@" not in first, int(column) - 1 if int(column) > 0 else 0)
        if column.lower() not in header:
            raise UnreadableInput(f"column {column!r} not found in the header: {', '.join(rows[0])}")
        return CsvShape(delimiter, True, header.index(column.lower()))
    mailish = [i for i, name in enumerate(header) if name in EMAIL_HEADERS or "mail" in name]
    # A first row without `@` is a header only if it looks like one; a lone bad address on the
    # first line of a plain list stays a row (reported invalid, never silently skipped).
    has_header = not any("@" in c for c in rows[0]) and (bool(mailish) or len(rows[0]) > 1)
    data = rows[1:] if has_header else rows
    with_at = [i for i in range(max(map(len, data), default=0)) if any(i < len(r) and "@" in r[i] for r in data)]
    if has_header:
        for name in EMAIL_HEADERS:  # an exact email header wins
            if name in header:
                return CsvShape(delimiter, True, header.index(name))
        for i in mailish:  # "Work Email" over "Mailing Street": the one whose data has addresses
            if i in with_at:
                return CsvShape(delimiter, True, i)
    if with_at:
        return CsvShape(delimiter, has_header, with_at[0])
    return CsvShape(delimiter, has_header, mailish[0] if mailish else 0)


def _text_stream(raw: io.BufferedIOBase) -> io.TextIOBase:
    # utf-8-sig drops a BOM; undecodable bytes become U+FFFD and the row is reported invalid.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")


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


def _head_and_stream(chunks: Iterator[bytes]) -> tuple[bytes, io.RawIOBase]:
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= 64 * 1024:
            break
    return head[: 64 * 1024], _Prefixed(head, chunks)


@contextlib.contextmanager
def open_source(uri: str | Path | Iterable[bytes]) -> Iterator[tuple[bytes, io.RawIOBase]]:
    """(first 64 KiB, a byte stream from the start) for a file path, an http(s) URL, or the
    byte chunks of an upload (the HTTP API streams request bodies through here)."""
    if not isinstance(uri, (str, Path)):
        yield _head_and_stream(iter(uri))
        return
    text = str(uri)
    if text.startswith(("http://", "https://")):
        try:
            with httpx.stream("GET", text, timeout=60.0, follow_redirects=True) as resp:
                if resp.status_code != 200:
                    raise UnreadableInput(f"cannot read {text}: HTTP {resp.status_code}")
                yield _head_and_stream(resp.iter_bytes(256 * 1024))
        except httpx.HTTPError as exc:
            raise UnreadableInput(f"cannot read {text}: {exc}") from exc
        return
    path = Path(text.removeprefix("file://"))
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UnreadableInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    with raw:
        head = raw.read(64 * 1024)
        raw.seek(0)
        yield head, raw


def iter_rows(uri: str | Path | Iterable[bytes], column: str | None = None, skip_through: int = 0
              ) -> Iterator[tuple[int, str, str | None, str | None]]:
    """Yield (line number, raw cell, normalized address or None, reason or None) for every row.

    `skip_through`: rows starting at or before this line are parsed but not checked or yielded
    (a resumed ingest skips what the database already holds).
    """
    with open_source(uri) as (head, raw):
        shape = detect_shape(codecs.decode(head, "utf-8-sig", errors="replace"), column)
        reader = csv.reader(_text_stream(raw), delimiter=shape.delimiter)
        line = 1
        header_pending = shape.has_header
        for record in reader:
            start, line = line, reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line: not a row
            if header_pending:
                header_pending = False
                continue
            if start <= skip_through:
                continue
            if shape.column >= len(record):
                cell = shape.delimiter.join(record).replace("\x00", "\ufffd")
                yield start, cell, None, f"no value in column {shape.column + 1}"
                continue
            cell = record[shape.column]
            if "\x00" in cell:  # Postgres text cannot hold NUL; keep the row, report it
                yield start, cell.replace("\x00", "\ufffd"), None, "contains a NUL byte"
                continue
            email, reason = normalize_address(cell)
            yield start, cell, email, reason


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
            self.lines.append(f"{self.prefix}{row_no}\t{raw}\t\\N\tinvalid\t{copy_text(reason or '')}\n")
        else:
            stats.pending += 1
            self.lines.append(f"{self.prefix}{row_no}\t{raw}\t{copy_text(email)}\tpending\t\\N\n")
        if len(self.lines) >= self.BLOCK:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.copy.write("".join(self.lines))
            self.lines.clear()


_COPY_ITEMS = "copy items (user_batch_id, row_no, raw, email, state, reason) from stdin"


def copy_items(
    conn: psycopg.Connection,
    user_batch_id: int,
    path: str | Path | Iterable[bytes],
    column: str | None = None,
    on_progress: Callable[[IngestStats], None] | None = None,
) -> IngestStats:
    """Stream the file (or upload chunks) into `items` with COPY inside the caller's transaction."""
    return copy_rows(conn, user_batch_id, iter_rows(path, column), on_progress)


def copy_rows(
    conn: psycopg.Connection,
    user_batch_id: int,
    rows: Iterable[tuple[int, str, str | None, str | None]],
    on_progress: Callable[[IngestStats], None] | None = None,
) -> IngestStats:
    """COPY already-parsed rows (line, raw cell, address or None, reason or None) into `items`."""
    stats = IngestStats()
    with conn.cursor() as cur:
        with cur.copy(_COPY_ITEMS) as copy:
            writer = _ItemWriter(copy, user_batch_id, stats)
            for row in rows:
                writer.add(row)
                if on_progress is not None and stats.rows % 50_000 == 0:
                    on_progress(stats)
            writer.flush()
    if on_progress is not None:
        on_progress(stats)
    return stats


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
        rows = iter_rows(uri, column, skip_through=done_through)
        while True:
            last_line = 0
            with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY_ITEMS) as copy:
                writer = _ItemWriter(copy, user_batch_id, stats)
                for n, row in enumerate(rows, 1):
                    writer.add(row)
                    last_line = row[0]
                    if n == chunk_rows:
                        break
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

    def __init__(self, database_url: str, chunk_rows: int = 50_000) -> None:
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
        with psycopg.connect(self.database_url) as conn:
            conn.execute("update user_batches set rows_total = %s where id = %s", (stats.rows, request.user_batch_id))
        return IngestOutcome(rows=stats.rows, invalid=stats.invalid, resumed_after_line=resumed)

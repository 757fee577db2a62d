"""Reading submitted lists: address normalization, CSV shape detection, line numbers, COPY into `items`.

Files are written byte for byte into tmp_path; `copy_items` runs against a fresh migrated
embedded-Postgres database. Rows in = rows out: every non-blank row is exactly one `items` row.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import os
import random
import re
import string
import threading
from pathlib import Path

import psycopg
import pytest
from email_validator import EmailNotValidError, validate_email

from activities import ingest
from activities.ingest import (
    UnreadableInput,
    copy_items,
    copy_items_resumable,
    detect_shape,
    iter_rows,
    normalize_address,
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows(path: Path, column: str | None = None) -> list[tuple[int, str, str | None, str | None]]:
    return list(iter_rows(path, column))


# ---- normalize_address ----------------------------------------------------------------------

VALID = [
    ("john@example.com", "john@example.com"),
    ("  john@example.com \t", "john@example.com"),  # surrounding whitespace trimmed
    ("John.Doe@Example.COM", "John.Doe@example.com"),  # domain lowered, local part keeps its case
    ("a@b.com.", "a@b.com"),  # trailing dot of the domain dropped
    ("mailto:A@B.com", "A@b.com"),
    ("MAILTO: a@b.com", "a@b.com"),
    ("Mailto:a@B.Com.", "a@b.com"),
    ("user@bücher.de", "user@xn--bcher-kva.de"),  # IDN domain -> punycode
    ("user@BÜCHER.de", "user@xn--bcher-kva.de"),
    ("José@Bücher.DE", "José@xn--bcher-kva.de"),  # internationalized local part kept (SMTPUTF8)
    ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
    ("o'brien@example.ie", "o'brien@example.ie"),
    ("!#$%&'*+/=?^_`{|}~-@example.com", "!#$%&'*+/=?^_`{|}~-@example.com"),
    ("x@a-b.c", "x@a-b.c"),
    ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),  # local part at the limit
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_normalize_accepts_and_normalizes(raw, expected):
    assert normalize_address(raw) == (expected, None)


def _long_address(total: int) -> str:
    """An ASCII address of exactly `total` characters: 60-char local part, labels of at most 63."""
    local, tld = "a" * 60, "com"
    room = total - len(local) - 1 - len(tld)  # each label takes len + 1 (its dot)
    labels = []
    while room > 0:
        n = min(63, room - 1)
        if room - (n + 1) == 1:  # never leave room for an empty label
            n -= 1
        labels.append("b" * n)
        room -= n + 1
    address = f"{local}@{'.'.join(labels)}.{tld}"
    assert len(address) == total
    return address


INVALID = [
    ("", "empty address"),
    ("   ", "empty address"),
    ("mailto:", "empty address"),
    ("john.example.com", "missing @"),
    ("@example.com", "empty local part"),
    ("john@", "empty domain"),
    ("john@.", "empty domain"),
    ("jo..hn@example.com", "two periods"),
    (".john@example.com", "start with a period"),
    ("john.@example.com", "period"),
    ("john@example..com", "two periods"),
    ("john@.example.com", "period"),
    ("a" * 65 + "@example.com", "local part longer than 64"),
    ("john doe@example.com", "SPACE"),
    ("john@exa mple.com", "invalid characters"),
    ('"john doe"@example.com', "Quoting"),
    ('"john"@example.com', "Quoting"),
    ("john@localhost", "period"),
    ("john@-example.com", "hyphen"),
    ("john@example-.com", "hyphen"),
    ("john@exa_mple.com", "invalid characters"),
    ("john@" + "b" * 64 + ".com", "so many characters"),
    ("a@b@example.com", "invalid characters"),
    ("John Doe <john@example.com>", None),
    ("john@1.2.3.4", "top-level domain"),
    ("x@\ufffd.com", "not valid UTF-8"),
]


@pytest.mark.parametrize(("raw", "reason_part"), INVALID)
def test_normalize_rejects_with_a_reason(raw, reason_part):
    email, reason = normalize_address(raw)
    assert email is None
    assert reason  # a reason a person can read
    if reason_part is not None:
        assert reason_part in reason, reason


@pytest.mark.parametrize("total", [255, 260, 300])
def test_normalize_rejects_addresses_longer_than_254(total):
    address = _long_address(total)
    assert len(address) >= 255
    email, reason = normalize_address(address)
    assert email is None
    assert "254" in reason or "too long" in reason


def test_normalize_accepts_an_address_of_exactly_254():
    address = _long_address(254)
    assert len(address) == 254
    assert normalize_address(address) == (address, None)


# ---- agreement with email-validator (the reference) -----------------------------------------

_SPECIALS = "!#$%&'*+/=?^_`{|}~-"
_BAD_LOCAL_CHARS = ' "(),:;<>[\\]'


def _word(rng: random.Random, alphabet: str, lo: int = 1, hi: int = 10) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _local(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    kind = rng.randrange(10)
    if kind <= 3:
        return _word(rng, alnum)
    if kind == 4:
        return ".".join(_word(rng, alnum, 1, 6) for _ in range(rng.randint(2, 3)))
    if kind == 5:
        return _word(rng, alnum, 1, 4) + rng.choice(_SPECIALS) + _word(rng, alnum, 0, 4)
    if kind == 6:  # dots in the wrong places
        w = _word(rng, alnum, 1, 5)
        return rng.choice([f".{w}", f"{w}.", f"{w}..{w}"])
    if kind == 7:  # characters a dot-atom does not allow
        w = _word(rng, alnum, 1, 5)
        return w + rng.choice(_BAD_LOCAL_CHARS) + w
    if kind == 8:
        return "x" * rng.choice([63, 64, 65, 70])
    return _word(rng, alnum + _SPECIALS + ".", 1, 12)


def _label(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    kind = rng.randrange(8)
    if kind <= 3:
        return _word(rng, alnum, 1, 12)
    if kind == 4:  # single hyphens inside (never two in a row: that is a known gap, below)
        return _word(rng, alnum, 1, 4) + "-" + _word(rng, alnum, 1, 4)
    if kind == 5:  # hyphen at an end, underscore, empty label
        w = _word(rng, alnum, 1, 5)
        return rng.choice([f"-{w}", f"{w}-", f"{w}_{w}", ""])
    if kind == 6:
        return "d" * rng.choice([62, 63, 64])
    return _word(rng, string.digits, 1, 3)


_GOOD_TLDS = ["com", "org", "net", "io", "de", "museum", "c", "co.uk", "example"]
_BAD_TLDS = ["123", "-com", "com-", "4b"]
# Once accepted by the fast path, refused by email-validator: the fast path must refuse them too.
_GAP_TLDS = ["test", "local", "localhost", "invalid", "onion", "arpa", "c1", "com2"]
_GAP_LABELS = ["ab--cd", "xn--abc", "xn--zz"]


def _domain(rng: random.Random, gaps: bool) -> str:
    labels = [_label(rng) for _ in range(rng.randint(1, 3))]
    if gaps and rng.random() < 0.5:
        if rng.random() < 0.5:
            return ".".join(labels + [rng.choice(_GAP_TLDS)])
        return ".".join([rng.choice(_GAP_LABELS)] + labels + [rng.choice(_GOOD_TLDS)])
    if rng.random() < 0.05:
        return _word(rng, string.ascii_letters, 1, 8)  # no dot at all
    tld = rng.choice(_GOOD_TLDS + _BAD_TLDS if rng.random() < 0.8 else _BAD_TLDS)
    return ".".join(labels + [tld])


def corpus(seed: int, n: int, gaps: bool) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        address = f"{_local(rng)}@{_domain(rng, gaps)}"
        if rng.random() < 0.05:
            address = address.replace("@", "@" + "e" * 60 + "." + "f" * 60 + "." + "g" * 60 + ".", 1)
        if rng.random() < 0.15:  # upper-case domains: normalized by both
            local, _, domain = address.rpartition("@")
            address = f"{local}@{domain.upper()}"
        out.append(address)
    return out


def _reference(address: str) -> str | None:
    # strict=True: the RFC 5321 limit of 64 characters before the @ (our normalizer enforces it on purpose).
    try:
        v = validate_email(address, check_deliverability=False, strict=True)
    except EmailNotValidError:
        return None
    return f"{v.local_part}@{v.ascii_domain}"


def _disagreements(addresses: list[str]) -> list[tuple[str, str | None, str | None]]:
    found = []
    for address in addresses:
        ours, _reason = normalize_address(address)
        ref = _reference(address)
        if ours != ref:
            found.append((address, ours, ref))
    return found


def test_corpus_is_mixed():
    addresses = corpus(7, 220, gaps=False)
    judged = [_reference(a) is not None for a in addresses]
    assert 60 <= sum(judged) <= 160, sum(judged)  # both valid and invalid forms are well represented


def test_fast_path_agrees_with_email_validator_on_ordinary_ascii_addresses():
    """Never accept what email-validator rejects (and never reject or re-shape what it accepts)."""
    addresses = corpus(7, 220, gaps=False)
    assert len(addresses) == 220
    assert _disagreements(addresses) == []


@pytest.mark.parametrize(
    "address", ["a@b.test", "a@b.local", "a@host.localhost", "a@b.invalid", "a@b.onion", "a@b.arpa", "a@B.TEST"]
)
def test_special_use_domains_are_refused_like_email_validator_does(address):
    assert _reference(address) is None
    email, reason = normalize_address(address)
    assert email is None and "special-use" in reason


def test_local_part_limit_also_holds_for_internationalized_local_parts():
    email, reason = normalize_address("ü" + "x" * 70 + "@example.de")
    assert email is None and "64" in reason




def test_fast_path_agrees_with_email_validator_including_reserved_and_odd_domains():
    addresses = corpus(11, 220, gaps=True)
    assert _disagreements(addresses) == []


@pytest.mark.parametrize("address", ["a@b.c1", "a@b.com2", "a@ab--cd.com", "a@xn--abc.com", "a@x.xn--zz"])
def test_fast_path_rejects_what_email_validator_rejects(address):
    assert _reference(address) is None
    assert normalize_address(address)[0] is None


# ---- CSV shape, line numbers ---------------------------------------------------------------


def test_header_detected_by_name_among_other_columns(tmp_path):
    p = write(tmp_path, "a.csv", b"first_name,E-Mail,company\nAnn,ann@x.com,X\nBob,bob@y.com,Y\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None), (3, "bob@y.com", "bob@y.com", None)]


def test_header_detected_by_email_substring(tmp_path):
    p = write(tmp_path, "a.csv", b"name,Work Email\nAnn,ann@x.com\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None)]


def test_email_column_found_by_at_sign_in_data_when_header_names_nothing(tmp_path):
    p = write(tmp_path, "a.csv", b"id,contact,city\n1,ann@x.com,Paris\n2,bob@y.com,Rome\n")
    assert [r[1] for r in rows(p)] == ["ann@x.com", "bob@y.com"]


def test_mailing_address_column_is_not_mistaken_for_the_email_column(tmp_path):
    p = write(tmp_path, "a.csv", b"name,mailing_street,contact\nAnn,1 Main St,ann@x.com\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None)]


def test_no_header(tmp_path):
    p = write(tmp_path, "a.csv", b"ann@x.com,Ann\nnot-an-address,Bob\ncid@z.com,Cid\n")
    assert rows(p) == [
        (1, "ann@x.com", "ann@x.com", None),
        (2, "not-an-address", None, "missing @"),
        (3, "cid@z.com", "cid@z.com", None),
    ]


def test_no_header_email_in_second_column(tmp_path):
    p = write(tmp_path, "a.csv", b"Ann,ann@x.com\nBob,bob@y.com\n")
    assert [r[:2] for r in rows(p)] == [(1, "ann@x.com"), (2, "bob@y.com")]


@pytest.mark.parametrize(("first", "reason"), [(b"Ann,not-an-address", "missing @"), (b"Ann,", "empty address"),
                                               (b"Ann,anngmail.com", "missing @"), (b"Ann,not-an-email", "missing @")])
def test_a_first_data_row_without_an_address_is_a_row_not_a_header(tmp_path, first, reason):
    """A bad first row of a multi-column list is reported with its line, never taken for a header."""
    p = write(tmp_path, "a.csv", first + b"\nBob,bob@example.com\nCid,cid@example.com\n")
    assert [(r[0], r[2], r[3]) for r in rows(p)] == [
        (1, None, reason), (2, "bob@example.com", None), (3, "cid@example.com", None)]


@pytest.mark.parametrize("header", [b"name,email", b"Name,E-Mail", b"first_name,Work Email,company",
                                    b"name,EmailAddress", b"Name,E-mail Address", b"id,contact,city",
                                    b"name,mailing_street,contact", b"work,home", b"Email", b"contact"])
def test_a_header_is_told_by_its_names(tmp_path, header):
    width = header.count(b",") + 1
    data = header + b"\n" + b",".join([b"ann@x.com"] * width) + b"\n"
    assert [r[:3] for r in rows(write(tmp_path, "a.csv", data))] == [(2, "ann@x.com", "ann@x.com")]


def test_column_by_name_case_insensitive(tmp_path):
    p = write(tmp_path, "a.csv", b"work,home\nann@work.com,ann@home.com\n")
    assert [r[1] for r in rows(p, "HOME")] == ["ann@home.com"]
    assert [r[1] for r in rows(p, "work")] == ["ann@work.com"]


def test_column_by_number_with_and_without_header(tmp_path):
    with_header = write(tmp_path, "h.csv", b"work,home\nann@work.com,ann@home.com\n")
    assert rows(with_header, "2") == [(2, "ann@home.com", "ann@home.com", None)]
    without = write(tmp_path, "n.csv", b"ann@work.com,ann@home.com\nbob@work.com,bob@home.com\n")
    assert [r[:2] for r in rows(without, "2")] == [(1, "ann@home.com"), (2, "bob@home.com")]
    assert [r[:2] for r in rows(without, "1")] == [(1, "ann@work.com"), (2, "bob@work.com")]


def test_a_column_number_on_a_headerless_list_keeps_a_bad_first_row(tmp_path):
    p = write(tmp_path, "a.csv", b"not-an-address\na@example.com\n")
    expected = [(1, "not-an-address", None, "missing @"), (2, "a@example.com", "a@example.com", None)]
    assert rows(p) == expected
    assert rows(p, "1") == expected


@pytest.mark.parametrize("column", ["\u00b2", "\u0663", "1\u00b2", "\uff11"])
def test_a_column_of_non_ascii_digits_is_a_name_not_found(tmp_path, column):
    p = write(tmp_path, "a.csv", b"name,email\nAnn,ann@x.com\n")
    with pytest.raises(UnreadableInput, match="not found in the header"):
        rows(p, column)


def test_column_by_name_not_in_header_is_unreadable(tmp_path):
    p = write(tmp_path, "a.csv", b"name,email\nAnn,ann@x.com\n")
    with pytest.raises(UnreadableInput, match="'mobile'"):
        rows(p, "mobile")


def test_a_column_name_for_a_file_without_a_header_is_refused_without_echoing_its_addresses(tmp_path):
    """The reason travels in an activity failure through Temporal, where no address may go."""
    p = write(tmp_path, "a.csv", b"Ann,ann@x.com\nBob,bob@y.com\n")
    with pytest.raises(UnreadableInput, match="the first line is not a header") as raised:
        rows(p, "email")
    assert "@" not in str(raised.value)


@pytest.mark.parametrize("number", ["0", "3", "9"])
def test_a_column_number_that_no_row_has_is_unreadable(tmp_path, number):
    p = write(tmp_path, "a.csv", b"name,email\nAnn,ann@x.com\nBob,bob@y.com\n")
    with pytest.raises(UnreadableInput, match=f"column {number} not found: columns are numbered from 1, and the"
                                              " first lines have 2"):
        rows(p, number)


def test_column_number_beyond_the_row_makes_the_row_invalid(tmp_path):
    p = write(tmp_path, "a.csv", b"name,email\nAnn,ann@x.com\nBob\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None), (3, "Bob", None, "no value in column 2")]


@pytest.mark.parametrize("delimiter", [b";", b"\t", b"|"])
def test_other_delimiters(tmp_path, delimiter):
    data = delimiter.join([b"name", b"email", b"note"]) + b"\n" + delimiter.join([b"Ann", b"ann@x.com", b"a,b"]) + b"\n"
    p = write(tmp_path, "a.csv", data)
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None)]


def test_semicolon_without_header(tmp_path):
    p = write(tmp_path, "a.csv", b"Ann;ann@x.com\nBob;bob@y.com\n")
    assert [r[1] for r in rows(p)] == ["ann@x.com", "bob@y.com"]


@pytest.mark.parametrize(("data", "delimiter"), [
    (b'"Doe, John";john@example.com\nSmith;smith@example.com\nLee;lee@example.com\n', ";"),
    (b'"a|b, c\tx";john@example.com\n"d, e, f";smith@example.com\n', ";"),
    (b'name\temail\n"Doe, John; Jr"\tjohn@example.com\n', "\t"),
    (b'"x;y;z",john@example.com\n', ","),
])
def test_delimiters_inside_quotes_do_not_count(tmp_path, data, delimiter):
    p = write(tmp_path, "a.csv", data)
    assert detect_shape(data.decode(), None).delimiter == delimiter
    assert all(r[2] is not None for r in rows(p)), rows(p)


def test_utf8_bom_before_header(tmp_path):
    p = write(tmp_path, "a.csv", "\ufeffemail,name\nann@x.com,Ann\n".encode())
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None)]
    assert rows(p, "email") == [(2, "ann@x.com", "ann@x.com", None)]


def test_utf8_bom_without_header(tmp_path):
    p = write(tmp_path, "a.csv", "\ufeffann@x.com\nbob@y.com\n".encode())
    assert rows(p) == [(1, "ann@x.com", "ann@x.com", None), (2, "bob@y.com", "bob@y.com", None)]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_file_with_a_utf16_or_utf32_byte_order_mark_is_read_as_its_text(tmp_path, encoding):
    # Excel's "Unicode Text" export: UTF-16 (LE) with a BOM, tab-delimited, CRLF.
    text = "name\temail\r\nRenée\tann@x.com\r\nJürgen\tjürgen@bücher.de\r\nBob\tnot-an-address\r\n"
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    p = write(tmp_path, "a.txt", bom + text.encode(encoding))
    assert rows(p) == [
        (2, "ann@x.com", "ann@x.com", None),
        (3, "jürgen@bücher.de", "jürgen@xn--bcher-kva.de", None),
        (4, "not-an-address", None, "missing @"),
    ]
    assert rows(p, "2") == rows(p) == rows(p, "email")


def test_a_utf16_file_longer_than_a_read_block_gives_the_rows_of_its_utf8_twin(tmp_path):
    text = "email\n" + "".join(f"user{i}@exämple.com\n" if i % 7 == 0 else f"user{i}@x.com\n" for i in range(120_000))
    utf16 = write(tmp_path, "wide.csv", text.encode("utf-16"))
    assert utf16.stat().st_size > 2 * 1024 * 1024  # several read blocks; a character pair may straddle one
    got = rows(utf16)
    assert len(got) == 120_000
    assert got == rows(write(tmp_path, "narrow.csv", text.encode()))


def test_crlf_line_endings(tmp_path):
    p = write(tmp_path, "a.csv", b"email,name\r\nann@x.com,Ann\r\n\r\nbob@y.com,Bob\r\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None), (4, "bob@y.com", "bob@y.com", None)]


def test_bare_cr_line_endings(tmp_path):
    p = write(tmp_path, "a.csv", b"email\rann@x.com\rbob@y.com\r")
    assert [r[:2] for r in rows(p)] == [(2, "ann@x.com"), (3, "bob@y.com")]


def test_quoted_fields_with_commas_and_newlines_report_the_line_where_the_row_starts(tmp_path):
    data = (
        b"name,email,note\n"  # 1
        b'"Doe, John",john@x.com,plain\n'  # 2
        b'"Multi\nLine\nName",multi@x.com,"a, b"\n'  # 3-5
        b'Ann,ann@x.com,"note\r\nwith crlf"\n'  # 6-7
        b'Bob,"bob@y.com",x\n'  # 8
    )
    p = write(tmp_path, "a.csv", data)
    assert rows(p) == [
        (2, "john@x.com", "john@x.com", None),
        (3, "multi@x.com", "multi@x.com", None),
        (6, "ann@x.com", "ann@x.com", None),
        (8, "bob@y.com", "bob@y.com", None),
    ]


def test_blank_lines_are_skipped_not_rows_and_line_numbers_stay_physical(tmp_path):
    p = write(tmp_path, "a.csv", b"\n\nemail\n\nann@x.com\n   \n\t\nbob@y.com\n\n")
    assert rows(p) == [(5, "ann@x.com", "ann@x.com", None), (8, "bob@y.com", "bob@y.com", None)]


def test_bytes_that_are_not_utf8_make_that_row_invalid(tmp_path):
    p = write(tmp_path, "a.csv", b"email,name\nj\xe9r\xf4me@x.com,J\nann@x.com,Ann\n\xff\xfe@y.com,Z\n")
    got = rows(p)
    assert [(r[0], r[2], r[3]) for r in got] == [
        (2, None, "not valid UTF-8"),
        (3, "ann@x.com", None),
        (4, None, "not valid UTF-8"),
    ]


def test_non_utf8_bytes_in_another_column_do_not_invalidate_the_address(tmp_path):
    p = write(tmp_path, "a.csv", b"email,name\nann@x.com,Ren\xe9e\n")
    assert rows(p) == [(2, "ann@x.com", "ann@x.com", None)]


def test_a_multibyte_character_across_the_read_boundary_is_decoded(tmp_path):
    # The first 64 KiB are sampled for the shape and the stream is read in chunks: "ü" straddles byte 65536.
    head = b"email\n"
    filler = b"z" * (65535 - len(head) - 1) + b"\n"
    data = head + filler + "ü@bücher.de\n".encode() * 3
    assert data[65535:65537] == "ü".encode()
    got = rows(write(tmp_path, "a.csv", data))
    assert got[0][:1] == (2,) and got[0][3] == "missing @"
    assert [r[:3] for r in got[1:]] == [(n, "ü@bücher.de", "ü@xn--bcher-kva.de") for n in (3, 4, 5)]


def test_empty_file_has_no_rows(tmp_path):
    assert rows(write(tmp_path, "a.csv", b"")) == []


@pytest.mark.parametrize("data", [b"email\n", b"email\r\n", b"email", b"\xef\xbb\xbfemail\n", b"name,email\n\n\n"])
def test_header_only_has_no_rows(tmp_path, data):
    assert rows(write(tmp_path, "a.csv", data)) == []


def test_unreadable_path_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "missing.csv"
    with pytest.raises(UnreadableInput, match="missing.csv"):
        rows(missing)
    with pytest.raises(UnreadableInput, match=re.escape(tmp_path.name)):
        rows(tmp_path)  # a directory


def test_raw_cell_keeps_what_was_written(tmp_path):
    p = write(tmp_path, "a.csv", b"email\n  MAILTO:Ann@X.COM.  \n")
    assert rows(p) == [(2, "  MAILTO:Ann@X.COM.  ", "Ann@x.com", None)]


# ---- copy_items: rows in = rows out --------------------------------------------------------


def _copy(db_url: str, path: Path, user_batch_id: int = 1, column: str | None = None):
    with psycopg.connect(db_url) as conn, conn.transaction():
        stats = copy_items(conn, user_batch_id, path, column)
    with psycopg.connect(db_url) as conn:
        by_state = dict(conn.execute(
            "select state, count(*) from items where user_batch_id = %s group by 1", (user_batch_id,)
        ).fetchall())
        items = conn.execute(
            "select row_no, raw, email, state, reason from items where user_batch_id = %s order by row_no",
            (user_batch_id,),
        ).fetchall()
    return stats, by_state, items


def test_copy_items_rows_in_equal_rows_out(db_url, tmp_path):
    lines = ["email,name"]
    expected_valid = expected_invalid = 0
    for i in range(3000):
        if i % 10 == 3:
            lines.append(f"broken{i}.example.com,Row {i}")
            expected_invalid += 1
        elif i % 10 == 7:
            lines.append(f'"Row, {i}@x.com",x')  # a quoted cell with a comma and a space
            expected_invalid += 1
        elif i % 97 == 50:
            lines.append("")  # blank line: not a row
        else:
            lines.append(f"user{i}@Company{i % 13}.Example,Row {i}")
            expected_valid += 1
    p = write(tmp_path, "list.csv", ("\n".join(lines) + "\n").encode())
    stats, by_state, items = _copy(db_url, p)
    assert stats.rows == expected_valid + expected_invalid == len(items)
    assert (stats.pending, stats.invalid) == (expected_valid, expected_invalid)
    assert by_state == {"pending": expected_valid, "invalid": expected_invalid}
    # Row numbers are the physical lines; invalid rows carry their reason; no email for them.
    first = items[0]
    assert first[0] == 2 and first[2] == "user0@Company0.Example".rsplit("@")[0] + "@company0.example"
    for row_no, raw, email, state, reason in items:
        assert lines[row_no - 1].startswith(raw) or raw in lines[row_no - 1]
        assert (email is None) == (state == "invalid") == (reason is not None)


def test_copy_items_reports_the_line_it_took_for_the_header(db_url, tmp_path):
    stats, _, _ = _copy(db_url, write(tmp_path, "h.csv", b"\n\nName;Work Email\nAnn;ann@x.com\n"))
    assert stats.header == {"line": 3, "names": ["Name", "Work Email"], "column": 2} and stats.rows == 1
    stats, _, items = _copy(db_url, write(tmp_path, "n.csv", b"Ann,not-an-address\nBob,bob@x.com\n"), 2)
    assert stats.header is None and (stats.rows, stats.invalid) == (2, 1)
    assert items[0] == (1, "not-an-address", None, "invalid", "missing @")


def test_copy_items_counts_duplicates_as_rows_and_keeps_line_numbers(db_url, tmp_path):
    p = write(tmp_path, "dups.csv", b"email\nann@x.com\n\nANN@X.COM\nann@x.com\nAnn@x.com\n")
    stats, by_state, items = _copy(db_url, p)
    assert stats.rows == 4 and by_state == {"pending": 4}
    assert [(r[0], r[2]) for r in items] == [
        (2, "ann@x.com"), (4, "ANN@x.com"), (5, "ann@x.com"), (6, "Ann@x.com")
    ]


def test_copy_items_of_empty_and_header_only_files(db_url, tmp_path):
    for i, data in enumerate([b"", b"email\n"], 1):
        stats, by_state, items = _copy(db_url, write(tmp_path, f"{i}.csv", data), user_batch_id=i)
        assert stats.rows == 0 and by_state == {} and items == []


def test_copy_items_of_non_utf8_rows(db_url, tmp_path):
    p = write(tmp_path, "latin1.csv", b"email\nj\xe9r\xf4me@x.com\nann@x.com\n")
    stats, by_state, items = _copy(db_url, p)
    assert stats.rows == 2 and by_state == {"pending": 1, "invalid": 1}
    assert items[0][0] == 2 and items[0][3:] == ("invalid", "not valid UTF-8")


def test_copy_items_nul_byte_makes_only_that_row_invalid(db_url, tmp_path):
    p = write(tmp_path, "nul.csv", b"email,name\nann\x00@x.com,Ann\nbob@y.com,Bob\n")
    stats, by_state, _items = _copy(db_url, p)
    assert stats.rows == 2 and by_state == {"pending": 1, "invalid": 1}


def test_copy_items_stores_tabs_backslashes_and_newlines_in_cells_exactly(db_url, tmp_path):
    cells = ["a\tb@x.com", "back\\slash@x.com", "two\nlines@x.com", "cr\rhere@x.com", "\\N", "\\."]
    data = "email\n" + "".join('"' + c + '"\n' for c in cells) + "ok@x.com\n"
    stats, by_state, items = _copy(db_url, write(tmp_path, "esc.csv", data.encode()))
    assert stats.rows == len(cells) + 1
    assert [raw for _n, raw, *_r in items] == [*cells, "ok@x.com"]
    assert all(state == "invalid" and reason for _n, _raw, _e, state, reason in items[:-1])
    assert items[-1][2:4] == ("ok@x.com", "pending")


# ---- block reading: the plain (split) and quoted (csv) paths agree with a csv.reader pass ------


def _reference_rows(path: Path, column: str | None = None) -> list[tuple[int, str, str | None, str | None]]:
    """The reading rules written the simplest way: one csv.reader over the decoded stream and
    `normalize_address` on every cell (what `iter_rows` did before it read blocks)."""
    data = path.read_bytes()
    shape = detect_shape(codecs.decode(data[:64 * 1024], "utf-8-sig", errors="replace"), column)
    stream = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", errors="replace", newline="")
    reader = csv.reader(stream, delimiter=shape.delimiter)
    out, line, header_pending = [], 1, shape.has_header
    for record in reader:
        start, line = line, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        if header_pending:
            header_pending = False
            continue
        if shape.column >= len(record):
            out.append((start, shape.delimiter.join(record).replace("\x00", "\ufffd"), None,
                        f"no value in column {shape.column + 1}"))
        elif "\x00" in record[shape.column]:
            out.append((start, record[shape.column].replace("\x00", "\ufffd"), None, "contains a NUL byte"))
        else:
            out.append((start, record[shape.column], *normalize_address(record[shape.column])))
    return out


# Cells that stress the bulk recognizer's edges: each is either its own normalized address or not.
TRICKY_CELLS = [
    "plain@example.com", "Upper@Example.COM", "a-.b@x.com", "a--b@x.com", "x@a--b.com", "x@a-b.co-uk",
    "x@b.c1", "x@b.co", "x@b.test", "x@b.testing", "x@localhost", "x@b.local", "x@1.2.3.4", "x@b.com.",
    "mailto:x@b.com", " x@b.com", "x@b.com ", ".x@b.com", "x.@b.com", "x..y@b.com", "x@-b.com", "x@b-.com",
    "x@b..com", "x@.b.com", "@b.com", "x@", "x", "", "   ", "a" * 64 + "@b.com", "a" * 53 + "@b.com",
    "a" * 54 + "@b.com", "x@" + "d" * 63 + ".com", "x@" + "d" * 64 + ".com", "ü@bücher.de", "user@bücher.de",
    "x@b.c", "x@b.c-", "x@b.-c", "x_y+z@b.com", "o'brien@b.ie", "!#$%&'*+/=?^_`{|}~-@b.com", "x@b_c.com",
    "x@@b.com", "a@b@c.com", "x@B.com", "x@b.Com", "X@b.com", "x@xn--bcher-kva.de", "x@b.xn--zz",
    "x@b.arpa", "x@b.onion", "x@b.invalid", "x@123.com", "x@b.123", "x@b.c0m", "x@b.co9", "x@b.com\x00",
    "x\ty@b.com", "x\\y@b.com", "x y@b.com", "x@b.com,", "\ufeffx@b.com", "x@b.com\x1c",
    "x@B.TEST", "x@b.Local", "x@A--B.com", "X@Ab-C.De", "x@B.C0M", "x@b.co.UK", "x@b.COM.", "x@\u212a.com",
]


def _tricky_file(seed: int, rows: int) -> bytes:
    """A list mixing plain lines with quoted cells, multi-line fields, CRLF and bare CR endings,
    blank lines, NUL bytes, invalid UTF-8 and short rows, so blocks of every kind meet."""
    rng = random.Random(seed)
    alnum = string.ascii_lowercase + string.digits
    out = ["name,email,note\n"]
    for i in range(rows):
        kind = rng.randrange(20)
        if kind < 9:  # the common case: ordinary, already-normalized addresses
            cell = f"{_word(rng, alnum, 1, 12)}.{i}@{_word(rng, alnum, 1, 8)}.{rng.choice(['com', 'org', 'de'])}"
        elif kind < 13:
            cell = rng.choice(TRICKY_CELLS)
        else:
            cell = rng.choice(corpus(seed + i, 1, gaps=bool(i % 2)))
        if any(c in cell for c in ',"\n\r') or kind == 13:
            cell = '"' + cell.replace('"', '""') + '"'
        note = rng.choice(["x", "", "a b", '"a, b"', '"two\nlines"', '"cr\r\nlf"', "é"])
        end = rng.choice(["\n"] * 8 + ["\r\n", "\r"])
        line = f"Name {i},{cell},{note}{end}"
        if kind == 14:
            line = f"Name {i}{end}"  # no email column
        if kind == 15:
            line = rng.choice(["\n", "  \n", "\r\n", ",,\n"])
        out.append(line)
    data = "".join(out).encode()
    # A few bytes that are not UTF-8, and one NUL, at random places inside lines.
    for _ in range(3):
        at = rng.randrange(len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xe9", b"\x00"]) + data[at:]
    return data


@pytest.mark.parametrize("block_bytes", [37, 256, 4096, 1024 * 1024])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_block_reading_gives_exactly_the_rows_of_a_plain_csv_pass(tmp_path, monkeypatch, seed, block_bytes):
    monkeypatch.setattr(ingest, "_BLOCK_BYTES", block_bytes)
    p = write(tmp_path, "tricky.csv", _tricky_file(seed, 1500))
    expected = _reference_rows(p)
    assert len(expected) > 1300
    assert rows(p) == expected
    assert rows(p, "note") == _reference_rows(p, "note")  # short rows, quoted multi-line cells


@pytest.mark.parametrize("block_bytes", [23, 4096])
def test_block_reading_of_one_address_per_line_files(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(ingest, "_BLOCK_BYTES", block_bytes)
    cells = TRICKY_CELLS + corpus(5, 400, gaps=True) + [f"u{i}@x{i % 7}.com" for i in range(400)]
    for name, data in [
        ("lf.txt", "\n".join(cells).encode()),  # no final newline
        ("crlf.txt", ("\ufeff" + "".join(c + "\r\n" for c in cells)).encode()),
    ]:
        p = write(tmp_path, name, data)
        assert rows(p) == _reference_rows(p)


def test_every_bulk_recognized_cell_is_its_own_normalized_address():
    """The bulk path claims (cell, cell, None) for whole runs: check that claim cell by cell."""
    mixed = corpus(7, 2000, gaps=False) + corpus(11, 2000, gaps=True)
    cells = TRICKY_CELLS + mixed + [c.lower() for c in mixed]  # lower case: many more are normalized
    text = "\n".join(cells) + "\n"
    recognized, pos = [], 0
    for cell in cells:
        end = pos + len(cell) + 1
        if ingest._NORMALIZED_LINES.match(text, pos).end() >= end:
            recognized.append(cell)
        pos = end
    assert len(recognized) > 500  # the bulk path is actually taken
    assert [c for c in recognized if normalize_address(c) != (c, None)] == []


def test_every_foldable_cell_normalizes_to_itself_with_a_lower_case_domain():
    mixed = corpus(7, 2000, gaps=False) + corpus(11, 2000, gaps=True)
    foldable = [c for c in TRICKY_CELLS + mixed if ingest._FOLDABLE_LINE.match(c + "\n")]
    assert len(foldable) > 500
    wrong = [c for c in foldable if normalize_address(c) != (c.split("@")[0] + "@" + c.split("@")[1].lower(), None)]
    assert wrong == []


def test_a_list_cancelled_while_it_is_read_gets_no_more_rows(db_url, tmp_path):
    """The cancel commits while the ingest runs in its thread: later chunks must not add rows
    that would stay `pending` in a cancelled batch."""
    p = write(tmp_path, "list.csv", b"email\n" + b"".join(f"c{i}@x.com\n".encode() for i in range(1, 1001)))
    with psycopg.connect(db_url) as conn:
        conn.execute("insert into user_batches (id, user_id) values (92, 'cancelled-meanwhile')")

    def cancel_after_first(last_line: int, stats) -> None:
        with psycopg.connect(db_url) as conn:
            conn.execute("update user_batches set state = 'cancelled' where id = 92")

    with pytest.raises(ingest.BatchEnded, match="user batch 92 is cancelled"):
        copy_items_resumable(db_url, 92, str(p), None, 300, cancel_after_first)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("select count(*) from items where user_batch_id = 92").fetchone() == (300,)


def test_resumable_copy_commits_chunks_that_split_runs_and_resumes_without_loss(db_url, tmp_path):
    p = write(tmp_path, "list.csv", b"email\n" + b"".join(
        (f"u{i}@x.com\n" if i % 50 else f"Bad {i}\n").encode() for i in range(1, 1001)))
    committed: list[tuple[int, int]] = []

    class Crash(Exception):
        pass

    def crash_after_three(last_line: int, stats) -> None:
        committed.append((last_line, stats.rows))
        if len(committed) == 3:
            raise Crash

    with psycopg.connect(db_url) as conn:
        conn.execute("insert into user_batches (id, user_id) values (91, 'resume')")
    with pytest.raises(Crash):
        copy_items_resumable(db_url, 91, str(p), None, 333, crash_after_three)
    assert committed == [(334, 333), (667, 666), (1000, 999)]
    # The crash came after the third commit; a re-run skips those rows and adds the last one.
    stats = copy_items_resumable(db_url, 91, str(p), None, 333, lambda *_: None)
    assert (stats.rows, stats.invalid) == (1000, 20)
    with psycopg.connect(db_url) as conn:
        got = conn.execute("select row_no, raw, email, state from items where user_batch_id = 91 order by row_no"
                           ).fetchall()
    assert [(r[0], r[1], r[2]) for r in got] == [(n, c, e) for n, c, e, _ in _reference_rows(p)]


# ---- gzip and pipes ----------------------------------------------------------------------------


@pytest.mark.parametrize("block_bytes", [4096, 1024 * 1024])
def test_a_gzip_list_gives_the_rows_of_its_plain_twin_whatever_its_name(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(ingest, "_BLOCK_BYTES", block_bytes)  # small blocks: many max_length pieces
    plain = write(tmp_path, "tricky.csv", _tricky_file(4, 3000))
    expected = _reference_rows(plain)
    data = plain.read_bytes()
    half = len(data) // 2
    for name, packed in [
        ("tricky.csv.gz", gzip.compress(data)),
        ("no-suffix.csv", gzip.compress(data)),  # told by its magic bytes, not its name
        ("joined.gz", gzip.compress(data[:half]) + gzip.compress(data[half:]) + b"\0" * 512),  # members, padding
    ]:
        assert rows(write(tmp_path, name, packed)) == expected, name
    # The BOM and encoding checks apply to the decompressed text; the header is found in it too.
    utf16 = write(tmp_path, "u16.gz", gzip.compress("Name,Email\nAnn,ann@bücher.de\n".encode("utf-16")))
    assert rows(utf16) == [(2, "ann@bücher.de", "ann@xn--bcher-kva.de", None)]
    named = write(tmp_path, "c.gz", gzip.compress(b"Name,Work,Home\nAnn,ann@x.com,ann@y.com\n"))
    assert rows(named, "home") == [(2, "ann@y.com", "ann@y.com", None)]


@pytest.mark.parametrize(("mangle", "words"), [
    (lambda z: z[: len(z) // 2], "gzip data ends early"),
    (lambda z: z[:-4], "gzip data ends early"),  # the size trailer cut off
    (lambda z: z[:20] + bytes(b ^ 0x5A for b in z[20:60]) + z[60:], "corrupt"),
    (lambda z: z[:-8] + b"\0\0\0\0" + z[-4:], "corrupt"),  # a wrong CRC: the data is not what was packed
    (lambda z: z + b"PK\x03\x04 trailing", "bytes that are not gzip follow"),
    (lambda z: b"\x1f\x8b", "gzip data ends early"),
])
def test_a_corrupt_or_truncated_gzip_is_refused_naming_the_file_and_stores_nothing(db_url, tmp_path, mangle, words):
    packed = gzip.compress(b"email\n" + b"".join(f"u{i}@x.com\n".encode() for i in range(50_000)))
    p = write(tmp_path, "list.csv.gz", mangle(packed))
    with pytest.raises(UnreadableInput, match=re.escape(str(p))) as refused:
        rows(p)
    assert words in str(refused.value)
    with psycopg.connect(db_url) as conn:
        with pytest.raises(UnreadableInput, match=words), conn.transaction():
            conn.execute("insert into user_batches (id, user_id) values (93, 'gz')")
            copy_items(conn, 93, p)
        assert conn.execute("select count(*) from user_batches where id = 93").fetchone() == (0,)


def test_a_gzip_bomb_is_handed_out_a_block_at_a_time():
    """64 KiB that inflate to 64 MiB: never more than a read block of it at once."""
    bomb = gzip.compress(b"\n" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100 * 1024
    sizes = [len(piece) for piece in ingest.decompressed([bomb], "bomb.gz")]
    assert sum(sizes) == 64 * 1024 * 1024 and max(sizes) <= ingest._BLOCK_BYTES


def test_resumable_copy_of_a_gzip_list_resumes_after_the_committed_rows_without_loss(db_url, tmp_path):
    """Offsets into a gzip stream cannot be sought: a resume reads it again from the start and
    skips the lines the database already holds (the same rule as for a plain file)."""
    p = write(tmp_path, "list.csv.gz", gzip.compress(b"email\n" + b"".join(
        (f"u{i}@x.com\n" if i % 50 else f"Bad {i}\n").encode() for i in range(1, 1001))))

    class Crash(Exception):
        pass

    def crash_after_two(last_line: int, stats) -> None:
        if last_line > 600:
            raise Crash

    with psycopg.connect(db_url) as conn:
        conn.execute("insert into user_batches (id, user_id) values (94, 'resume-gz')")
    with pytest.raises(Crash):
        copy_items_resumable(db_url, 94, str(p), None, 333, crash_after_two)
    stats = copy_items_resumable(db_url, 94, str(p), None, 333, lambda *_: None)
    assert (stats.rows, stats.invalid) == (1000, 20)
    with psycopg.connect(db_url) as conn:
        got = conn.execute("select row_no, raw from items where user_batch_id = 94 order by row_no").fetchall()
    assert got == [(n, f"u{n - 1}@x.com" if (n - 1) % 50 else f"Bad {n - 1}") for n in range(2, 1002)]


@pytest.mark.parametrize("packed", [False, True])
def test_a_pipe_and_byte_chunks_are_read_without_seeking(tmp_path, packed):
    """A FIFO (what `<(zcat x.gz)` passes) cannot seek back to the start after the head is read."""
    data = _tricky_file(6, 2000)
    expected = _reference_rows(write(tmp_path, "plain.csv", data))
    body = gzip.compress(data) if packed else data
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(body,))
    writer.start()
    try:
        assert rows(fifo) == expected
    finally:
        writer.join(timeout=10)
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]  # stdin, as `submit -` reads it
    assert list(iter_rows(chunks)) == expected


@pytest.mark.parametrize("header, seconds", [("30", 30.0), ("-5", 0.0), ("1e300", 600.0), ("nan", None), ("inf", None),
                                             ("Wed, 21 Oct 2026 07:28:00 GMT", None), ("", None), (None, None)])
def test_a_file_servers_retry_after_is_a_bounded_finite_wait_or_none(header, seconds):
    """`nan` passed through min/max and made the activity's timedelta() raise ValueError."""
    assert ingest._retry_after(header) == seconds

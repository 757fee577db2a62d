"""Deterministic verification verdicts: what the sandbox answers for an address.

`verdict(email)` is a pure function of the address, so tests and benchmarks can compute
the expected record without asking the server. The record has the documented shape of
BOUNCER_API.md without `name` (the server adds the entry's own properties). It is
`decide(email)` (the costly part, a tuple) rendered by `add_verdict`: the server decides
once per address and renders on download.

Rules, in order:

1. Addresses on `sandbox.usebouncer.com` answer by local part (`+tag` allowed):
   `deliverable@`, `undeliverable@`, `risky@` (accept-all, so the catch-all lane can be
   exercised), `unknown@`.
2. Bad syntax -> `undeliverable` / `invalid_email`.
3. Domain-level traits, from a hash of the domain (well-known providers are exempt):
   ~5% of domains accept all (`risky` / `low_deliverability` / `acceptAll: yes`),
   ~2% have no mail server (`undeliverable` / `invalid_domain`),
   ~1.5% are disposable (`risky` / `low_quality`).
4. Otherwise a hash of the whole address decides, calibrated so that a large mixed list
   comes out near 70% deliverable, 12% risky, 12% undeliverable, 6% unknown.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

SANDBOX_DOMAIN = "sandbox.usebouncer.com"
STATUSES = ("deliverable", "risky", "undeliverable", "unknown")

# Domain traits: cumulative thresholds on the domain hash, in [0, 1).
_ACCEPT_ALL_BELOW = 0.05
_DEAD_BELOW = 0.07
_DISPOSABLE_BELOW = 0.085
# Per-address thresholds on ordinary domains (91.5% of them), cumulative.
_DELIVERABLE_BELOW = 0.765
_RISKY_BELOW = 0.765 + 0.060
_UNDELIVERABLE_BELOW = 0.825 + 0.1095

_FREE_PROVIDERS: dict[str, tuple[str, str]] = {
    "gmail.com": ("google.com", "gmail-smtp-in.l.google.com."),
    "googlemail.com": ("google.com", "gmail-smtp-in.l.google.com."),
    "yahoo.com": ("yahoo.com", "mta5.am0.yahoodns.net."),
    "outlook.com": ("outlook.com", "outlook-com.olc.protection.outlook.com."),
    "hotmail.com": ("outlook.com", "hotmail-com.olc.protection.outlook.com."),
    "live.com": ("outlook.com", "live-com.olc.protection.outlook.com."),
    "icloud.com": ("icloud.com", "mx01.mail.icloud.com."),
    "aol.com": ("yahoo.com", "mx-aol.mail.gm0.yahoodns.net."),
    "proton.me": ("proton.me", "mail.protonmail.ch."),
    "gmx.com": ("gmx.net", "mx00.gmx.net."),
}
_TYPO_DOMAINS = {
    "gmial.com": "gmail.com",
    "gamil.com": "gmail.com",
    "gmail.co": "gmail.com",
    "hotmial.com": "hotmail.com",
    "yaho.com": "yahoo.com",
    "outlok.com": "outlook.com",
}
_BUSINESS_PROVIDERS = (
    ("google.com", "aspmx.l.google.com."),
    ("outlook.com", "{slug}.mail.protection.outlook.com."),
    ("zoho.com", "mx.zoho.com."),
    ("mimecast.com", "eu-smtp-inbound-1.mimecast.com."),
    ("proofpoint.com", "mx0a-00000000.pphosted.com."),
    ("", "mx.{domain}."),
)
_ROLE_LOCAL_PARTS = frozenset(
    "admin administrator billing contact hello help info marketing noreply no-reply "
    "office postmaster root sales support team webmaster".split()
)
_UNKNOWN_REASONS = ("unavailable_smtp", "timeout", "unknown", "unsupported")
# Deliberately loose: syntax is checked the way a verifier would, not RFC 5322 in full.
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
_DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


def _unit(digest: bytes, offset: int) -> float:
    """A number in [0, 1) read from 4 bytes of a digest."""
    return int.from_bytes(digest[offset : offset + 4], "big") / 4294967296.0


# A decision: every field of a record but `email`, in the record's order. Deciding is the
# costly part (regex, hashes); the server keeps a batch's decisions between the status poll
# that counts them and the download that renders them.
Decision = tuple[str, str, str, str, str, str, str, str, str, str, int, int, "str | None"]


def _decision(
    domain: str,
    status: str,
    reason: str,
    *,
    accept_all: str = "no",
    disposable: str = "no",
    role: str = "no",
    disabled: str = "no",
    full_mailbox: str = "no",
    provider: str = "",
    mx: str = "",
    score: int = 0,
    toxicity: int = 0,
    did_you_mean: str | None = None,
) -> Decision:
    return (domain, status, reason, accept_all, disposable, role, disabled, full_mailbox,
            provider, mx, score, toxicity, did_you_mean)


def add_verdict(record: dict[str, Any], decision: Decision) -> dict[str, Any]:
    """Add the verdict's fields to `record` (which already holds `email`, and maybe `name`
    and other properties: a field of the same name keeps its place and takes the verdict's
    value). Returns `record`."""
    (domain, status, reason, accept_all, disposable, role, disabled, full_mailbox,
     provider, mx, score, toxicity, did_you_mean) = decision
    record["status"] = status
    record["reason"] = reason
    free = "yes" if domain in _FREE_PROVIDERS else "no"
    record["domain"] = {"name": domain, "acceptAll": accept_all, "disposable": disposable, "free": free}
    record["account"] = {"role": role, "disabled": disabled, "fullMailbox": full_mailbox}
    record["dns"] = {"type": "MX" if mx else "", "record": mx}
    record["provider"] = provider
    record["score"] = score
    record["toxic"] = "unknown" if status == "unknown" else ("yes" if toxicity >= 4 else "no")
    record["toxicity"] = toxicity
    if did_you_mean:
        record["didYouMean"] = did_you_mean
    return record


def _provider_for(domain: str, domain_digest: bytes) -> tuple[str, str]:
    if domain in _FREE_PROVIDERS:
        return _FREE_PROVIDERS[domain]
    provider, mx = _BUSINESS_PROVIDERS[domain_digest[8] % len(_BUSINESS_PROVIDERS)]
    return provider or domain, mx.format(domain=domain, slug=domain.replace(".", "-"))


@functools.lru_cache(maxsize=1 << 16)
def _domain_traits(domain: str) -> tuple[str, str, float] | None:
    """(provider, mx, domain roll) of a syntactically valid domain, else None.

    Cached: a list has far fewer domains than addresses, and the domain's regex and hash
    were most of a verdict's cost.
    """
    if not _DOMAIN_RE.match(domain):
        return None
    domain_digest = hashlib.blake2b(domain.encode(), digest_size=16).digest()
    provider, mx = _provider_for(domain, domain_digest)
    exempt = domain in _FREE_PROVIDERS or domain == SANDBOX_DOMAIN
    return provider, mx, 1.0 if exempt else _unit(domain_digest, 0)


def _sandbox_decision(local: str) -> Decision | None:
    base = local.split("+", 1)[0]
    common = {"provider": "usebouncer.com", "mx": "mx.sandbox.usebouncer.com."}
    if base == "deliverable":
        return _decision(SANDBOX_DOMAIN, "deliverable", "accepted_email", score=100, **common)
    if base == "risky":
        return _decision(SANDBOX_DOMAIN, "risky", "low_deliverability", accept_all="yes", score=50, **common)
    if base == "undeliverable":
        return _decision(SANDBOX_DOMAIN, "undeliverable", "rejected_email", score=0, **common)
    if base == "unknown":
        return _decision(
            SANDBOX_DOMAIN, "unknown", "unknown",
            accept_all="unknown", role="unknown", disabled="unknown", full_mailbox="unknown",
            score=0, **common,
        )
    return None


def decide(email: str) -> Decision:
    """The verdict of `email` as a `Decision` (`verdict` renders it as a record)."""
    address = email.strip().lower()
    local, at, domain = address.rpartition("@")
    traits = _domain_traits(domain) if at else None
    if traits is None or not _LOCAL_RE.match(local) or ".." in local:
        return _decision(domain if at else "", "undeliverable", "invalid_email")

    if domain == SANDBOX_DOMAIN:
        fixed = _sandbox_decision(local)
        if fixed is not None:
            return fixed

    role = "yes" if local.partition("+")[0] in _ROLE_LOCAL_PARTS else "no"
    if domain in _TYPO_DOMAINS:
        return _decision(
            domain, "undeliverable", "invalid_domain", role=role,
            did_you_mean=f"{local}@{_TYPO_DOMAINS[domain]}",
        )

    provider, mx, domain_roll = traits
    digest = hashlib.blake2b(address.encode(), digest_size=16).digest()
    toxicity = (0, 0, 0, 1, 1, 2, 3, 4)[digest[12] % 8] if digest[13] % 4 == 0 else 0

    if domain_roll < _ACCEPT_ALL_BELOW:
        return _decision(
            domain, "risky", "low_deliverability", accept_all="yes", role=role,
            provider=provider, mx=mx, score=40 + digest[8] % 31, toxicity=toxicity,
        )
    if domain_roll < _DEAD_BELOW:
        return _decision(domain, "undeliverable", "invalid_domain", role=role)
    if domain_roll < _DISPOSABLE_BELOW:
        return _decision(
            domain, "risky", "low_quality", disposable="yes", role=role,
            provider=provider, mx=mx, score=20 + digest[8] % 21, toxicity=max(toxicity, 2),
        )

    roll = _unit(digest, 0)
    if roll < _DELIVERABLE_BELOW:
        return _decision(
            domain, "deliverable", "accepted_email", role=role,
            provider=provider, mx=mx, score=80 + digest[8] % 21, toxicity=toxicity,
        )
    if roll < _RISKY_BELOW:
        full = digest[9] % 2 == 0
        return _decision(
            domain, "risky", "low_deliverability" if full else "low_quality",
            role=role, full_mailbox="yes" if full else "no",
            provider=provider, mx=mx, score=30 + digest[8] % 31, toxicity=toxicity,
        )
    if roll < _UNDELIVERABLE_BELOW:
        return _decision(
            domain, "undeliverable", "rejected_email", role=role,
            disabled="yes" if digest[9] % 3 == 0 else "no",
            provider=provider, mx=mx, score=digest[8] % 11, toxicity=toxicity,
        )
    return _decision(
        domain, "unknown", _UNKNOWN_REASONS[digest[9] % len(_UNKNOWN_REASONS)],
        accept_all="unknown", role=role, disabled="unknown", full_mailbox="unknown",
        provider=provider, mx=mx, score=digest[8] % 41, toxicity=toxicity,
    )


def verdict(email: str) -> dict[str, Any]:
    """The record the sandbox returns for `email` (without `name`).

    Pure and deterministic: a function of the trimmed, lower-cased address only. The
    `email` field echoes the argument as given.
    """
    return add_verdict({"email": email}, decide(email))


def decide_unverified(email: str) -> Decision:
    """The decision for an address a batch finished early before verifying (`unknown`)."""
    domain = email.strip().lower().rpartition("@")[2]
    return _decision(
        domain, "unknown", "unknown",
        accept_all="unknown", disposable="unknown", role="unknown", disabled="unknown",
        full_mailbox="unknown",
    )


def unverified(email: str) -> dict[str, Any]:
    """The record of an address a batch finished early before verifying (`unknown`)."""
    return add_verdict({"email": email}, decide_unverified(email))


# The catch-all endpoint's answers for accept-all addresses, cumulative on a second hash.
_CATCHALL_DELIVERABLE_BELOW = 0.55
_CATCHALL_UNDELIVERABLE_BELOW = 0.85


def decide_catchall(email: str) -> Decision:
    """`catchall_verdict` as a `Decision`."""
    base = decide(email)
    if base[1] != "risky" or base[3] != "yes":  # status, accept_all
        return base
    address = email.strip().lower()
    digest = hashlib.blake2b(b"catchall:" + address.encode(), digest_size=16).digest()
    roll = _unit(digest, 0)
    if roll < _CATCHALL_DELIVERABLE_BELOW:
        status, reason, score = "deliverable", "accepted_email", 75 + digest[8] % 26
    elif roll < _CATCHALL_UNDELIVERABLE_BELOW:
        status, reason, score = "undeliverable", "rejected_email", digest[8] % 11
    else:
        return base
    # `toxic` stays as for `risky`: the new status is never `unknown`.
    return (base[0], status, reason, *base[3:10], score, *base[11:])


def catchall_verdict(email: str) -> dict[str, Any]:
    """What the sandbox's catch-all endpoint (`/catchall/v1.1/...`) answers for `email`.

    For an address the batch API calls accept-all (`risky`, `domain.acceptAll = "yes"`) the
    answer is decisive for 85% of them: `deliverable` / `accepted_email` or `undeliverable` /
    `rejected_email`; the rest stay `risky`. Any other address gets its ordinary verdict.
    Pure and deterministic, like `verdict`.
    """
    return add_verdict({"email": email}, decide_catchall(email))

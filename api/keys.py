"""API keys: created once (printed, never stored), kept as a SHA-256 digest, revocable.

A key is 32 random bytes (`bk_` + url-safe base64): with that much entropy a fast hash is
enough; there is nothing to brute-force, so no bcrypt/argon2 cost on every request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import psycopg

PREFIX = "bk_"


@dataclass
class ApiKey:
    id: int
    user_id: str
    admin: bool


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_key(conn: psycopg.Connection, user_id: str, admin: bool = False) -> tuple[int, str]:
    """Store a new key for `user_id`; returns (key id, the key). The key itself is not stored."""
    if not user_id.strip():
        raise ValueError("user id is empty")
    key = PREFIX + secrets.token_urlsafe(32)
    (key_id,) = conn.execute(
        "insert into api_keys (user_id, prefix, key_hash, admin) values (%s, %s, %s, %s) returning id",
        (user_id, key[:10], digest(key), admin),
    ).fetchone()
    return int(key_id), key


def list_keys(conn: psycopg.Connection, user_id: str | None = None) -> list[dict]:
    rows = conn.execute(
        "select id, user_id, prefix, admin, created_at, revoked_at from api_keys"
        " where %(u)s::text is null or user_id = %(u)s order by id",
        {"u": user_id},
    ).fetchall()
    return [
        {"id": r[0], "user": r[1], "prefix": r[2], "admin": r[3], "created_at": r[4].isoformat(),
         "revoked_at": r[5].isoformat() if r[5] else None}
        for r in rows
    ]


def revoke_key(conn: psycopg.Connection, key_id: int) -> bool:
    """Revoke a key; False if no such key or already revoked."""
    row = conn.execute(
        "update api_keys set revoked_at = now() where id = %s and revoked_at is null returning id", (key_id,)
    ).fetchone()
    return row is not None


async def lookup(conn: psycopg.AsyncConnection, key: str) -> ApiKey | None:
    """The live key matching `key`, or None (unknown or revoked)."""
    if not key.startswith(PREFIX):
        return None
    cur = await conn.execute(
        "select id, user_id, admin from api_keys where key_hash = %s and revoked_at is null", (digest(key),)
    )
    row = await cur.fetchone()
    return ApiKey(*row) if row else None

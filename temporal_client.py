"""The one way every process connects to Temporal, so the payload codec applies everywhere.

With `PAYLOAD_KEYS` set, every payload (workflow and activity inputs and outputs, signals,
queries, updates, failures' details, memos) is encrypted with AES-256-GCM before it leaves the
process, and decrypted on the way back. Workflows carry ids and counts only (invariant 1);
encryption is the second line: what is in Temporal's database is ciphertext.

Rotation: `PAYLOAD_KEYS=new:<key>,old:<key>` encrypts with the first key and decrypts with any
listed key (the key id travels in each payload's metadata). Drop the old key once no open
workflow holds a payload it encrypted (after the namespace's retention period).

The Web UI and `temporal workflow show` then show ciphertext, unless they are pointed at a
codec server that holds the keys (Temporal's "codec server" endpoints, `/encode` and `/decode`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from datetime import datetime, timezone
from collections.abc import Sequence
from pathlib import Path

import temporalio.converter
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import PayloadCodec
from temporalio.service import TLSConfig

from activities.inputs import InputCheckingPayloadConverter
from settings import Settings

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
_NONCE = 12


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """`id:base64,id:base64` -> [(id, 32-byte key)]; the first one encrypts."""
    keys = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key_id, sep, b64 = part.partition(":")
        if not sep or not key_id:
            raise ValueError("PAYLOAD_KEYS must be comma-separated `id:base64key` pairs")
        try:
            key = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise ValueError(f"PAYLOAD_KEYS: key {key_id!r} is not valid base64") from None
        if len(key) != 32:
            raise ValueError(f"PAYLOAD_KEYS: key {key_id!r} must be 32 bytes (AES-256), not {len(key)}")
        keys.append((key_id, key))
    return keys


def new_key() -> str:
    """A fresh base64 key for `PAYLOAD_KEYS` (python -c 'import temporal_client as t; print(t.new_key())')."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class EncryptionCodec(PayloadCodec):
    """AES-GCM over each whole serialized payload (its metadata too); key id in the metadata."""

    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("EncryptionCodec needs at least one key")
        self._current_id, key = keys[0]
        self._current = AESGCM(key)
        self._all = {key_id: AESGCM(k) for key_id, k in keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            nonce = os.urandom(_NONCE)
            sealed = self._current.encrypt(nonce, p.SerializeToString(), self._current_id.encode())
            out.append(Payload(metadata={"encoding": ENCODING, KEY_ID: self._current_id.encode()}, data=nonce + sealed))
        return out

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        out = []
        for p in payloads:
            if p.metadata.get("encoding") != ENCODING:
                out.append(p)  # written before encryption was turned on
                continue
            key_id = p.metadata.get(KEY_ID, b"").decode()
            aes = self._all.get(key_id)
            if aes is None:
                raise ValueError(f"payload encrypted with key {key_id!r}, which is not in PAYLOAD_KEYS")
            out.append(Payload.FromString(aes.decrypt(p.data[:_NONCE], p.data[_NONCE:], key_id.encode())))
        return out


def data_converter(settings: Settings) -> temporalio.converter.DataConverter:
    """The SDK's JSON converter, naming a client's malformed UserBatchInput (it fails that workflow
    instead of its workflow task, for ever: `InputCheckingPayloadConverter`), plus the codec."""
    spec = settings.payload_keys.get_secret_value()
    converter = dataclasses.replace(temporalio.converter.default(), payload_converter_class=InputCheckingPayloadConverter)
    if not spec:
        return converter
    return dataclasses.replace(converter, payload_codec=EncryptionCodec(parse_keys(spec)))


def _read_pem(setting: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc.strerror}") from None


def uses_tls(settings: Settings) -> bool:
    """TLS toward Temporal: TEMPORAL_TLS, or an API key, a CA or a client certificate given
    (Temporal Cloud takes either an API key or mTLS, always over TLS)."""
    return bool(settings.temporal_tls or settings.temporal_api_key.get_secret_value() or settings.temporal_tls_ca_file
                or settings.temporal_tls_cert_file or settings.temporal_tls_key_file)


def tls_config(settings: Settings) -> TLSConfig | bool:
    """`Client.connect`'s `tls` from the settings (the PEM files read here)."""
    ca = _read_pem("TEMPORAL_TLS_CA_FILE", settings.temporal_tls_ca_file)
    cert = _read_pem("TEMPORAL_TLS_CERT_FILE", settings.temporal_tls_cert_file)
    key = _read_pem("TEMPORAL_TLS_KEY_FILE", settings.temporal_tls_key_file)
    if (cert is None) != (key is None):
        raise ValueError("TEMPORAL_TLS_CERT_FILE and TEMPORAL_TLS_KEY_FILE go together: set both or neither")
    if ca is None and cert is None:
        return uses_tls(settings)
    return TLSConfig(server_root_ca_cert=ca, client_cert=cert, client_private_key=key)


async def connect(settings: Settings, **kwargs) -> Client:
    """A client for `settings` (address, namespace, TLS, API key, payload codec); kwargs go to
    Client.connect. ValueError names the setting that is wrong; RuntimeError: Temporal unreachable
    (or it refused the credentials)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        api_key=settings.temporal_api_key.get_secret_value() or None,
        tls=tls_config(settings),
        data_converter=data_converter(settings),
        **kwargs,
    )


async def not_started_before(handle) -> datetime | None:
    """When a workflow started with a delay (`submit --at`) is due, if it is not yet: a signal or
    an update would start it at once (Temporal dispatches its first task), so callers refuse them."""
    due = (await handle.describe()).execution_time
    return due if due is not None and due > datetime.now(timezone.utc) else None

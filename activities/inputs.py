"""Checks of what SDK clients send, with pydantic: one clear message naming every bad field.

Workflow inputs are dataclasses (workflows/models.py) so that workflow code stays light and
deterministic. They are checked in the first activity of a user batch (`register_user_batch`),
not in the workflow: it is the first code of ours that sees a payload an SDK client built (any
client can call `start_workflow`, so there is no boundary of ours before it), a non-retryable
failure there fails the workflow at once with the reason, and nothing has been stored yet.
A value the SDK cannot even decode into those dataclasses (a field of the wrong type, a misspelled
one) is named by `InputCheckingPayloadConverter`, the workers' payload converter, and fails the
workflow the same way, before any activity.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from temporalio.api.common.v1 import Payload
from temporalio.converter import DefaultPayloadConverter
from temporalio.exceptions import ApplicationError

from workflows.models import SourceSpec

Priority = Literal["critical", "high", "normal", "low"]
Lane = Literal["deliverability", "catchall"]


class SourceSpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    uri: str = Field(min_length=1, max_length=4096)
    user_id: str = Field(min_length=1, max_length=200)
    name: str = Field("", max_length=500)
    priority: Priority = "normal"
    lanes: list[Lane] = Field(default_factory=lambda: ["deliverability"], min_length=1)
    column: str | None = Field(None, max_length=200)
    max_result_age_s: float | None = Field(None, ge=60)

    @field_validator("user_id")
    @classmethod
    def _not_blank(cls, user_id: str) -> str:
        if not user_id.strip():
            raise ValueError("is blank")
        return user_id

    @field_validator("uri")
    @classmethod
    def _readable_kind(cls, uri: str) -> str:
        if not uri.strip():
            raise ValueError("is blank")
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in ("", "file", "http", "https"):
            raise ValueError(f"scheme {scheme!r} is not supported (a file path, file://, http:// or https://)")
        return uri

    @field_validator("lanes")
    @classmethod
    def _distinct(cls, lanes: list[str]) -> list[str]:
        if len(set(lanes)) != len(lanes):
            raise ValueError("lists a lane twice")
        return lanes


class UserBatchInputModel(BaseModel):
    """`UserBatchInput` as JSON, to name what the SDK's converter could not read (`input_problems`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_batch_id: int = Field(0, ge=0)
    progress_recheck_s: float = 60.0
    source: SourceSpecModel | None = None
    ingest_heartbeat_s: float = 60.0
    max_history_events: int = 5_000


def _problems(exc: ValidationError, root: str) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or root}"
        + ("" if e["type"] == "missing" else f" {e['input']!r}"[:120])
        + f": {e['msg'].replace('UserBatchInputModel', 'UserBatchInput').replace('SourceSpecModel', 'SourceSpec')}"
        for e in exc.errors()
    )


def source_problems(source: SourceSpec) -> str | None:
    """None when `source` is acceptable, else one line naming each bad field and its value."""
    try:
        SourceSpecModel.model_validate(dataclasses.asdict(source))
    except ValidationError as exc:
        return _problems(exc, "source")
    return None


def input_problems(raw: object) -> str | None:
    """What is wrong with a `UserBatchInput` as sent (decoded JSON): a field of the wrong type, a
    misspelled or missing one; None when nothing is found."""
    try:
        UserBatchInputModel.model_validate(raw)
    except ValidationError as exc:
        return _problems(exc, "input")
    return None


class InputCheckingPayloadConverter(DefaultPayloadConverter):
    """The SDK's default converter, except that a `UserBatchInput` it cannot read fails the workflow.

    Any client may start a UserBatchWorkflow with any JSON. The SDK turns a start input that does
    not fit the workflow's types (`priority=1`, `user_id=None`, a misspelled field) into a failed
    workflow *task*, retried for ever: the workflow stays running and `result()` never returns. A
    `FailureError` raised while decoding fails the workflow instead, so this raises one naming the
    bad fields (workers install it through `temporal_client.connect`).
    """

    def from_payloads(self, payloads: Sequence[Payload], type_hints: list[type] | None = None) -> list[Any]:
        try:
            return super().from_payloads(payloads, type_hints)
        except Exception as exc:
            for payload, hint in zip(payloads, type_hints or []):
                if getattr(hint, "__qualname__", None) == "UserBatchInput" and hint.__module__ == "workflows.models":
                    try:
                        raw = json.loads(payload.data)
                    except ValueError:
                        raw = None
                    problems = input_problems(raw) if raw is not None else "it is not JSON"
                    raise ApplicationError(
                        f"invalid UserBatchInput: {problems or _chain(exc)}", type="InvalidInput",
                        non_retryable=True) from None
            raise


def _chain(exc: BaseException) -> str:
    """The SDK's messages, outermost first."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return ": ".join(parts)

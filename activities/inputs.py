"""Checks of what SDK clients send, with pydantic: one clear message naming every bad field.

Workflow inputs are dataclasses (workflows/models.py) so that workflow code stays light and
deterministic. They are checked in the first activity of a user batch (`register_user_batch`),
not in the workflow: it is the first code of ours that sees a payload an SDK client built (any
client can call `start_workflow`, so there is no boundary of ours before it), a non-retryable
failure there fails the workflow at once with the reason, and nothing has been stored yet.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from workflows.models import SourceSpec

Priority = Literal["critical", "high", "normal", "low"]
Lane = Literal["deliverability", "catchall"]


class SourceSpecModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    uri: str = Field(min_length=1, max_length=4096)
    user_id: str = Field(min_length=1, max_length=200)
    name: str = Field("", max_length=500)
    priority: Priority = "normal"
    lanes: list[Lane] = Field(min_length=1)
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


def source_problems(source: SourceSpec) -> str | None:
    """None when `source` is acceptable, else one line naming each bad field and its value."""
    try:
        SourceSpecModel.model_validate(dataclasses.asdict(source))
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'source'} {e['input']!r}: {e['msg']}" for e in exc.errors()
        )
    return None

"""The OpenAPI 3.0 document served at /openapi.json (the tests fuzz the running server against it)."""

from __future__ import annotations

from db.outcomes import CATCHALL_COLUMNS, COLUMNS as RESULT_COLUMNS, FILTERS, LANE_COLUMNS
from settings import LANES
from workflows.models import PRIORITIES

_LANES_RE = "|".join(LANES)
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}},
          "additionalProperties": False}


def _list_of(names) -> str:
    """A pattern for a comma-separated list of `names`."""
    one = "|".join(names)
    return f"^({one})(,({one}))*$"


def _err(description: str) -> dict:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_AUTH = {"401": _err("missing, unknown or revoked API key")}
_LOCATION = {"description": "the batch's path, /v1/batches/{id}", "schema": {"type": "string"}}
_DOWN = {"503": _err("Postgres or Temporal unreachable, or no worker answered")}
_BATCH_ID = {"name": "id", "in": "path", "required": True, "description": "user batch id",
             "schema": {"type": "integer", "format": "int64", "minimum": 1}}
_LANE = {"name": "lane", "in": "path", "required": True, "schema": {"type": "string", "enum": list(LANES)}}
_LANE_PROGRESS = {
    "type": "object",
    "required": list(LANE_COLUMNS),
    "properties": {k: {"type": "string"} if k == "lane" else {"type": "integer"} for k in LANE_COLUMNS},
    "description": "remaining: not yet settled (while paused, only those in flight; the rest are withdrawn"
                   " until resume)",
}
_BATCH = {
    "type": "object",
    "required": ["id", "user", "name", "priority", "lanes", "state", "rows", "invalid", "duplicates",
                 "workflow_id", "created_at", "finished_at", "summary"],
    "properties": {
        "id": {"type": "integer"},
        "user": {"type": "string"},
        "name": {"type": "string"},
        "priority": {"type": "string", "enum": list(PRIORITIES)},
        "lanes": {"type": "array", "items": {"type": "string", "enum": list(LANES)}},
        "state": {"type": "string", "enum": ["scheduled", "receiving", "preparing", "queued", "paused", "completed",
                                             "cancelled", "failed"]},
        "rows": {"type": "integer"},
        "invalid": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "workflow_id": {"type": "string", "nullable": True},
        "created_at": {"type": "string", "format": "date-time"},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
        "summary": {"type": "object", "nullable": True,
                    "description": "counts by_state and by_status once completed or cancelled"},
        "lane_progress": {"type": "array", "items": _LANE_PROGRESS},
        "addresses_total": {"type": "integer"},
        "addresses_settled": {"type": "integer", "description": "verified or failed for good, over every lane"},
        "cancel_requested": {"type": "boolean"},
    },
}
_LANE_DOC = {
    "type": "object",
    "required": ["lane", "running", "paused", "pause_reason", "in_flight", "free_slots", "dispatched_batches",
                 "queued"],
    "properties": {
        "lane": {"type": "string", "enum": list(LANES)},
        "running": {"type": "boolean", "description": "the lane's scheduler workflow is running"},
        "paused": {"type": "boolean"},
        "pause_reason": {"type": "string"},
        "in_flight": {"type": "integer", "description": "Bouncer batches in flight"},
        "free_slots": {"type": "integer"},
        "dispatched_batches": {"type": "integer"},
        "queued": {"type": "integer", "description": "addresses waiting in the lane's queues"},
    },
}
_SUBMITTED = {
    "type": "object",
    "required": ["id", "workflow_id", "state", "rows", "invalid", "invalid_rows"],
    "properties": {
        "id": {"type": "integer"},
        "workflow_id": {"type": "string"},
        "state": {"type": "string"},
        "rows": {"type": "integer"},
        "invalid": {"type": "integer"},
        "invalid_rows": {
            "type": "array", "description": "the first 100 invalid rows: line number (or array position) and why",
            "items": {"type": "object", "required": ["row", "reason"],
                      "properties": {"row": {"type": "integer"}, "reason": {"type": "string"}}},
        },
        "header": {
            "type": "object", "nullable": True,
            "description": "the line read as the header (null: none, every line is a row), its column names"
                           " and the column the addresses were read from (from 1)",
            "required": ["line", "names", "column"],
            "properties": {"line": {"type": "integer"}, "names": {"type": "array", "items": {"type": "string"}},
                           "column": {"type": "integer"}},
        },
    },
}
_DEAD_LETTER = {
    "type": "object",
    "required": ["id", "lane", "email", "reason", "attempts", "bouncer_batch_id", "created_at"],
    "properties": {
        "id": {"type": "integer"}, "lane": {"type": "string", "enum": list(LANES)}, "email": {"type": "string"},
        "reason": {"type": "string"}, "attempts": {"type": "integer"},
        "bouncer_batch_id": {"type": "integer", "nullable": True},
        "created_at": {"type": "string", "format": "date-time"},
    },
}
_RESULT_ROW = {
    "type": "object",
    "description": "every column, or those `columns` names",
    "properties": {
        "row": {"type": "integer"}, "input": {"type": "string"}, "email": {"type": "string", "nullable": True},
        "state": {"type": "string"}, "note": {"type": "string", "nullable": True},
        "status": {"type": "string", "nullable": True}, "reason": {"type": "string", "nullable": True},
        "score": {"type": "integer", "nullable": True}, "accept_all": {"type": "string", "nullable": True},
        "verified_at": {"type": "string", "nullable": True},
        **{flag: {"type": "string", "nullable": True}
           for flag in ("disposable", "free", "role", "full_mailbox", "provider", "did_you_mean")},
        "toxicity": {"type": "integer", "nullable": True},
        # present when the user batch asked for the catchall lane
        "catchall_status": {"type": "string", "nullable": True},
        "catchall_reason": {"type": "string", "nullable": True},
        "catchall_score": {"type": "integer", "nullable": True},
        "catchall_verified_at": {"type": "string", "nullable": True},
    },
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _batch_op(summary: str, ok: dict, extra: dict | None = None) -> dict:
    return {"summary": summary, "parameters": [_BATCH_ID], "security": [{"apiKey": []}],
            "responses": {**ok, "400": _err("unknown or repeated query parameter"), **_AUTH,
                          "404": _err("no such user batch for this key's user"), **_DOWN, **(extra or {})}}


DOCUMENT: dict = {
    "openapi": "3.0.3",
    "info": {
        "title": "Bouncer verification pipeline",
        "version": "1",
        "description": "Submit address lists, follow them, fetch per-row results. Every /v1 route needs "
                       "`Authorization: Bearer <key>`; a key sees only its own user's batches.",
    },
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": _ERROR, "Batch": _BATCH, "Lane": _LANE_DOC},
    },
    "paths": {
        "/healthz": {"get": {
            "summary": "Postgres and Temporal reachable",
            "responses": {
                "200": _json({"type": "object", "required": ["status"], "properties": {
                    "status": {"type": "string"}, "postgres": {"type": "string"}, "temporal": {"type": "string"}}},
                    "all dependencies reachable"),
                "503": _json({"type": "object", "required": ["status"]}, "a dependency is down (named)"),
            },
        }},
        "/v1/batches": {
            "post": {
                "summary": "Submit a list (streamed into Postgres, then verified)",
                "security": [{"apiKey": []}],
                "parameters": [
                    {"name": "name", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                    {"name": "priority", "in": "query", "schema": {"type": "string", "enum": list(PRIORITIES)}},
                    {"name": "lanes", "in": "query", "description": "comma-separated lanes",
                     "schema": {"type": "string", "pattern": f"^({_LANES_RE})(,({_LANES_RE}))*$"}},
                    {"name": "column", "in": "query", "description": "CSV email column: header name or 1-based number",
                     "schema": {"type": "string", "maxLength": 200}},
                    {"name": "max_age", "in": "query", "description": "reuse only results younger than this "
                     "(e.g. 7d, 12h; at least 1m); default RESULT_TTL_DAYS",
                     "schema": {"type": "string", "pattern": "^([0-9]+(\\.[0-9]+)?[smhdw])+$"}},
                    {"name": "Idempotency-Key", "in": "header", "description": "the caller's key for this submission: "
                     "a repeat (a retry after a lost answer) returns the batch the first one created, with 200",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
                ],
                "requestBody": {"required": True, "description": "gzip too (told by its magic bytes); a charset"
                                " of the Content-Type, or of the `file` part's own, is read as such",
                                "content": {
                    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                        "file": {"type": "string", "format": "binary"}}}},
                    "text/csv": {"schema": {"type": "string"}},
                    "text/plain": {"schema": {"type": "string"}},  # read as text/csv
                    "application/json": {"schema": {"type": "array", "minItems": 1, "items": {
                        "description": "an address string; any other element is reported as an invalid row"}}},
                }},
                "responses": {
                    "200": {**_json({"$ref": "#/components/schemas/Batch"},
                                    "this Idempotency-Key was used before: the batch it created (nothing stored)"),
                            "headers": {"Location": _LOCATION,
                                        "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}}},
                    "201": {**_json(_SUBMITTED, "stored; its workflow started. Invalid rows are reported, never sent"),
                            "headers": {"Location": _LOCATION}},
                    "400": _err("unreadable body (corrupt or truncated gzip too), bad option, unknown or repeated"
                                " query parameter, or no rows"),
                    **_AUTH,
                    "408": _err("the body stalled: less than 1 KiB a second arrived over API_CLIENT_IDLE_TIMEOUT_S"
                                " (nothing stored)"),
                    "413": _err("body (or a gzip body's list, decompressed) over API_MAX_UPLOAD_MB"),
                    "415": _err("unsupported Content-Type, a Content-Encoding other than gzip, or an unknown"
                                " charset"),
                    "429": {**_err("API_SUBMISSIONS_PER_HOUR lists of this user in the last hour, or "
                                   "API_UPLOADS_PER_USER of the user's uploads in progress"),
                            "headers": {"Retry-After": {"description": "seconds until the next is accepted",
                                                        "schema": {"type": "integer"}}}},
                    "503": {**_err("Postgres or Temporal unreachable, or API_UPLOADS uploads in progress "
                                   "(then with Retry-After)"),
                            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
                },
            },
            "get": {
                "summary": "The caller's user batches, newest first, a page of `limit` at a time",
                "security": [{"apiKey": []}],
                "parameters": [{"name": "limit", "in": "query",
                                "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                               {"name": "before", "in": "query", "description": "only batches with a lower id: "
                                "the next page is `before` the last id of this one (an empty page: no more)",
                                "schema": {"type": "integer", "format": "int64", "minimum": 1}}],
                "responses": {
                    "200": _json({"type": "object", "required": ["batches"], "properties": {
                        "batches": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}}}}, "batches"),
                    "400": _err("bad limit or before, unknown or repeated query parameter"),
                    **_AUTH,
                    **_DOWN,
                },
            },
        },
        "/v1/batches/{id}": {
            "get": _batch_op("Counts and progress of a user batch",
                             {"200": _json({"$ref": "#/components/schemas/Batch"}, "the user batch")}),
            "delete": _batch_op("Cancel a user batch (queued addresses withdrawn)",
                                {"202": _json({"$ref": "#/components/schemas/Batch"}, "cancellation requested")},
                                {"409": _err("already finished"), "503": _DOWN["503"]}),
        },
        "/v1/batches/{id}/results": {"get": {
            **_batch_op(
                "Per-row results in input order, streamed",
                {"200": {"description": "one row per input row", "headers": {"Content-Disposition": {
                    "description": 'attachment; filename="user-batch-{id}.{format}"', "schema": {"type": "string"}}},
                    "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/json": {"schema": {"type": "array", "items": _RESULT_ROW}},
                    "application/jsonl": {"schema": {"type": "string"}}}}},  # JSON Lines: a row object a line
                {"400": _err("bad format, status filter or column"),
                 "429": {**_err("API_EXPORTS_PER_USER downloads of this user in progress"),
                         "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
                 "503": {**_err("Postgres unreachable, or API_EXPORTS downloads in progress"),
                         "headers": {"Retry-After": {"schema": {"type": "integer"}}}}},
            ),
            "parameters": [
                _BATCH_ID,
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["csv", "json", "jsonl"]}},
                {"name": "status", "in": "query",
                 "description": "only rows with this Bouncer status or row state (several: comma-separated, any matches)",
                 "schema": {"type": "string", "pattern": _list_of(FILTERS)}},
                {"name": "columns", "in": "query",
                 "description": "only these columns, in this order, e.g. email,status,reason (catchall_* only for a"
                                " batch with the catchall lane)",
                 "schema": {"type": "string", "pattern": _list_of(RESULT_COLUMNS + CATCHALL_COLUMNS)}},
            ],
        }},
        "/v1/batches/{id}/pause": {"post": _batch_op(
            "Pause: queued addresses withdrawn, in-flight ones finish (pausing a paused batch changes nothing)",
            {"200": _json({"$ref": "#/components/schemas/Batch"}, "paused")},
            {"409": _err("finished, or not started yet (a delayed start)"), "503": _DOWN["503"]})},
        "/v1/batches/{id}/resume": {"post": _batch_op(
            "Resume a paused user batch (resuming one that is not paused changes nothing)",
            {"200": _json({"$ref": "#/components/schemas/Batch"}, "resumed")},
            {"409": _err("finished, or not started yet (a delayed start)"), "503": _DOWN["503"]})},
        "/v1/batches/{id}/dead-letters": {"get": {
            **_batch_op(
                "Addresses of the batch that got no result: why, and how often each was sent",
                {"200": _json({"type": "object", "required": ["total", "dead_letters"], "properties": {
                    "total": {"type": "integer"},
                    "dead_letters": {"type": "array", "items": _DEAD_LETTER}}}, "oldest first, at most `limit`")},
                {"400": _err("bad limit")},
            ),
            "parameters": [_BATCH_ID, {"name": "limit", "in": "query",
                                       "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
        }},
        "/v1/batches/{id}/dead-letters/retry": {"post": _batch_op(
            "Send the batch's dead-lettered addresses again (a credit each); a completed batch reopens",
            {"200": _json({"type": "object", "required": ["retried", "batch"], "properties": {
                "retried": {"type": "integer"}, "batch": {"$ref": "#/components/schemas/Batch"}}}, "re-queued")},
            {"409": _err("cancelled or failed"), "503": _DOWN["503"]})},
        "/v1/lanes": {"get": {
            "summary": "Each lane's scheduler: paused, in flight, free slots, queued",
            "security": [{"apiKey": []}],
            "responses": {"200": _json({"type": "object", "required": ["lanes"], "properties": {
                "lanes": {"type": "array", "items": {"$ref": "#/components/schemas/Lane"}}}}, "lanes"),
                "400": _err("unknown query parameter"), **_AUTH, "503": _DOWN["503"]},
        }},
        **{
            f"/v1/lanes/{{lane}}/{verb}": {"post": {
                "summary": f"{verb.capitalize()} a lane (admin keys only)",
                "security": [{"apiKey": []}],
                "parameters": [_LANE],
                "responses": {"200": _json({"$ref": "#/components/schemas/Lane"}, f"lane {verb}d"),
                              "400": _err("unknown query parameter"), **_AUTH,
                              "403": _err("not an admin key"), "404": _err("no such lane"),
                              "503": _DOWN["503"]},
            }}
            for verb in ("pause", "resume")
        },
    },
}

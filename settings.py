"""The one settings object of every process (pydantic-settings: env vars and `.env`).

Read once at process start (`Settings()`) and passed down; nothing else reads the
environment. Every field is listed in the README with its env var and default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LANES = ("deliverability", "catchall")
DELIVERABILITY, CATCHALL = LANES


@dataclass(frozen=True)
class LaneApi:
    """What differs between lanes: the endpoint, its key, its task queues (API budgets) and slots."""

    lane: str
    base_url: str
    api_key: SecretStr
    create_task_queue: str
    api_task_queue: str
    creations_per_minute: float
    requests_per_minute: float
    max_concurrency: int
    batch_size: int
    max_concurrent_batches: int


# The files read for settings, weakest first (`.env` wins over the dev stack's), from the working
# directory; SETTINGS_FILES (comma-separated, empty: none) names others. The tests set it empty, so
# that a dev stack running beside them (`.dev/stack.env`) or a developer's `.env` changes nothing.
SETTINGS_FILES = tuple(f.strip() for f in os.environ.get("SETTINGS_FILES", ".dev/stack.env,.env").split(",")
                       if f.strip())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=SETTINGS_FILES or None, env_file_encoding="utf-8", extra="ignore")

    # Temporal
    temporal_address: str = Field("localhost:7233", description="Temporal frontend host:port")
    temporal_namespace: str = Field("default", description="Temporal namespace")
    temporal_api_key: SecretStr = Field(
        SecretStr(""), description="Temporal Cloud API key (secret; sent as a bearer token, turns TLS on)"
    )
    temporal_tls: bool = Field(
        False, description="Connect to Temporal over TLS (on by itself with an API key, CA or client certificate)"
    )
    temporal_tls_ca_file: str = Field(
        "", description="PEM file of the CA that signed Temporal's server certificate (empty: the system's roots)"
    )
    temporal_tls_cert_file: str = Field("", description="PEM client certificate for mTLS (Temporal Cloud mTLS auth)")
    temporal_tls_key_file: str = Field("", description="PEM private key of TEMPORAL_TLS_CERT_FILE (secret file)")
    task_queue: str = Field("verify", description="Task queue of workflows and database activities")
    api_create_task_queue: str = Field(
        "verify-api-create", description="Task queue of batch-creation API activities"
    )
    api_task_queue: str = Field("verify-api", description="Task queue of the other API activities")
    payload_keys: SecretStr = Field(
        SecretStr(""),
        description="Encrypt every Temporal payload: `id:base64key,...` (AES-256; first encrypts, all decrypt)",
    )

    # Postgres
    database_url: str = Field(
        "postgresql://postgres@localhost:5432/postgres", description="Postgres connection URL"
    )
    db_pool_size: int = Field(8, description="Connections per worker process")
    ingest_chunk_rows: int = Field(
        50_000, ge=1_000, description="Rows of a list fetched from a URI committed per transaction: a worker killed "
        "mid-file resumes after the last committed chunk"
    )

    # Bouncer API
    bouncer_base_url: str = Field("https://api.usebouncer.com", description="Bouncer API base URL")
    bouncer_api_key: SecretStr = Field(SecretStr(""), description="Bouncer API key (secret)")
    bouncer_timeout_s: float = Field(30.0, description="HTTP timeout per API request, seconds")
    bouncer_max_concurrency: int = Field(10, description="API requests in flight per process")
    store_concurrency: int = Field(
        1, ge=1, description="Bouncer batches downloaded and stored at once per worker process (the rest wait their "
        "turn, at most STORE_TURN_WAIT_S, leaving the CPU to the creations that refill the API's slots; express "
        "batches never wait)"
    )
    store_quiet_s: float = Field(
        1.0, ge=0, description="A regular store starts once this worker process has heard no completion and run no "
        "pack or creation for this long (the refills of a burst of completions go first), seconds"
    )
    store_turn_wait_s: float = Field(
        5.0, ge=0, description="A store that has waited this long for quiet (STORE_QUIET_S) and a turn "
        "(STORE_CONCURRENCY) runs anyway, seconds (so does the oldest of more than MAX_CONCURRENT_BATCHES waiting stores)"
    )

    # Packing and limits
    batch_size: int = Field(10_000, ge=1, le=100_000, description="Addresses per Bouncer batch (the API takes "
                            "at most 100,000; 1,000-10,000 recommended)")
    max_unanswered_creates: int = Field(
        3, ge=1, description="Times one Bouncer batch is sent without an answer (a dropped connection, a timeout, "
        "or a 5xx other than 503: the API may have made, and charged, a batch each time) before it is sent no "
        "more: its addresses go to dead letters and the lane pauses (check the Bouncer dashboard, then "
        "`resume --lane` and `dlq retry`)"
    )
    max_concurrent_batches: int = Field(15, description="Bouncer batches in flight per lane")
    creations_per_minute: float = Field(
        45, description="Batch creations per minute, enforced by the Temporal server on the create queue"
    )
    requests_per_minute: float = Field(
        180, description="Other API requests per minute, enforced by the Temporal server on the API queue"
    )
    standby_batches: int = Field(
        15, ge=0, description="While every slot of a lane is busy, Bouncer batches packed ahead, each created the "
        "moment one in flight leaves the API (0: off). Keep CREATIONS_PER_MINUTE + STANDBY_BATCHES <= the API's 60 "
        "creations a minute (standby batches may be created faster than that pace for a moment). A list owed their "
        "places (a higher priority or, with fair share, a less served user) empties them and is packed first. The "
        "defaults (45 + 15) give each of the 15 slots a batch standing by"
    )
    pack_linger_s: float = Field(
        0.5, description="After new work arrives, wait this long so lists submitted together share batches"
    )
    fair_share: bool = Field(
        True, description="Within a priority, serve the least-served user first; false means FIFO by age"
    )
    express_slots: int = Field(
        5, description="Extra slots per lane for small lists only, sent alone (keep MAX_CONCURRENT_BATCHES "
        "+ EXPRESS_SLOTS <= the API's 25 parallel batches)"
    )
    express_max_addresses: int = Field(
        1_000, description="A list of at most this many addresses to verify may use an express slot, and one of at "
        "most this many rows is finalized by the store that settles it; 0 turns both off"
    )
    poll_interval_s: float = Field(15.0, description="Status polling interval (fallback to callbacks)")
    batch_deadline_s: float = Field(
        6 * 3600.0, description="A Bouncer batch not completed after this long is finished early: what it verified is "
        "stored, the rest re-queued"
    )
    credit_check_s: float = Field(300.0, description="While a lane is paused for credits, check /credits this often")
    max_address_attempts: int = Field(3, description="Sends of one address before it is dead-lettered")
    result_ttl_days: float = Field(30.0, description="A result younger than this is reused, not re-verified")
    unknown_result_ttl_days: float = Field(
        1.0, ge=0, description="An `unknown` result (the mail provider gave no answer) is reused only this long, "
        "not RESULT_TTL_DAYS: a later submission asks again"
    )

    max_in_flight_per_user: int = Field(
        0, description="Addresses one user may have in flight per lane (0: no cap); user_limits overrides per user"
    )

    # Catch-all lane: a Bouncer-compatible endpoint of its own, with its own budgets and slots
    catchall_base_url: str = Field(
        "", description="Base URL of the catch-all verification API; empty turns the catchall lane off"
    )
    catchall_api_key: SecretStr = Field(SecretStr(""), description="API key of the catch-all endpoint (secret)")
    catchall_api_create_task_queue: str = Field(
        "verify-catchall-api-create", description="Task queue of the catchall lane's batch creations"
    )
    catchall_api_task_queue: str = Field(
        "verify-catchall-api", description="Task queue of the catchall lane's other API calls"
    )
    catchall_creations_per_minute: float = Field(20, description="Catch-all batch creations per minute (server-enforced)")
    catchall_requests_per_minute: float = Field(100, description="Other catch-all API requests per minute")
    catchall_max_concurrency: int = Field(5, description="Catch-all API requests in flight per process")
    catchall_batch_size: int = Field(10_000, ge=1, le=100_000, description="Addresses per catch-all batch")
    catchall_max_concurrent_batches: int = Field(5, description="Catch-all batches in flight")

    # Events to subscribers (signed webhooks)
    event_fetch_wait_s: float = Field(5.0, description="The dispatcher waits this long for new events per fetch")
    event_max_attempts: int = Field(8, description="POSTs of one delivery before it is marked failed (dead letter)")
    event_retry_initial_s: float = Field(1.0, description="First retry delay of a failed delivery (then doubling)")
    event_retry_max_s: float = Field(300.0, description="Longest delay between two attempts of a delivery")
    event_timeout_s: float = Field(10.0, description="HTTP timeout of one webhook POST, seconds")

    shutdown_grace_s: float = Field(30.0, description="On SIGTERM, running activities get this long to finish")

    # Completion callbacks (an HTTP receiver in worker.py signals the Bouncer batch workflow)
    callback_listen: str = Field(
        "", description="host:port the worker's callback receiver binds to; empty turns callbacks off"
    )
    callback_public_url: str = Field(
        "", description="Base URL Bouncer calls back (defaults to http://CALLBACK_LISTEN unless that binds every"
                        " interface: then none, polling only)"
    )

    # Operations: metrics, tracing, health thresholds
    metrics_listen: str = Field(
        "", description="host:port of the worker's /metrics (ours and the SDK's), /healthz and /readyz; empty: off"
    )
    metrics_sample_s: float = Field(
        15.0, description="How often a worker refreshes its database-derived gauges and flushes API usage"
    )
    credits_sample_s: float = Field(
        300.0, description="How often a worker reads /credits for the credits gauge (one API request); 0: never"
    )
    otlp_endpoint: str = Field(
        "", description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); empty: tracing off"
    )
    alert_backlog_batches: float = Field(
        1000, description="Alert when queued work exceeds this many Bouncer batches (queued addresses / BATCH_SIZE)"
    )
    alert_failed: int = Field(50, description="Alert when more addresses than this were dead-lettered in the window")
    alert_failed_window_s: float = Field(86400.0, description="The window of ALERT_FAILED, seconds")
    alert_rate_utilization: float = Field(
        0.9, description="Alert when API requests in a minute exceed this share of a budget (0..1)"
    )
    alert_credits_floor: int = Field(10_000, description="Alert when the account's credits fall below this")
    alert_check_s: float = Field(60.0, description="How often a worker evaluates the alert thresholds; 0: never")

    # HTTP API (`python -m api`)
    api_listen: str = Field("127.0.0.1:8080", description="host:port the HTTP API binds to")
    api_db_pool_size: int = Field(8, description="Postgres connections of the HTTP API process")
    api_max_upload_mb: int = Field(
        1024, description="Largest accepted upload body, MiB (larger: 413); for a gzip body, also its list "
        "decompressed")
    api_submissions_per_hour: int = Field(
        0, ge=0, description="Lists one user may submit through the HTTP API in any hour (more: 429 with Retry-After); "
        "0: no limit"
    )
    api_uploads: int = Field(
        8, ge=1, description="Uploads one API process reads at once, each on a thread of its own and a Postgres "
        "connection of its own (more: 503 with Retry-After)"
    )
    api_uploads_per_user: int = Field(
        2, ge=1, description="Uploads of one user one API process reads at once (more: 429 with Retry-After)"
    )
    api_exports: int = Field(
        4, ge=1, description="Result downloads one API process streams at once, on a Postgres pool of their own of "
        "this many connections (more: 503 with Retry-After)"
    )
    api_exports_per_user: int = Field(
        2, ge=1, description="Result downloads of one user one API process streams at once (more: 429 with "
        "Retry-After)"
    )
    api_client_idle_timeout_s: float = Field(
        30.0, gt=0, description="An upload whose client sends less than 1 KiB a second over this long (nothing, or a trickle) is refused (408, nothing "
        "stored); a result download whose client reads nothing for this long is cut off and its Postgres "
        "connection returned, seconds"
    )

    # Cleanup (a Temporal Schedule runs CleanupWorkflow; installed at worker start)
    cleanup_schedule: bool = Field(True, description="Worker start installs/updates the daily cleanup schedule")
    cleanup_cron: str = Field("17 3 * * *", description="When the cleanup schedule runs (cron, UTC)")
    cleanup_retention_days: float = Field(
        90.0, description="Finished user batches, results and events older than this are deleted"
    )
    cleanup_chunk_rows: int = Field(10_000, description="Rows deleted per cleanup transaction")

    @property
    def callback_base_url(self) -> str:
        """Where Bouncer calls back; empty: no callback (polling only). A receiver bound to every
        interface (0.0.0.0, ::) gives no address to call, so that needs CALLBACK_PUBLIC_URL."""
        if self.callback_public_url:
            return self.callback_public_url.rstrip("/")
        host = self.callback_listen.rpartition(":")[0].strip("[]")
        return f"http://{self.callback_listen}" if host not in ("", "0.0.0.0", "::") else ""

    def lane_api(self, lane: str) -> LaneApi:
        """The settings group of one lane."""
        if lane == CATCHALL:
            return LaneApi(
                lane, self.catchall_base_url, self.catchall_api_key, self.catchall_api_create_task_queue,
                self.catchall_api_task_queue, self.catchall_creations_per_minute, self.catchall_requests_per_minute,
                self.catchall_max_concurrency, self.catchall_batch_size, self.catchall_max_concurrent_batches,
            )
        return LaneApi(
            lane, self.bouncer_base_url, self.bouncer_api_key, self.api_create_task_queue, self.api_task_queue,
            self.creations_per_minute, self.requests_per_minute, self.bouncer_max_concurrency, self.batch_size,
            self.max_concurrent_batches,
        )

    def freshness(self, max_age_s: float | None = None) -> dict[str, float]:
        """The query parameters of `db.fresh_result`: how long a result is reused, in seconds;
        `max_age_s` caps both (a user batch's `max_result_age_s`, e.g. a recurring run's)."""
        ttl, ttl_unknown = self.result_ttl_days * 86400.0, self.unknown_result_ttl_days * 86400.0
        if max_age_s is not None:
            ttl, ttl_unknown = min(ttl, max_age_s), min(ttl_unknown, max_age_s)
        return {"ttl": ttl, "ttl_unknown": ttl_unknown}

    def lanes_enabled(self) -> tuple[str, ...]:
        """Lanes this deployment serves: catchall only once its endpoint is configured."""
        return LANES if self.catchall_base_url else (DELIVERABILITY,)

    def __repr__(self) -> str:  # SecretStr already masks the key; keep repr short
        return f"Settings(temporal={self.temporal_address}, db=..., bouncer={self.bouncer_base_url})"

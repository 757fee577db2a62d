"""The one settings object of every process (pydantic-settings: env vars and `.env`).

Read once at process start (`Settings()`) and passed down; nothing else reads the
environment. Every field is listed in the README with its env var and default.
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LANES = ("deliverability", "catchall")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=(".dev/stack.env", ".env"), env_file_encoding="utf-8", extra="ignore")

    # Temporal
    temporal_address: str = Field("localhost:7233", description="Temporal frontend host:port")
    temporal_namespace: str = Field("default", description="Temporal namespace")
    task_queue: str = Field("verify", description="Task queue of workflows and database activities")
    api_create_task_queue: str = Field(
        "verify-api-create", description="Task queue of batch-creation API activities"
    )
    api_task_queue: str = Field("verify-api", description="Task queue of the other API activities")

    # Postgres
    database_url: str = Field(
        "postgresql://postgres@localhost:5432/postgres", description="Postgres connection URL"
    )
    db_pool_size: int = Field(8, description="Connections per worker process")

    # Bouncer API
    bouncer_base_url: str = Field("https://api.usebouncer.com", description="Bouncer API base URL")
    bouncer_api_key: SecretStr = Field(SecretStr(""), description="Bouncer API key (secret)")
    bouncer_timeout_s: float = Field(30.0, description="HTTP timeout per API request, seconds")
    bouncer_max_concurrency: int = Field(10, description="API requests in flight per process")

    # Packing and limits
    batch_size: int = Field(10_000, description="Addresses per Bouncer batch")
    max_concurrent_batches: int = Field(15, description="Bouncer batches in flight per lane")
    creations_per_minute: float = Field(
        50, description="Batch creations per minute, enforced by the Temporal server on the create queue"
    )
    requests_per_minute: float = Field(
        180, description="Other API requests per minute, enforced by the Temporal server on the API queue"
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
        1_000, description="A list of at most this many addresses to verify may use an express slot; 0 turns express off"
    )
    poll_interval_s: float = Field(15.0, description="Status polling interval (fallback to callbacks)")
    batch_deadline_s: float = Field(
        6 * 3600.0, description="A Bouncer batch not completed after this long is abandoned and re-queued"
    )
    credit_check_s: float = Field(300.0, description="While a lane is paused for credits, check /credits this often")
    max_address_attempts: int = Field(3, description="Sends of one address before it is dead-lettered")
    result_ttl_days: float = Field(30.0, description="A result younger than this is reused, not re-verified")

    shutdown_grace_s: float = Field(30.0, description="On SIGTERM, running activities get this long to finish")

    # Completion callbacks (an HTTP receiver in worker.py signals the Bouncer batch workflow)
    callback_listen: str = Field(
        "", description="host:port the worker's callback receiver binds to; empty turns callbacks off"
    )
    callback_public_url: str = Field(
        "", description="Base URL Bouncer calls back (defaults to http://CALLBACK_LISTEN)"
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

    @property
    def callback_base_url(self) -> str:
        if self.callback_public_url:
            return self.callback_public_url.rstrip("/")
        return f"http://{self.callback_listen}" if self.callback_listen else ""

    def __repr__(self) -> str:  # SecretStr already masks the key; keep repr short
        return f"Settings(temporal={self.temporal_address}, db=..., bouncer={self.bouncer_base_url})"

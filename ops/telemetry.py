"""The SDK's telemetry: its Prometheus metrics (Runtime) and OpenTelemetry tracing (interceptor).

The SDK's exporter binds a loopback port of its own; the worker's /metrics (ops.server)
appends its text to ours, so operators scrape one port (see README, "Operations").
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

SERVICE_NAME = "bouncer-pipeline-worker"


@dataclass
class SdkMetrics:
    runtime: Runtime
    url: str  # the SDK exporter's own endpoint (loopback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sdk_metrics(port: int) -> SdkMetrics:
    """A Runtime whose Prometheus exporter serves 127.0.0.1:`port` (clients connect with it)."""
    runtime = Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(bind_address=f"127.0.0.1:{port}")))
    return SdkMetrics(runtime, f"http://127.0.0.1:{port}/metrics")


@dataclass
class Tracing:
    interceptor: object  # temporalio.contrib.opentelemetry.TracingInterceptor
    provider: object  # opentelemetry.sdk.trace.TracerProvider: shut down to flush

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracing(settings, exporter=None) -> Tracing | None:
    """OTLP tracing when OTLP_ENDPOINT is set (else None): spans for workflow starts, signals,
    queries, workflow runs and activities, through the SDK's TracingInterceptor.

    `exporter` replaces the OTLP/HTTP exporter (tests). The provider is our own, not the
    global one, so a process can build it more than once.
    """
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from temporalio.contrib.opentelemetry import TracingInterceptor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    provider.add_span_processor(
        BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=settings.otlp_endpoint), schedule_delay_millis=1000)
    )
    return Tracing(TracingInterceptor(provider.get_tracer(__name__)), provider)

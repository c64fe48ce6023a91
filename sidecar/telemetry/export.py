"""Collector outages: one log line per outage, and a cheap drop while the collector is down.

`_ExportLogGate` quiets the OpenTelemetry SDK's per-batch and per-span export logs; `_GuardedExporter`
wraps the OTLP exporter, logs when export starts failing and when it recovers, and drops batches between
probes so the worker thread does not wait out a retry timeout on every batch.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

# The sink's logger, whichever of its modules logs: one name for operators to filter on.
log = logging.getLogger("sidecar.telemetry.otel")


# --- one log line per collector outage -----------------------------------------------------------

class _ExportLogGate(logging.Filter):
    """Keeps the SDK's export logs to one line per outage.

    The OTLP exporters log a warning or error for every failed batch and retry, and the batch processor
    one for every span dropped on a full queue. While our exporter wrapper is inside `export` (flagged
    `quiet` per thread) the SDK's warnings are swallowed and the last one kept as the reason; the wrapper
    logs once when export starts failing and once when it recovers. "Queue full" is logged at most every
    five minutes. A caller's malformed `tracestate` is dropped quietly the same way.
    """

    LOGGERS = (
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.common.http",
        "opentelemetry.exporter.otlp.proto.common._internal",
        "opentelemetry.sdk._shared_internal",
        "opentelemetry.trace.span",
    )
    QUEUE_FULL_EVERY = 300.0

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()
        self._queue_full_logged_at: float | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.local, "quiet", False):
            if record.levelno >= logging.WARNING:
                self.local.reason = record.getMessage()
                return False
            return True
        if isinstance(record.msg, str) and record.msg.startswith("Queue full"):
            self.queue_full()
            return False
        return True

    def queue_full(self) -> None:
        now = time.monotonic()
        last = self._queue_full_logged_at
        if last is None or now - last >= self.QUEUE_FULL_EVERY:
            self._queue_full_logged_at = now
            log.warning("trace export queue is full: spans are dropped until export catches up "
                        "(raise OTEL_BSP_MAX_QUEUE_SIZE, or check the collector)")


_gate = _ExportLogGate()
_gate_installed = False
_gate_lock = threading.Lock()


def _install_gate() -> None:
    global _gate_installed
    with _gate_lock:
        if not _gate_installed:
            for name in _ExportLogGate.LOGGERS:
                logging.getLogger(name).addFilter(_gate)
            _gate_installed = True


class _GuardedExporter(SpanExporter):
    """Wraps the OTLP exporter: one log line per outage, and a cheap drop while the collector is down.

    While failing, a batch is dropped at once unless `probe_every` seconds have passed since the last
    attempt, so the worker does not spend the exporter's full retry timeout on every batch.
    """

    def __init__(self, inner: SpanExporter, target: str, probe_every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.target = target
        self.probe_every = probe_every
        self._clock = clock
        self.failing = False
        self.dropped = 0                  # spans lost during the current outage
        self._next_probe = 0.0
        self._closed = False
        self._lock = threading.Lock()     # the worker and force_flush may both export

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._closed:
            return SpanExportResult.FAILURE
        if self.failing and self._clock() < self._next_probe:
            self.dropped += len(spans)
            return SpanExportResult.FAILURE
        _gate.local.quiet, _gate.local.reason = True, None
        try:
            result = self.inner.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the worker thread
            result = SpanExportResult.FAILURE
            _gate.local.reason = f"{type(exc).__name__}: {exc}"
        finally:
            _gate.local.quiet = False
        if self._closed:               # aborted by a bounded shutdown: the failure is ours, not news
            return result
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                if self.failing:
                    log.warning("trace export to %s recovered (%d spans were dropped meanwhile)",
                                self.target, self.dropped)
                    self.failing, self.dropped = False, 0
                return result
            self.dropped += len(spans)
            self._next_probe = self._clock() + self.probe_every
            if not self.failing:
                self.failing = True
                log.warning("trace export to %s failed (%s); spans are dropped and this is not logged "
                            "again until export recovers", self.target, _gate.local.reason or "unknown")
        return result

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Idempotent; also interrupts an export stuck in the exporter's retry backoff."""
        if not self._closed:
            self._closed = True
            self.inner.shutdown()

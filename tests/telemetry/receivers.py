"""Real OTLP trace receivers on loopback, for tests that assert on what a collector would see.

`OtlpHttpReceiver` (aiohttp, POST /v1/traces, protobuf) and `OtlpGrpcReceiver` (grpcio TraceService)
each run on their own thread, so they work alike from sync tests, async tests and tests whose event loop
is busy in a blocking `force_flush`. Both decode every `ExportTraceServiceRequest` into `ReceivedSpan`s.

As pytest fixtures (`tests/conftest.py` imports these two):

    def test_x(otlp_http_receiver):
        sink = OtelSink.from_config(cfg, {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_http_receiver.endpoint,
                                          "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
        ...
        [span] = otlp_http_receiver.wait_for_spans(1, where=lambda s: s.name == "chat")
"""
from __future__ import annotations

import asyncio
import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

ExportRequest = trace_service_pb2.ExportTraceServiceRequest


@dataclass
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict


@dataclass
class ReceivedSpan:
    name: str
    kind: str                          # INTERNAL | SERVER | CLIENT | PRODUCER | CONSUMER
    trace_id: str                      # hex
    span_id: str
    parent_span_id: str | None
    trace_state: str
    start_ns: int
    end_ns: int
    attributes: dict
    events: list[ReceivedEvent]
    status: str                        # UNSET | OK | ERROR
    status_message: str
    resource: dict
    scope: str
    flags: int = 0

    def events_named(self, name: str) -> list[ReceivedEvent]:
        return [e for e in self.events if e.name == name]


def decode_value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return tuple(decode_value(v) for v in value.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: decode_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind)


def decode_attributes(attributes) -> dict:
    return {kv.key: decode_value(kv.value) for kv in attributes}


def decode_request(request: ExportRequest) -> list[ReceivedSpan]:
    out = []
    for rs in request.resource_spans:
        resource = decode_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    name=s.name,
                    kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex() or None,
                    trace_state=s.trace_state,
                    start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano,
                    attributes=decode_attributes(s.attributes),
                    events=[ReceivedEvent(e.name, e.time_unix_nano, decode_attributes(e.attributes))
                            for e in s.events],
                    status=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    status_message=s.status.message,
                    resource=resource,
                    scope=ss.scope.name,
                    flags=s.flags,
                ))
    return out


@dataclass
class _Store:
    requests: list[ExportRequest] = field(default_factory=list)
    spans: list[ReceivedSpan] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, request: ExportRequest) -> None:
        decoded = decode_request(request)
        with self.cond:
            self.requests.append(request)
            self.spans.extend(decoded)
            self.cond.notify_all()


class OtlpReceiver:
    """What both receivers share: the decoded store, waiting, and switches to play a hung or failing
    collector (`stall()`/`resume()`, and `fail_status` / `fail_code` on each)."""

    def __init__(self) -> None:
        self._store = _Store()
        self.port = 0
        self._flowing = threading.Event()
        self._flowing.set()

    def stall(self) -> None:
        """Hold every export request unanswered (a hung collector) until `resume()`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def requests(self) -> list[ExportRequest]:
        with self._store.cond:
            return list(self._store.requests)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._store.cond:
            return list(self._store.spans)

    def clear(self) -> None:
        with self._store.cond:
            self._store.requests.clear()
            self._store.spans.clear()

    def wait_for_spans(self, count: int = 1, *, where: Callable[[ReceivedSpan], bool] | None = None,
                       timeout: float = 10.0) -> list[ReceivedSpan]:
        """The received spans matching `where`, once at least `count` arrived; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._store.cond:
            while True:
                found = [s for s in self._store.spans if where is None or where(s)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} spans, got {len(found)} of "
                                         f"{[s.name for s in self._store.spans]}")
                self._store.cond.wait(remaining)

    async def wait_for_spans_async(self, count: int = 1, **kwargs) -> list[ReceivedSpan]:
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.wait_for_spans(count, **kwargs))

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class OtlpHttpReceiver(OtlpReceiver):
    """OTLP/HTTP with protobuf bodies. Accepts any path (recorded in `paths`) so tests can check which
    URL the exporter used; set `fail_status` to answer every export with that status instead."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.fail_status: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The base endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        return f"{self.endpoint}/v1/traces"

    async def _handle(self, request: web.Request) -> web.Response:
        self.paths.append(request.path)
        if not self._flowing.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self._flowing.wait, 30)
        if self.fail_status is not None:
            return web.Response(status=self.fail_status, text="receiver told to fail")
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        message = ExportRequest()
        message.ParseFromString(body)
        self._store.add(message)
        return web.Response(body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                app = web.Application()
                app.router.add_post("/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None)
                loop.run_until_complete(self._runner.setup())
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                loop.run_until_complete(site.start())
                self.port = self._runner.addresses[0][1]
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="otlp-http-receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpGrpcReceiver) -> None:
        self.receiver = receiver

    def Export(self, request, context):  # noqa: N802 - the generated gRPC method name
        self.receiver._flowing.wait(30)
        if self.receiver.fail_code is not None:
            context.abort(self.receiver.fail_code, "receiver told to fail")
        self.receiver._store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpGrpcReceiver(OtlpReceiver):
    """OTLP/gRPC, plaintext. Set `fail_code` (a grpc.StatusCode) to fail every export."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_code: grpc.StatusCode | None = None
        self._server: grpc.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(10)
            self._server = None


@pytest.fixture
def otlp_http_receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def otlp_grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as receiver:
        yield receiver

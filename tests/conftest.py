"""Fixtures shared across the test suite."""
# Real OTLP receivers on loopback (HTTP and gRPC), for any test that asserts on exported traces.
try:
    from telemetry.receivers import otlp_grpc_receiver, otlp_http_receiver  # noqa: F401 - fixtures
except ModuleNotFoundError:  # tests/ itself became a package
    from tests.telemetry.receivers import otlp_grpc_receiver, otlp_http_receiver  # noqa: F401

"""The OTLP receivers as fixtures for the telemetry tests (tests/conftest.py shares them with the rest)."""
from .receivers import otlp_grpc_receiver, otlp_http_receiver  # noqa: F401 - fixtures

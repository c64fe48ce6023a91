"""The OpenTelemetry sink's configuration: the policy's `telemetry` and the `OTEL_*` environment.

From them come the exporter, the sampler and the resource; the environment wins over the policy. A
sampler is a plain callable on the trace id, named as OTEL_TRACES_SAMPLER names them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter

from sidecar.policy.model import Telemetry

# The sink's logger, whichever of its modules logs: one name for operators to filter on.
log = logging.getLogger("sidecar.telemetry.otel")

# (trace_id, caller's span id or None, caller's sampled flag) -> export this healthy request?
Sampler = Callable[[str, "str | None", bool], bool]

PROTOCOLS = ("grpc", "http/protobuf")


# --- sampling ------------------------------------------------------------------------------------

def make_sampler(name: str, ratio: float) -> Sampler:
    """A sampler from an OTEL_TRACES_SAMPLER name; `ratio` is its argument for the ratio samplers.

    parentbased_*: a caller's `traceparent` decides (sampled -> on, not sampled -> off, as the SDK's
    ParentBased defaults do); without one, the named root sampler does. traceidratio is
    TraceIdRatioBased on the hex id: the low 64 bits against `ratio * 2**64`, the SDK's bound. Each is
    one flat function: the data plane calls it once per request.
    """
    base = name.removeprefix("parentbased_")
    parent_based = name.startswith("parentbased_")
    if base in ("always_on", "always_off"):
        on = base == "always_on"
        if parent_based:
            return lambda trace_id, parent, sampled: sampled if parent is not None else on
        return lambda trace_id, parent, sampled: on
    if base != "traceidratio":
        raise ValueError(f"unknown sampler {name!r}")
    bound = round(max(0.0, min(1.0, ratio)) * (1 << 64))     # 0 samples nothing, 2**64 everything
    if parent_based:
        return lambda trace_id, parent, sampled: sampled if parent is not None else int(trace_id[16:], 16) < bound
    return lambda trace_id, parent, sampled: int(trace_id[16:], 16) < bound


# --- the environment -----------------------------------------------------------------------------

def resolve_target(cfg: Telemetry, env: Mapping[str, str]) -> tuple[str, str] | None:
    """(protocol, endpoint) from the environment, then the policy; None when no endpoint is set."""
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or cfg.traces.protocol or "grpc").strip().lower()
    if protocol not in PROTOCOLS:
        fallback = "http/protobuf" if protocol.startswith("http") else "grpc"
        log.warning("OTLP protocol %r is not supported; using %s", protocol, fallback)
        protocol = fallback
    http = protocol == "http/protobuf"
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if traces_endpoint:
        endpoint = traces_endpoint                           # a signal endpoint is used as is
    elif base_endpoint:
        # OTLP exporter spec: for OTLP/HTTP the base endpoint gets the signal path appended.
        endpoint = f"{base_endpoint.rstrip('/')}/v1/traces" if http else base_endpoint
    elif cfg.traces.endpoint:
        endpoint = cfg.traces.endpoint.strip()
        # The policy's endpoint is a collector address; give an HTTP one the signal path unless it has one.
        if http and urlsplit(endpoint).path in ("", "/"):
            endpoint = f"{endpoint.rstrip('/')}/v1/traces"
    else:
        return None
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"                      # `jaeger:4317`: plaintext, as on a pod network
    return protocol, endpoint


def sampler_from_env(cfg: Telemetry, env: Mapping[str, str]) -> tuple[str, Sampler]:
    """OTEL_TRACES_SAMPLER / _ARG, defaulting to parentbased_traceidratio at the policy's sample_ratio."""
    name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_traceidratio").strip().lower()
    ratio = cfg.traces.sample_ratio
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if raw and "traceidratio" in name:
        try:
            value = float(raw)
            if not 0.0 <= value <= 1.0:
                raise ValueError(raw)
            ratio = value
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; using %s", raw, ratio)
    try:
        sampler = make_sampler(name, ratio)
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported; using parentbased_traceidratio", name)
        name = "parentbased_traceidratio"
        sampler = make_sampler(name, ratio)
    label = f"{name}({ratio})" if "traceidratio" in name else name
    return label, sampler


def _resource(cfg: Telemetry, env: Mapping[str, str]) -> Resource:
    # Resource.create runs the SDK's detectors, which read OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME;
    # the policy's service_name applies only when neither names the service.
    resource = Resource.create({})
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if not service and str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        service = cfg.service_name
    if service:
        resource = resource.merge(Resource({"service.name": service}))
    return resource


def _make_exporter(protocol: str, endpoint: str, env: Mapping[str, str]) -> SpanExporter:
    """The SDK's OTLP exporter for `protocol`, encoding batches with `wire.py` (see `exporters.py`)."""
    from sidecar.telemetry.exporters import HttpExporter, grpc_exporter
    if protocol == "http/protobuf":
        return HttpExporter(endpoint=endpoint)
    scheme = urlsplit(endpoint).scheme
    insecure_env = (env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
                    or "").strip().lower()
    if scheme == "https":
        insecure = False
    elif insecure_env in ("true", "false"):
        insecure = insecure_env == "true"
    else:
        insecure = scheme == "http"
    return grpc_exporter(endpoint, insecure)

"""The one shape of an error the sidecar answers itself (SPEC "What the application sees"):
`content-type: application/json`, body `{"error": ..., "route": ..., "decisions": [...]}`."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from multidict import CIMultiDict

from sidecar.exchange.types import Reply

JSON = "application/json"


def error_body(error: str, route: str | None = None, decisions: Iterable[str] = (),
               extra: Mapping[str, object] | None = None) -> bytes:
    doc: dict[str, object] = {"error": error, "route": route, "decisions": list(decisions)}
    if extra:
        doc.update(extra)
    return json.dumps(doc).encode()


def json_error(status: int, error: str, route: str | None = None, decisions: Iterable[str] = (),
               extra: Mapping[str, object] | None = None, *, upstream: str = "sidecar") -> Reply:
    """An error answer as a `Reply`; `upstream` is what `x-sidecar-upstream` says answered."""
    return Reply(status=status, headers=CIMultiDict({"content-type": JSON}), upstream=upstream,
                 body=error_body(error, route, decisions, extra))

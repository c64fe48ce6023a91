"""Where a policy's problems are reported, and the checks a schema cannot express.

Cross-references (an `upstream` that is not defined, two listeners on one port, a regex that does not
compile, a `body_file` that cannot be read) and values the schema admits but the sidecar cannot use (a
duration, a size) are reported at the line of the value at fault. A value that came from `defaults` is
reported at its line in `defaults` (see `_locate`), since that is where the operator must fix it.
`build.py`'s `_Builder` builds the records on top of this.
"""
from __future__ import annotations

import os
import re

from sidecar.policy import yaml12
from sidecar.policy.errors import Problem, suggest
from sidecar.policy.merge import has_path
from sidecar.policy.model import Endpoint, Listener
from sidecar.policy.plain import mapping
from sidecar.policy.units import parse_duration, parse_size
from sidecar.policy.yaml12 import Path

MAX_BODY_FILE = 16 * 1024 * 1024
_WILDCARD_BINDS = {"0.0.0.0", "::", "[::]", "*", ""}


class Checker:
    """The policy document being built, the problems found so far, and the checks that find them."""

    def __init__(self, doc: yaml12.Document, file: str):
        self.doc, self.file = doc, file
        self.data = mapping(doc.data)     # load.py refused a document that is not a mapping
        self.base_dir = os.path.dirname(os.path.abspath(file))
        self.problems: list[Problem] = []
        self.upstream_names = set(mapping(self.data.get("upstreams") or {}))
        # Where a value was written: the route first, then `defaults` (see `_locate`).
        self.layers: list[tuple[Path, object]] = [((), self.data)]

    # --- reporting ----------------------------------------------------------------------------------
    def fail(self, sub: Path, message: str) -> None:
        self.problems.append(Problem(self.file, *self.doc.value_pos(self._locate(sub)), message))

    def _locate(self, sub: Path) -> Path:
        for prefix, raw in self.layers:
            if has_path(raw, sub):
                return prefix + sub
        return self.layers[0][0] + sub

    def duration(self, value: object, sub: Path) -> float:
        try:
            return parse_duration(value)
        except ValueError:
            self.fail(sub, f"{value!r} is not a duration this sidecar can wait for")
            return 0.0

    def optional_duration(self, value: object, sub: Path) -> float | None:
        return None if value is None else self.duration(value, sub)

    def size(self, value: object, sub: Path) -> int:
        try:
            return parse_size(value)
        except ValueError:
            self.fail(sub, f"{value!r} is not a size")
            return 0

    def upstream_ref(self, name: object, sub: Path) -> str:
        if name not in self.upstream_names:
            defined = ", ".join(sorted(self.upstream_names)) or "none"
            self.fail(sub, f"unknown upstream '{name}'{suggest(str(name), self.upstream_names)}"
                           f" (defined: {defined})")
        return str(name)

    # --- cross-references ---------------------------------------------------------------------------
    def check_ports(self, listeners: tuple[Listener, ...], admin: Endpoint, health: Endpoint) -> None:
        taken: list[tuple[str, str, int]] = []
        # admin and health first: when they clash with a listener, the listener's line is the useful one.
        sockets: list[tuple[str, str, int, Path]] = [
            ("the admin endpoint", admin.bind, admin.port, ("admin", "port")),
            ("the health endpoint", health.bind, health.port, ("health", "port"))]
        sockets += [(f"listener '{l.name}'", l.bind, l.port, ("listeners", i, "port"))
                    for i, l in enumerate(listeners)]
        for label, bind, port, sub in sockets:
            for other, other_bind, other_port in taken:
                overlap = bind == other_bind or bind in _WILDCARD_BINDS or other_bind in _WILDCARD_BINDS
                if port and port == other_port and overlap:
                    self.fail(sub, f"{label}: port {port} is already used by {other}")
                    break
            taken.append((label, bind, port))

    def regex(self, pattern: str, sub: Path) -> re.Pattern[str] | None:
        try:
            return re.compile(pattern)
        except re.error as exc:
            self.fail(sub, f"invalid regex {pattern!r}: {exc.msg} at position {exc.pos}")
        except (RecursionError, OverflowError, ValueError) as exc:
            self.fail(sub, f"invalid regex {pattern!r}: {exc}")
        return None

    def body_file(self, name: str, sub: Path) -> bytes:
        path = os.path.join(self.base_dir, name)
        try:
            with open(path, "rb") as f:
                body = f.read(MAX_BODY_FILE + 1)
        except (OSError, ValueError) as exc:
            self.fail(sub, f"cannot read body_file {name!r}: {getattr(exc, 'strerror', None) or exc}")
            return b""
        if len(body) > MAX_BODY_FILE:
            self.fail(sub, f"body_file {name!r} is larger than {MAX_BODY_FILE} bytes")
        return body

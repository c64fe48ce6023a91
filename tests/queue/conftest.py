"""The e2e fixtures (real upstreams and sidecars on loopback), shared with tests/e2e.

No __init__.py here on purpose: a package named `queue` would shadow the standard library's.
"""
import importlib.util
import sys
from pathlib import Path

E2E = Path(__file__).resolve().parent.parent / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

_spec = importlib.util.spec_from_file_location("e2e_fixtures", E2E / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
upstream_factory = _fixtures.upstream_factory
sidecar_factory = _fixtures.sidecar_factory
port = _fixtures.port

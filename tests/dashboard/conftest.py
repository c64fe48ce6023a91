"""The e2e fixtures (`upstream_factory`, `sidecar_factory`, `port`), reused as they are.

pytest applies a conftest only to its own directory, so this one loads tests/e2e/conftest.py under a
name of its own (both files are called `conftest`) and re-exports its fixtures.
"""
import importlib.util
import sys
from pathlib import Path

E2E = Path(__file__).resolve().parent.parent / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))          # e2e's conftest does `from harness import ...`

_spec = importlib.util.spec_from_file_location("e2e_fixtures", E2E / "conftest.py")
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)

upstream_factory = _e2e.upstream_factory
sidecar_factory = _e2e.sidecar_factory
port = _e2e.port

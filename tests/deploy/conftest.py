"""Fixtures for the deploy tests; the helpers live in manifest_helpers.py."""
from __future__ import annotations

import pytest

from manifest_helpers import DEPLOY, kustomize_build


@pytest.fixture(scope="session")
def overlay() -> list[dict]:
    """The example overlay, rendered: base + jaeger + the shop app."""
    return kustomize_build(DEPLOY / "overlays" / "example-app")

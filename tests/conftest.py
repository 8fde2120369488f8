"""Shared test helpers: where the built guests are.

The pykvm pytest plugin (installed with the package) provides the ``kvm_host``,
``machine_factory`` and ``run_guest`` fixtures and the ``kvm`` marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

GUEST_BUILD = Path(__file__).resolve().parent.parent / "guests" / "build"


def guest(name: str) -> Path:
    """The path of a built guest; fails (not skips) when the guests are not built."""
    path = GUEST_BUILD / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build the guests first with 'make guests'", pytrace=False)
    return path

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


KVM_FIXTURES = {"kvm_host", "machine_factory", "run_guest"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots guests on /dev/kvm (deselect with -m 'not guest' for the unit tests)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that needs /dev/kvm (the ``kvm`` marker or a KVM fixture) is a ``guest`` test."""
    for item in items:
        if item.get_closest_marker("kvm") or KVM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.guest)

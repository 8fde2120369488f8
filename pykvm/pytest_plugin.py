"""pytest plugin: fixtures that boot guests, and clean skips where /dev/kvm is absent.

Installed with pykvm (entry point ``pytest11``), it gives every test suite:

* the ``kvm`` marker: a test marked ``@pytest.mark.kvm`` (or using the fixtures
  below) is skipped when ``/dev/kvm`` cannot be used, with the reason; set
  ``PYKVM_REQUIRE_KVM=1`` (as CI does) to make that a failure instead;
* ``kvm_host``: the :func:`pykvm.info.host_info` of this host;
* ``machine_factory``: ``machine_factory(memory="64M", ...)`` returns a
  :class:`~pykvm.machine.Machine` (serial captured) closed after the test;
* ``run_guest``: ``run_guest(path, timeout=30, **load_options)`` boots an image on a
  fresh machine and returns its :class:`~pykvm.result.RunResult`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .errors import KvmUnavailableError
from .info import host_info
from .kvm.system import DEFAULT_PATH
from .machine import Machine
from .result import RunResult

REQUIRE_ENV = "PYKVM_REQUIRE_KVM"
DEVICE_ENV = "PYKVM_DEVICE"  # the KVM device to use, as for the pykvm command


def _device() -> str:
    return os.environ.get(DEVICE_ENV, DEFAULT_PATH)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (skipped without one unless PYKVM_REQUIRE_KVM=1)")


def _kvm_problem() -> str | None:
    try:
        host_info(_device())
    except KvmUnavailableError as err:
        return str(err)
    return None


@pytest.fixture(scope="session")
def kvm_host() -> dict[str, Any]:
    problem = _kvm_problem()
    if problem is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but KVM is unusable: {problem}", pytrace=False)
        pytest.skip(f"KVM is unusable: {problem}")
    return host_info(_device())


@pytest.fixture(autouse=True)
def _pykvm_kvm_marker(request: pytest.FixtureRequest) -> None:
    """Give tests marked ``kvm`` the ``kvm_host`` check (skip, or fail under PYKVM_REQUIRE_KVM=1)."""
    if request.node.get_closest_marker("kvm") is not None:
        request.getfixturevalue("kvm_host")


@pytest.fixture
def machine_factory(kvm_host: dict[str, Any]) -> Iterator[Callable[..., Machine]]:
    machines: list[Machine] = []

    def make(**config: Any) -> Machine:
        config.setdefault("capture_serial", True)
        config.setdefault("kvm_path", _device())
        machine = Machine(**config)
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        machine.close()


@pytest.fixture
def run_guest(machine_factory: Callable[..., Machine]) -> Callable[..., RunResult]:
    def run(path: str | Path, timeout: float = 30, memory: str | int = "64M", **load: Any) -> RunResult:
        machine = machine_factory(memory=memory)
        machine.load(path, **load)
        return machine.run(timeout=timeout)

    return run

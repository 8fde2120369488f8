"""pytest plugin: fixtures that boot guests, and clean skips where /dev/kvm is absent.

Installed with pykvm (entry point ``pytest11``), it gives every test suite:

* the ``kvm`` marker: a test marked ``@pytest.mark.kvm`` (or using the fixtures
  below) is skipped when the KVM device cannot be used, with the reason; set
  ``PYKVM_REQUIRE_KVM=1`` (as CI does) to make that a failure instead.
  ``PYKVM_DEVICE`` names another device than ``/dev/kvm``;
* ``kvm_host``: the :func:`pykvm.info.host_info` of this host;
* ``machine_factory``: ``machine_factory(memory="64M", cpus=2, ...)`` returns a
  :class:`~pykvm.machine.Machine` (serial captured), closed after the test; its
  ``run()`` stops the guest after the ``pykvm_timeout`` ini value (60 s unless set)
  when it is given no timeout, so a stuck guest fails the test instead of hanging it;
* ``run_guest``: ``run_guest(path, timeout=..., **options)`` boots an image on a fresh
  machine and returns its :class:`~pykvm.result.RunResult`.  Each option goes where its
  name belongs: a :class:`~pykvm.config.MachineConfig` field (``memory``, ``cpus``,
  ``disks``...) builds the machine, a :meth:`~pykvm.machine.Machine.load` option
  (``mode``, ``cmdline``, ``format``...) loads the image; another name is a TypeError.

The serial output of every machine a test used is added to the test's report as captured
stdout: pytest shows it with a failure, and JUnit XML has it in ``<system-out>`` when
``junit_logging`` is ``system-out`` (or ``all``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .config import MachineConfig
from .errors import KvmUnavailableError
from .info import host_info
from .kvm.system import DEFAULT_PATH
from .machine import Machine
from .result import RunResult

REQUIRE_ENV = "PYKVM_REQUIRE_KVM"
DEVICE_ENV = "PYKVM_DEVICE"  # the KVM device to use, as for the pykvm command
TIMEOUT_INI = "pykvm_timeout"
MACHINE_OPTIONS = frozenset(field.name for field in dataclasses.fields(MachineConfig))
LOAD_OPTIONS = frozenset(
    name for name, parameter in inspect.signature(Machine.load).parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
)
_MACHINES = pytest.StashKey[list[Machine]]()
_TIMEOUT = pytest.StashKey[float]()


def _device() -> str:
    return os.environ.get(DEVICE_ENV, DEFAULT_PATH)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(TIMEOUT_INI, "seconds a pykvm guest may run when the test gives no timeout (default 60)", default="60")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: needs a usable /dev/kvm (skipped without one unless PYKVM_REQUIRE_KVM=1)")
    config.stash[_TIMEOUT] = _default_timeout(config)


def _kvm_problem() -> str | None:
    device = _device()
    try:
        host_info(device)
    except KvmUnavailableError as err:
        if device == DEFAULT_PATH:
            return str(err)
        if not os.path.lexists(device):
            return f"{DEVICE_ENV}={device}: no such device (unset {DEVICE_ENV} to use {DEFAULT_PATH})"
        return f"{DEVICE_ENV}={device}: {err.reason}"
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


class _TestMachine(Machine):
    """A machine whose run() has a default timeout: a test must end, whatever its guest does."""

    default_timeout: float = 60.0

    def run(self, timeout: float | None = None) -> RunResult:
        return super().run(self.default_timeout if timeout is None else timeout)


def _default_timeout(config: pytest.Config) -> float:
    value = config.getini(TIMEOUT_INI)
    try:
        seconds = float(value)
    except ValueError:
        raise pytest.UsageError(f"{TIMEOUT_INI} = {value!r}: write a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise pytest.UsageError(f"{TIMEOUT_INI} = {value!r}: give a finite number of seconds above 0")
    return seconds


@pytest.fixture
def machine_factory(kvm_host: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[Callable[..., Machine]]:
    machines = request.node.stash.setdefault(_MACHINES, [])
    timeout = request.config.stash[_TIMEOUT]

    def make(**config: Any) -> Machine:
        config.setdefault("capture_serial", True)
        config.setdefault("kvm_path", _device())
        machine = _TestMachine(**config)
        machine.default_timeout = timeout
        machines.append(machine)
        return machine

    yield make
    for machine in machines:
        machine.close()


@pytest.fixture
def run_guest(machine_factory: Callable[..., Machine]) -> Callable[..., RunResult]:
    def run(path: str | Path, timeout: float | None = None, **options: Any) -> RunResult:
        unknown = sorted(set(options) - MACHINE_OPTIONS - LOAD_OPTIONS)
        if unknown:
            raise TypeError(
                f"run_guest() got unknown option(s) {', '.join(unknown)}: machine options are "
                f"{', '.join(sorted(MACHINE_OPTIONS))}; load options are {', '.join(sorted(LOAD_OPTIONS))}"
            )
        machine = machine_factory(**{name: value for name, value in options.items() if name in MACHINE_OPTIONS})
        machine.load(path, **{name: value for name, value in options.items() if name in LOAD_OPTIONS})
        return machine.run(timeout=timeout)

    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Put each machine's serial output in the test's report, as captured stdout of the call."""
    machines: list[Machine] = item.stash[_MACHINES] if _MACHINES in item.stash else []
    if call.when == "call":
        for number, machine in enumerate(machines, 1):
            output = machine.serial_output.captured()
            if output:
                text = output.decode(errors="backslashreplace")
                item.add_report_section("call", "stdout", f"--- pykvm: serial output of machine {number} ---\n{text}")
    yield

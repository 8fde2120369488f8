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
  (``mode``, ``cmdline``, ``format``...) loads the image; another name is a TypeError;
* ``booted_guest`` (session-scoped): ``booted_guest(path, until=..., **options)`` boots an
  image once, saves it as a snapshot once it reaches ``until`` and returns a
  :class:`BootedGuest`, whose :meth:`~BootedGuest.fresh` gives each test the machine as saved
  (restored once, then put back by :meth:`~pykvm.machine.Machine.reset`, which rewrites only
  the pages the last test changed).  ``until`` is the bytes the guest prints when it is ready,
  or the value it writes to the debug-exit port (the run ends there; a fresh machine goes on
  after that write), or None to save the loaded image before its first instruction::

      @pytest.fixture(scope="session")
      def counter(booted_guest):
          return booted_guest("guests/build/counter.bin", until=b"count 100\n", mode="long")

      def test_counts_on(counter):
          result = counter.fresh().run()  # goes on from where the guest was saved
          assert b"count 400\n" in result.serial

The serial output of every machine a test used is added to the test's report as captured
stdout: pytest shows it with a failure, and JUnit XML has it in ``<system-out>`` when
``junit_logging`` is ``system-out`` (or ``all``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from .config import DEFAULT_KVM_PATH, MachineConfig
from .errors import KvmUnavailableError
from .info import host_info
from .machine import Machine
from .result import ExitReason, RunResult

REQUIRE_ENV = "PYKVM_REQUIRE_KVM"
DEVICE_ENV = "PYKVM_DEVICE"  # the KVM device to use, as for the pykvm command
TIMEOUT_INI = "pykvm_timeout"
MACHINE_OPTIONS = frozenset(field.name for field in dataclasses.fields(MachineConfig))
LOAD_OPTIONS = frozenset(
    name for name, parameter in inspect.signature(Machine.load).parameters.items() if parameter.kind is parameter.KEYWORD_ONLY
)
_MACHINES = pytest.StashKey[list[tuple[Machine, int]]]()  # each with where the test's serial output starts
_TIMEOUT = pytest.StashKey[float]()
_CURRENT_TEST = pytest.StashKey[pytest.Item]()
POLL_SECONDS = 0.002  # how often a booting guest's output is looked at for its marker


def _device() -> str:
    return os.environ.get(DEVICE_ENV, DEFAULT_KVM_PATH)


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
        if device == DEFAULT_KVM_PATH:
            return str(err)
        if not os.path.lexists(device):
            return f"{DEVICE_ENV}={device}: no such device (unset {DEVICE_ENV} to use {DEFAULT_KVM_PATH})"
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
        machines.append((machine, 0))
        return machine

    yield make
    for machine, _ in machines:
        machine.close()


def _split_options(caller: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (machine options, load options); another name is a TypeError."""
    unknown = sorted(set(options) - MACHINE_OPTIONS - LOAD_OPTIONS)
    if unknown:
        raise TypeError(
            f"{caller}() got unknown option(s) {', '.join(unknown)}: machine options are "
            f"{', '.join(sorted(MACHINE_OPTIONS))}; load options are {', '.join(sorted(LOAD_OPTIONS))}"
        )
    machine = {name: value for name, value in options.items() if name in MACHINE_OPTIONS}
    return machine, {name: value for name, value in options.items() if name in LOAD_OPTIONS}


@pytest.fixture
def run_guest(machine_factory: Callable[..., Machine]) -> Callable[..., RunResult]:
    def run(path: str | Path, timeout: float | None = None, **options: Any) -> RunResult:
        machine_options, load_options = _split_options("run_guest", options)
        machine = machine_factory(**machine_options)
        machine.load(path, **load_options)
        return machine.run(timeout=timeout)

    return run


class BootedGuest:
    """A guest booted once and saved as a snapshot (see the ``booted_guest`` fixture).

    Attributes:
        snapshot: the snapshot directory (``Machine.restore(guest.snapshot)`` makes more).
        boot_output: what the guest printed before it was saved.
    """

    def __init__(self, snapshot: Path, boot_output: bytes, config: pytest.Config) -> None:
        self.snapshot, self.boot_output = snapshot, boot_output
        self._config = config
        self._machine: _TestMachine | None = None

    def fresh(self) -> Machine:
        """The machine as saved, for the test that calls it; its serial output goes in that test's report.

        One machine serves every test, put back by :meth:`~pykvm.machine.Machine.reset` (a test
        that closed it gets a newly restored one).  Disk images are not put back: give the
        guest none it writes, or copies of its own.
        """
        machine = self._machine
        if machine is None or machine.closed:
            machine = self._machine = _TestMachine.restore(self.snapshot, kvm_path=_device(), capture_serial=True,
                                                           resettable=True)  # fmt: skip
            machine.default_timeout = self._config.stash[_TIMEOUT]
        else:
            _end_run(machine, self._config.stash[_TIMEOUT])
            machine.reset()
        test = self._config.stash.get(_CURRENT_TEST, None)
        if test is not None:
            test.stash.setdefault(_MACHINES, []).append((machine, machine.serial_output.captured_size()))
        return machine

    def close(self) -> None:
        if self._machine is not None:
            self._machine.close()


def _end_run(machine: Machine, timeout: float) -> None:
    """Stop a run a test left going (on a thread of its own) and wait for it to end."""
    if not machine.running:
        return
    machine.stop()
    deadline = time.monotonic() + timeout
    while machine.running:
        if time.monotonic() > deadline:
            pytest.fail(f"the last test's run of this guest did not stop within {timeout:g} s", pytrace=False)
        time.sleep(POLL_SECONDS)


@pytest.fixture(scope="session")
def booted_guest(kvm_host: dict[str, Any], tmp_path_factory: pytest.TempPathFactory,
                 pytestconfig: pytest.Config) -> Iterator[Callable[..., BootedGuest]]:  # fmt: skip
    guests: list[BootedGuest] = []

    def boot(path: str | Path, until: bytes | int | None = None, timeout: float | None = None,
             **options: Any) -> BootedGuest:  # fmt: skip
        machine_options, load_options = _split_options("booted_guest", options)
        machine_options.update(capture_serial=True, kvm_path=_device())
        directory = tmp_path_factory.mktemp("pykvm-booted") / "snapshot"
        with Machine(**machine_options) as machine:
            machine.load(path, **load_options)
            with _stopped_at(machine, until, timeout or pytestconfig.stash[_TIMEOUT], path):
                machine.snapshot(directory)
            guests.append(BootedGuest(directory, machine.serial_output.captured() or b"", pytestconfig))
        return guests[-1]

    yield boot
    for guest in guests:
        guest.close()


@contextlib.contextmanager
def _stopped_at(machine: Machine, until: bytes | int | None, timeout: float, path: str | Path) -> Iterator[None]:
    """Inside, ``machine`` is held where ``until`` says (see ``booted_guest``); a guest that never
    gets there fails the test.  Afterwards no run is going."""
    if until is None:
        yield
    elif isinstance(until, int):
        result = machine.run(timeout)
        if result.reason is not ExitReason.DEBUG_EXIT or result.exit_value != until:
            _not_ready(machine, path, f"never wrote {until:#x} to the debug-exit port", result)
        yield
    else:
        with _running(machine, timeout) as outcome:
            marker = bytes(until)
            if not _paused_at_output(machine, marker, outcome):
                seen = marker in (machine.serial_output.captured() or b"")
                why = f"ended right after printing {marker!r}" if seen else f"never printed {marker!r}"
                _not_ready(machine, path, why, _result(outcome))
            yield


@contextlib.contextmanager
def _running(machine: Machine, timeout: float) -> Iterator[list[RunResult | BaseException]]:
    """Run ``machine`` on a thread inside; the list gets how the run ended.  Afterwards it is over."""
    outcome: list[RunResult | BaseException] = []

    def run() -> None:
        try:
            outcome.append(machine.run(timeout))
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=run, name="pykvm-boot", daemon=True)
    thread.start()
    try:
        yield outcome
    finally:
        machine.stop()
        thread.join()


def _paused_at_output(machine: Machine, marker: bytes, outcome: list[RunResult | BaseException]) -> bool:
    """Wait until the serial output holds ``marker``, then pause the run: False if it ends first."""
    searched = 0
    while not outcome:
        output = machine.serial_output.captured(searched) or b""
        if marker in output and machine.pause():
            return True
        searched += max(0, len(output) - len(marker) + 1)
        time.sleep(POLL_SECONDS)
    return False


def _result(outcome: list[RunResult | BaseException]) -> RunResult:
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _not_ready(machine: Machine, path: str | Path, why: str, result: RunResult) -> None:
    tail = (machine.serial_output.captured() or b"")[-400:].decode(errors="backslashreplace")
    pytest.fail(f"{path} {why}: {result.diagnosis} (status {result.status}); its last output: {tail!r}",
                pytrace=False)  # fmt: skip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """Note which test runs, for :meth:`BootedGuest.fresh` to give it the machine's output."""
    item.config.stash[_CURRENT_TEST] = item
    try:
        yield
    finally:
        del item.config.stash[_CURRENT_TEST]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Put each machine's serial output in the test's report, as captured stdout of the call."""
    machines = item.stash[_MACHINES] if _MACHINES in item.stash else []
    if call.when == "call":
        for number, (machine, start) in enumerate(machines, 1):
            output = machine.serial_output.captured(start)
            if output:
                text = output.decode(errors="backslashreplace")
                item.add_report_section("call", "stdout", f"--- pykvm: serial output of machine {number} ---\n{text}")
    yield

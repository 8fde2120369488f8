"""The library API: lifecycle, watchdog, several machines, and hostile or mistaken input."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from conftest import guest
from pykvm import Machine, MachineConfig
from pykvm.errors import BusError, ConfigError, ImageError, PykvmError
from pykvm.kvm.exits import FailEntryExit, OtherExit
from pykvm.control import RunControl, Stop
from pykvm.result import ExitReason, status_of
from pykvm.runner import RunObserver

pytestmark = pytest.mark.kvm

SPIN = b"\xeb\xfe"  # jmp $
VMCALL_THEN_SPIN = b"\x0f\x01\xc1\xeb\xfe"  # vmcall hangs this backend's vCPU; hardware returns


def spin_image(tmp_path, code: bytes = SPIN):
    path = tmp_path / "spin.bin"
    path.write_bytes(code)
    return path


@pytest.mark.parametrize(
    "code, options",
    [(SPIN, {}), (SPIN, {"mode": "long"}), (SPIN, {"mode": "long", "user": True}), (VMCALL_THEN_SPIN, {"mode": "long"})],
    ids=["real-mode-loop", "cpl0-loop", "cpl3-native-loop", "vmcall"],
)
def test_the_watchdog_always_returns(machine_factory, tmp_path, code, options) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path, code), **options)
    started = time.monotonic()
    result = machine.run(timeout=1)
    assert (result.reason, result.status) == (ExitReason.TIMEOUT, 124)
    assert time.monotonic() - started < 30  # generous: the point is that it returns
    assert "still running after 1 s" in result.diagnosis and result.regs is not None


def test_a_machine_can_run_again_after_a_timeout(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path), mode="long")
    assert machine.run(timeout=0.5).reason is ExitReason.TIMEOUT
    assert machine.run(timeout=0.5).reason is ExitReason.TIMEOUT


def test_several_machines_in_one_process_run_in_threads(machine_factory) -> None:
    images = ["hello_real.bin", "exit_code.bin", "hello_long.elf", "cpl3.bin"]
    machines = [machine_factory() for _ in images]
    for machine, image in zip(machines, images):
        machine.load(guest(image), mode="long" if image == "cpl3.bin" else None)
    results: dict[str, object] = {}

    def run(machine: Machine, image: str) -> None:
        results[image] = machine.run(timeout=60)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(machines, images)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["hello_real.bin"].serial == b"Hello from real mode\n"
    assert results["exit_code.bin"].status == 85
    assert results["hello_long.elf"].serial == b"Hello from long mode\n"
    assert results["cpl3.bin"].serial.startswith(b"cpl3 sum=5000000050000000")


def test_config_object_and_keyword_options_build_the_same_machine(kvm_host) -> None:
    with Machine(MachineConfig(memory="32M"), capture_serial=True) as machine:
        assert machine.memory.size == 32 << 20 and machine.config.capture_serial


def test_running_before_loading_is_an_error(machine_factory) -> None:
    with pytest.raises(PykvmError, match="load a guest image"):
        machine_factory().run()


@pytest.mark.parametrize("memory", ["1M", "3001K", "x"])
def test_bad_memory_sizes(kvm_host, memory) -> None:
    with pytest.raises(ConfigError):
        Machine(memory=memory)


def test_a_kernel_that_does_not_fit_in_guest_memory(machine_factory, tmp_path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(3 << 20))
    with pytest.raises(ImageError, match="does not fit in guest RAM"):
        machine_factory(memory="2M").load(big, mode="long")


def test_close_is_idempotent_and_context_manager_closes(kvm_host) -> None:
    machine = Machine()
    machine.close()
    machine.close()
    with Machine() as machine:
        pass
    assert machine.closed and machine.memory.regions == []
    with pytest.raises(PykvmError, match="this machine is closed"):
        machine.load(guest("hello_real.bin"))


def test_an_image_given_as_bytes_runs_like_its_file(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("hello_long.elf").read_bytes())
    assert machine.run(timeout=60).serial == b"Hello from long mode\n"


def test_a_machine_with_no_snapshot_has_nothing_to_clone(machine_factory) -> None:
    with pytest.raises(PykvmError, match="nothing to clone"):
        machine_factory().clone()


@pytest.mark.parametrize(
    "exit, reason, status, words",
    [
        (FailEntryExit(reason=0x21, cpu=1), ExitReason.FAIL_ENTRY, 118, "hardware entry failure reason 0x21"),
        (OtherExit(reason=7), ExitReason.UNHANDLED, 112, "unhandled exit irq_window_open"),
    ],
)
def test_exits_this_host_cannot_produce_map_to_their_documented_status(machine_factory, exit, reason, status, words) -> None:
    # KVM_EXIT_FAIL_ENTRY never happens on kvm_pvm (PLATFORM.md): the dispatcher is handed the decoded exit.
    machine = machine_factory()
    control = RunControl(machine.vcpus)
    machine.dispatch.handle(machine.vcpus[0], exit, control)
    assert control.stop.reason is reason and status_of(reason) == status
    assert words in control.stop.diagnosis and control.stop.with_registers


def test_a_serial_output_that_fails_in_the_c_path_is_reported_once(kvm_host, tmp_path, caplog) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # every write now fails with EPIPE (Python ignores SIGPIPE)
    with Machine(serial=f"/proc/self/fd/{writer}") as machine:
        machine.load(guest("hello_long.elf"))
        with caplog.at_level("WARNING", logger="pykvm.machine"):
            result = machine.run(timeout=30)
            machine.load(guest("hello_long.elf"))
            machine.run(timeout=30)
    os.close(writer)
    assert result.status == 1  # the guest is unaffected
    warnings = [r.getMessage() for r in caplog.records if r.name == "pykvm.machine"]
    assert warnings == ["serial output failed (Broken pipe); no longer writing there"]


@pytest.mark.parametrize("options", [{"mode": "long"}, {"mode": "long", "user": True}], ids=["cpl0", "cpl3"])
def test_stop_from_another_thread_ends_a_spinning_guest(machine_factory, tmp_path, options) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path), **options)
    stopper = threading.Timer(0.3, machine.stop)
    stopper.start()
    result = machine.run(timeout=60)
    stopper.join()
    assert (result.reason, result.status, result.diagnosis.split(" at rip")[0]) == (ExitReason.STOPPED, 130, "stopped")
    assert result.regs is not None


def test_stop_before_run_ends_the_next_run_at_once_with_the_signals_status(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path), mode="long")
    machine.stop(signal_number=15)
    result = machine.run(timeout=60)
    assert (result.reason, result.status) == (ExitReason.STOPPED, 143)
    assert result.diagnosis.startswith("stopped by SIGTERM")
    assert machine.run(timeout=0.3).reason is ExitReason.TIMEOUT  # the request was used up


COUNT_AT_CPL3 = b"\x48\xff\xc0\xeb\xfb"  # inc rax; jmp back to it


def wait_until(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never came true"
        time.sleep(0.01)


def test_a_paused_run_executes_nothing_until_resumed_and_stop_still_wins(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path, COUNT_AT_CPL3), mode="long", user=True)
    results = []
    runner = threading.Thread(target=lambda: results.append(machine.run(timeout=120)))
    runner.start()
    try:
        time.sleep(0.2)
        assert machine.pause(timeout=30)
        first = machine.vcpus[0].get_regs().rax
        time.sleep(0.3)
        assert machine.vcpus[0].get_regs().rax == first  # held: the guest's loop made no progress
        machine.resume()
        time.sleep(0.2)
        assert machine.pause(timeout=30)
        assert machine.vcpus[0].get_regs().rax > first  # it ran between the pauses
    finally:
        machine.stop()
        runner.join(60)
    assert not runner.is_alive() and results[0].reason is ExitReason.STOPPED


class HoldingObserver(RunObserver):
    """Holds every vCPU before the first instruction, as a debugger waiting for gdb does."""

    def __init__(self) -> None:
        self.controls: list[RunControl] = []
        self.stops: list[Stop] = []

    def run_started(self, control: RunControl) -> None:
        control.hold()
        self.controls.append(control)

    def run_stopped(self, stop: Stop) -> None:
        self.stops.append(stop)

    def handle_exit(self, vcpu, exit, control) -> bool:  # type: ignore[no-untyped-def]
        return False


def test_a_run_held_from_its_start_executes_nothing_until_resumed(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path, COUNT_AT_CPL3), mode="long", user=True)
    observer = HoldingObserver()
    machine.attach_debugger(observer)  # type: ignore[arg-type]
    results = []
    runner = threading.Thread(target=lambda: results.append(machine.run(timeout=120)))
    runner.start()
    try:
        wait_until(lambda: observer.controls)
        assert observer.controls[0].wait_parked(30)
        vcpu = machine.vcpus[0]
        assert vcpu.guest_ns == 0 and vcpu.get_regs().rax == 0  # parked before its first KVM_RUN
        observer.controls[0].resume()
        wait_until(lambda: vcpu.guest_ns > 0)  # it has been in the guest (the halt probe brings it out now and then)
        assert machine.pause(timeout=30)
        assert vcpu.get_regs().rax > 0  # it ran once resumed
    finally:
        machine.stop()
        runner.join(60)
    assert results[0].reason is ExitReason.STOPPED
    assert [stop.reason for stop in observer.stops] == [ExitReason.STOPPED]


def test_pause_without_a_run_says_so(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path), mode="long")
    assert machine.pause(timeout=1) is False
    machine.resume()  # harmless


def test_status_says_whether_it_runs_and_where_each_vcpu_is(machine_factory, tmp_path) -> None:
    machine = machine_factory()
    machine.load(spin_image(tmp_path, COUNT_AT_CPL3), mode="long", user=True)
    before = machine.status()
    assert (before.state, before.uptime) == ("created", 0.0)
    run = threading.Thread(target=machine.run, kwargs={"timeout": 120})
    run.start()
    try:
        time.sleep(0.2)
        status = machine.status()
        assert status.state == "running" and status.uptime > 0
        (vcpu,) = status.vcpus
        assert (vcpu.id, vcpu.mode, vcpu.cpl) == (0, "long", 3) and vcpu.rip >= 0x100000
        machine.pause(timeout=30)
        assert machine.status().state == "paused"
        machine.resume()
    finally:
        machine.stop()
        run.join(60)
    assert machine.status().state == "stopped"


def test_lifecycle_events_reach_listeners_and_a_json_lines_file(machine_factory, tmp_path) -> None:
    from pykvm.events import JsonLinesWriter

    machine = machine_factory()
    machine.load(guest("exit_code.bin"))
    seen = []
    machine.events.listen(seen.append)
    writer = JsonLinesWriter(str(tmp_path / "events.jsonl"))
    machine.events.listen(writer)
    result = machine.run(timeout=30)
    machine.snapshot(tmp_path / "snap")
    writer.close()
    assert [event.name for event in seen] == ["started", "ended", "snapshot"]
    assert seen[1].properties["status"] == result.status
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [line["event"] for line in lines] == ["started", "ended", "snapshot"] and all("timestamp" in line for line in lines)


def test_a_listener_that_fails_is_dropped_and_the_machine_goes_on(machine_factory) -> None:
    machine = machine_factory()
    machine.load(guest("exit_code.bin"))

    def broken(event: object) -> None:
        raise RuntimeError("listener bug")

    machine.events.listen(broken)
    assert machine.run(timeout=30).reason is ExitReason.DEBUG_EXIT
    assert machine.run(timeout=30).reason is ExitReason.HALTED  # it goes on after its exit, and halts


def test_the_package_exports_its_api_and_imports_it_only_when_used() -> None:
    import subprocess
    import sys

    code = "import sys, pykvm; print('pykvm.machine' in sys.modules); print(pykvm.Machine.__name__, pykvm.Kvm.__name__, pykvm.Device.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "Machine", "Kvm", "Device"]


class _Register:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


@pytest.mark.parametrize(
    "base, what", [(0x100000, "guest RAM"), (0xFEC00000, "the in-kernel IOAPIC"), (0xFEE00000, "the in-kernel LAPIC")]
)
def test_an_mmio_device_where_the_guest_never_exits_is_refused_in_one_line(machine_factory, base: int, what: str) -> None:
    machine = machine_factory(memory="64M")
    with pytest.raises(BusError, match=f"overlaps {what} .*never reach a device") as refused:
        machine.mmio.register(base, 0x1000, _Register())
    assert "\n" not in str(refused.value)
    machine.mmio.register(0xC0000000, 0x1000, _Register())  # above RAM, below the MMIO windows

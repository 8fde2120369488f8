"""The device state contract (pykvm.devices.state), for every legacy device with state.

Each device is driven by guest accesses (random ones from hypothesis, and a hand-written
busy start), saved, built anew with the same configuration, and restored.  Then:

- the restored device saves the same state, and the state is plain data;
- the same next accesses get the same answers and the same side effects from both
  devices (output bytes, interrupt levels, fast-path changes, reset and poweroff
  requests), and leave both in the same state;
- an invalid state (a wrong type, an out-of-range value, an oversized queue, another
  device's record) raises StateError, changes nothing and calls nothing; and whatever
  junk a field holds, a restore either takes the state whole or raises StateError.

Clocks: the saved device's clock and the restored device's are separate fake clocks.  The
RTC follows the host's clock, so both see the host time move on by ``PAUSE`` (the time
the machine spent saved); the PM timer continues from its saved count, so the restored
device's clock starts somewhere unrelated and the saved device's clock does not move.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices import cmos, i8042, uart
from pykvm.devices.acpi_pm import (
    PM1_CNT_OFFSET,
    PM1_EN_OFFSET,
    PM1_STS_OFFSET,
    PM_TMR_OFFSET,
    RTC_EN,
    SLP_EN,
    SLP_TYP_S3,
    SLP_TYP_S5,
    SLP_TYP_SHIFT,
    TMR_STS,
    AcpiPm,
)
from pykvm.devices.cmos import Cmos, CmosState
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.fw_cfg import FW_CFG_CMDLINE_DATA, FW_CFG_FILE_DIR, FwCfg, standard_items
from pykvm.devices.i8042 import I8042
from pykvm.devices.ports import ConstantPort, size_mask
from pykvm.devices.state import Stateful
from pykvm.devices.uart import RX_STATE_LIMIT, Uart16550
from pykvm.errors import StateError
from pykvm.x86.e820 import build_memory_map

SECOND = 1_000_000_000
START = 1_795_000_000 * SECOND  # the host clock when the first device is built (UTC, late 2026)
PAUSE = 3 * 24 * 3600 * SECOND + 123_456_789  # how long the machine stays saved
UNRELATED = 42  # another host's monotonic clock at the restore
RAM_SIZE = 64 << 20
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Op = tuple[Any, ...]


class Clock:
    """A host clock the test moves by hand (nanoseconds)."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclasses.dataclass(frozen=True)
class Kind:
    """One device model: how a machine builds it, what a guest does to it, how its clock restores."""

    name: str
    build: Callable[[Rig], Any]
    ops: st.SearchStrategy[Op]
    busy: tuple[Op, ...]  # accesses that leave a state far from the reset state
    follows_host_clock: bool = False


class Rig:
    """A device wired as a machine wires it, with every callback and read answer in ``log``."""

    def __init__(self, kind: Kind, now: int) -> None:
        self.clock = Clock(now)
        self.log: list[Op] = []
        self.device = kind.build(self)

    def note(self, *event: object) -> None:
        self.log.append(event)

    def run(self, ops: list[Op] | tuple[Op, ...]) -> None:
        for op in ops:
            match op:
                case ("read", offset, size):
                    self.note("read", offset, size, self.device.read(offset, size))
                case ("write", offset, size, value):
                    self.device.write(offset, size, value & size_mask(size))
                case ("receive", data):
                    self.device.receive(data)
                case ("break",):
                    self.device.receive_break()
                case ("advance", nanoseconds):
                    self.clock.now += nanoseconds
                case ("call", method, *args):  # what the machine asks of the device
                    self.note("call", method, getattr(self.device, method)(*args))


def restored_beside(kind: Kind, saved: Rig) -> Rig:
    """A device built anew to take ``saved``'s state, its host clock as ``kind`` restores."""
    if kind.follows_host_clock:
        saved.clock.now += PAUSE
        return Rig(kind, saved.clock.now)
    return Rig(kind, UNRELATED)


# --- what a guest does to each device ----------------------------------------------------------

SIZES = st.sampled_from((1, 1, 1, 1, 2, 4))


def accesses(offsets: st.SearchStrategy[int], values: st.SearchStrategy[int] = st.integers(0, 0xFFFF_FFFF)) -> Any:
    return st.one_of(
        st.tuples(st.just("read"), offsets, SIZES),
        st.tuples(st.just("write"), offsets, SIZES, values),
    )


def writes(offset: int, values: st.SearchStrategy[int]) -> Any:
    return st.tuples(st.just("write"), st.just(offset), st.just(1), values)


def chosen(*ops: Op) -> Any:
    """Accesses that matter to a driver, which random values seldom hit."""
    return st.sampled_from(ops)


def read(offset: int, size: int = 1) -> Op:
    return ("read", offset, size)


def write(offset: int, value: int, size: int = 1) -> Op:
    return ("write", offset, size, value)


def advances(scale: int, *jumps: int) -> Any:
    return st.tuples(st.just("advance"), st.one_of(st.integers(0, scale), st.sampled_from(jumps)))


def build_uart(rig: Rig) -> Uart16550:
    return Uart16550(
        functools.partial(rig.note, "output"),
        functools.partial(rig.note, "irq"),
        functools.partial(rig.note, "fast"),
    )


UART_KIND = Kind(
    "uart",
    build_uart,
    st.one_of(
        accesses(st.integers(0, uart.SCR)),
        chosen(
            write(uart.IER, uart.IER_MASK), write(uart.IER, uart.IER_ETBEI), write(uart.IER, 0), read(uart.IIR),
            write(uart.MCR, uart.MCR_OUT2), write(uart.MCR, uart.MCR_OUT2 | uart.MCR_LOOP), write(uart.MCR, 0x1F),
            write(uart.MCR, 0), write(uart.FCR, uart.FCR_FIFO_ENABLE), write(uart.FCR, 0x03), write(uart.FCR, 0),
            write(uart.LCR, uart.LCR_DLAB), write(uart.LCR, 0x03), write(uart.THR, 0x41), read(uart.RBR),
            read(uart.LSR), read(uart.MSR),
        ),
        st.tuples(st.just("receive"), st.binary(max_size=24)),
        st.just(("break",)),
    ),
    busy=(
        write(uart.LCR, uart.LCR_DLAB | 0x03), write(uart.DLL, 0x01), write(uart.DLM, 0x00), write(uart.LCR, 0x03),
        write(uart.FCR, 0xC1), write(uart.IER, 0x0F), write(uart.MCR, 0x0B), write(uart.SCR, 0x5A),
        ("receive", b"hello"), ("break",), ("receive", b"!"), read(uart.RBR), write(uart.THR, ord("x")),
        write(uart.MCR, uart.MCR_LOOP | uart.MCR_OUT2), *(write(uart.THR, byte) for byte in b"0123456789y"),
    ),  # the last byte overruns the FIFO
)  # fmt: skip


def build_cmos(rig: Rig) -> Cmos:
    return Cmos(RAM_SIZE, clock=rig.clock, irq=functools.partial(rig.note, "irq"))


CMOS_INDICES = st.one_of(
    st.sampled_from(sorted(cmos.TIME_REGISTERS | {cmos.REG_A, cmos.REG_B, cmos.REG_C, cmos.REG_D})),
    st.integers(0, 0xFF),
)
CMOS_VALUES = st.one_of(
    st.integers(0, 0xFF),
    st.integers(0, 0x31),  # often a valid BCD date or time field
    st.sampled_from((cmos.REG_B_SET | cmos.REG_B_24H, cmos.REG_B_SET | cmos.REG_B_DM, cmos.REG_B_24H, 0)),  # register B
)
CMOS_KIND = Kind(
    "cmos",
    build_cmos,
    st.one_of(
        writes(cmos.INDEX_PORT, CMOS_INDICES),
        writes(cmos.DATA_PORT, CMOS_VALUES),
        st.builds(lambda index, value: write(cmos.INDEX_PORT, index | value << 8, 2), CMOS_INDICES, CMOS_VALUES),
        st.just(read(cmos.DATA_PORT)),
        accesses(st.integers(0, 1)),
        advances(3 * SECOND, 3600 * SECOND, 400 * 24 * 3600 * SECOND),
        chosen(write(cmos.INDEX_PORT, cmos.REG_C), write(cmos.DATA_PORT, cmos.REG_B_AIE | cmos.REG_B_24H),
               ("call", "alarm_delay_ns"), ("call", "ring_alarm")),  # fmt: skip
    ),
    busy=(
        write(cmos.INDEX_PORT, cmos.REG_B), write(cmos.DATA_PORT, cmos.REG_B_SET | cmos.REG_B_24H),
        write(cmos.INDEX_PORT, cmos.YEAR), write(cmos.DATA_PORT, 0x31),
        write(cmos.INDEX_PORT, cmos.REG_B), write(cmos.DATA_PORT, cmos.REG_B_24H),
        write(cmos.INDEX_PORT, 0x40), write(cmos.DATA_PORT, 0xAB),
        write(cmos.INDEX_PORT, cmos.REG_B), write(cmos.DATA_PORT, cmos.REG_B_SET | cmos.REG_B_DM),
        write(cmos.INDEX_PORT, cmos.MINUTES), write(cmos.DATA_PORT, 17),
        write(cmos.INDEX_PORT, cmos.NMI_DISABLE | cmos.SECONDS),
        write(cmos.INDEX_PORT, cmos.REG_B), write(cmos.DATA_PORT, cmos.REG_B_AIE | cmos.REG_B_24H),
        write(cmos.INDEX_PORT, cmos.SECONDS_ALARM), write(cmos.DATA_PORT, 0x30),
        ("call", "alarm_delay_ns"), ("call", "ring_alarm"), write(cmos.INDEX_PORT, cmos.REG_A), read(cmos.DATA_PORT),
    ),
    follows_host_clock=True,
)  # fmt: skip


def build_i8042(rig: Rig) -> I8042:
    return I8042(functools.partial(rig.note, "reset"))


I8042_COMMANDS = st.one_of(
    st.sampled_from((0x20, 0x60, 0xAA, 0xAB, 0xAD, 0xAE, 0xD0, 0xD1, 0xFE, 0xFF)), st.integers(0, 0xFF)
)
I8042_KIND = Kind(
    "i8042",
    build_i8042,
    st.one_of(
        writes(i8042.COMMAND_PORT, I8042_COMMANDS),
        writes(i8042.DATA_PORT, st.integers(0, 0xFF)),
        st.sampled_from((read(i8042.DATA_PORT), read(i8042.STATUS_PORT))),
        accesses(st.integers(0, i8042.STATUS_PORT)),
    ),
    busy=(
        write(i8042.COMMAND_PORT, i8042.CMD_KBD_DISABLE), write(i8042.COMMAND_PORT, i8042.CMD_WRITE_CTR),
        write(i8042.DATA_PORT, 0x55), write(i8042.COMMAND_PORT, i8042.CMD_READ_OUTPUT_PORT),
        write(i8042.COMMAND_PORT, i8042.CMD_WRITE_OUTPUT_PORT),
    ),
)  # fmt: skip


def build_acpi_pm(rig: Rig) -> AcpiPm:
    return AcpiPm(functools.partial(rig.note, "poweroff"), functools.partial(rig.note, "suspend"), clock=rig.clock)


ACPI_PM_KIND = Kind(
    "acpi_pm",
    build_acpi_pm,
    st.one_of(
        accesses(st.integers(0, AcpiPm.SIZE - 1), st.one_of(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF_FFFF))),
        chosen(
            read(PM1_STS_OFFSET, 2), write(PM1_STS_OFFSET, TMR_STS, 2), write(PM1_EN_OFFSET, 0x0121, 2),
            write(PM1_CNT_OFFSET, 3 << SLP_TYP_SHIFT, 2),
            write(PM1_CNT_OFFSET, SLP_EN | SLP_TYP_S3 << SLP_TYP_SHIFT, 2),
            write(PM1_CNT_OFFSET, SLP_EN | SLP_TYP_S5 << SLP_TYP_SHIFT, 2), read(PM_TMR_OFFSET, 4),
            write(PM1_EN_OFFSET, RTC_EN, 2), ("call", "wake", True), ("call", "wake", False),
        ),
        advances(SECOND, 300 * SECOND, 600 * SECOND, 1200 * SECOND),  # the timer's top bit flips every 600 s
    ),
    busy=(
        ("advance", 700 * SECOND), write(PM1_EN_OFFSET, 0x0101, 2), write(PM1_CNT_OFFSET, 3 << 10, 2),
        read(PM1_STS_OFFSET, 2), write(PM1_STS_OFFSET, TMR_STS, 2), ("advance", 600 * SECOND + 123),
        read(PM1_STS_OFFSET, 2), read(PM_TMR_OFFSET, 4), write(PM1_EN_OFFSET, RTC_EN, 2),
        write(PM1_CNT_OFFSET, SLP_EN | SLP_TYP_S3 << SLP_TYP_SHIFT, 2),
    ),
)  # fmt: skip


def build_fw_cfg(rig: Rig) -> FwCfg:
    fw_cfg = FwCfg()
    standard_items(fw_cfg, cpus=1, max_cpus=2, ram_size=RAM_SIZE, cmdline="console=ttyS0",
                   memory_map=build_memory_map(RAM_SIZE), acpi=None)  # fmt: skip
    fw_cfg.add_file("opt/pykvm/test", b"0123456789")
    return fw_cfg


FW_CFG_KEYS = st.one_of(st.sampled_from((0x00, 0x01, 0x03, 0x05, 0x15, 0x19, 0x20, 0x21, 0x8000, 0x4001)),
                        st.integers(0, 0xFFFF))  # fmt: skip
FW_CFG_KIND = Kind(
    "fw_cfg",
    build_fw_cfg,
    st.one_of(
        st.tuples(st.just("write"), st.just(0), st.just(2), FW_CFG_KEYS),
        st.just(read(1)),
        accesses(st.integers(0, 1)),
    ),
    busy=(write(0, FW_CFG_CMDLINE_DATA, 2), read(1), read(1), read(1)),
)

KINDS = (UART_KIND, CMOS_KIND, I8042_KIND, ACPI_PM_KIND, FW_CFG_KIND)
by_name = pytest.mark.parametrize("kind", KINDS, ids=lambda kind: kind.name)


def busy(kind: Kind) -> Rig:
    rig = Rig(kind, START)
    rig.run(kind.busy)
    return rig


def assert_plain(value: object) -> None:
    """Frozen records of ints, bools, strs, bytes, None and tuples of these, all the way down."""
    if dataclasses.is_dataclass(value):
        assert type(value).__dataclass_params__.frozen  # type: ignore[attr-defined]
        for field in dataclasses.fields(value):
            assert_plain(getattr(value, field.name))
    elif isinstance(value, tuple):
        for item in value:
            assert_plain(item)
    else:
        assert value is None or type(value) in (int, bool, str, bytes), f"{value!r} is not plain data"


def assert_restores_alike(kind: Kind, saved: Rig, after: list[Op] | tuple[Op, ...]) -> None:
    state = saved.device.save_state()
    assert_plain(state)
    restored = restored_beside(kind, saved)
    restored.device.restore_state(state)
    assert restored.device.save_state() == state
    saved.log.clear()
    restored.log.clear()
    saved.run(after)
    restored.run(after)
    assert restored.log == saved.log
    assert restored.device.save_state() == saved.device.save_state()


# --- round trips ----------------------------------------------------------------------------------


@by_name
@SETTINGS
@given(data=st.data())
def test_a_restored_device_answers_every_access_as_the_saved_one(kind: Kind, data: st.DataObject) -> None:
    saved = Rig(kind, START)
    saved.run(data.draw(st.lists(kind.ops, max_size=60), label="before the save"))
    assert_restores_alike(kind, saved, data.draw(st.lists(kind.ops, max_size=60), label="after the restore"))


@by_name
def test_a_busy_device_restores_and_answers_as_the_saved_one(kind: Kind) -> None:
    saved = busy(kind)
    assert saved.device.save_state() != Rig(kind, START).device.save_state()
    assert_restores_alike(kind, saved, kind.busy + kind.busy)


@by_name
def test_devices_with_state_are_stateful_and_the_others_are_not(kind: Kind) -> None:
    assert isinstance(Rig(kind, START).device, Stateful)
    assert not isinstance(DebugExit(lambda value: None), Stateful)
    assert not isinstance(ConstantPort(), Stateful)


# --- invalid states ---------------------------------------------------------------------------------

# Per device: field -> values a restore must refuse (on top of the junk every field is tried with).
INVALID: dict[str, dict[str, tuple[object, ...]]] = {
    "uart": {
        "divisor": (-1, 0x10000), "ier": (0x10,), "fcr": (uart.FCR_RCVR_FIFO_RESET, 0x100), "lcr": (0x100,),
        "mcr": (0x20,), "scr": (-1,), "rbr": (0x100,), "line_errors": (uart.LSR_DR, 0x04, 0x08),
        "msr_deltas": (uart.MSR_CTS,), "thre_pending": (1, 0), "rx": (bytes(RX_STATE_LIMIT + 1), bytearray(b"a")),
        "rx_breaks": ((99,), (0, 0)),
    },
    "cmos": {
        "index": (0x80, -1), "nmi_disabled": (0, 1),
        "ram": (bytes(127), bytes(129), bytearray(128), bytes(cmos.REG_C) + b"\x10" + bytes(127 - cmos.REG_C)),
        "rtc_offset_ns": (cmos.RTC_OFFSET_LIMIT_NS + 1, -cmos.RTC_OFFSET_LIMIT_NS - 1),
    },
    "i8042": {
        "command_byte": (0x100, -1), "output_port": (0x100,), "pending_command": (0x20, 0xD0, 0),
        "output": (0x100, -1),
    },
    "acpi_pm": {
        "sts": (0x10, 0x4000, 0x10000), "en": (0x02, 0x10000), "cnt": (0, 0x2001, 0x10001), "sleeping": (0, 1),
        "timer_ns": (-1, 1 << 63), "timer_half": (-1, 3),
    },
    "fw_cfg": {
        "selected": (-1, 0x10000, 0x40, 0x8040), "offset": (-1, 99), "items_digest": (bytes(32), bytes(31)),
    },
}  # fmt: skip
# Values no field takes; None and True too, but for the fields that do take them.
JUNK: tuple[object, ...] = (1.5, "1", [1], 10**5000, object())
OPTIONAL_FIELDS = {"pending_command", "output", "selected"}
BOOLEAN_FIELDS = {"thre_pending", "nmi_disabled", "sleeping"}


def invalid_cases() -> list[Any]:
    cases = []
    for kind in KINDS:
        fields = [field.name for field in dataclasses.fields(type(Rig(kind, START).device.save_state()))]
        assert sorted(INVALID[kind.name]) == sorted(fields), f"{kind.name}: every field needs invalid values"
        for name in fields:
            values = INVALID[kind.name][name] + JUNK
            values += () if name in OPTIONAL_FIELDS else (None,)
            values += () if name in BOOLEAN_FIELDS else (True,)
            for number, value in enumerate(values):
                ident = f"{kind.name}.{name}-{number}-{type(value).__name__}"
                cases.append(pytest.param(kind, name, value, id=ident))
    return cases


@pytest.mark.parametrize(("kind", "name", "value"), invalid_cases())
def test_an_invalid_field_is_refused_and_changes_nothing(kind: Kind, name: str, value: object) -> None:
    rig = busy(kind)
    before = rig.device.save_state()
    rig.log.clear()
    with pytest.raises(StateError) as raised:
        rig.device.restore_state(dataclasses.replace(before, **{name: value}))
    assert re.match(rf"{type(before).__name__}\.{name}(?!\w)", str(raised.value))
    assert rig.device.save_state() == before
    assert rig.log == []


@by_name
@pytest.mark.parametrize("record", [None, {"ier": 1}, CmosState(0, False, bytes(128), 0)], ids=str)
def test_another_record_is_refused(kind: Kind, record: object) -> None:
    rig = busy(kind)
    before = rig.device.save_state()
    if type(record) is type(before):
        return
    with pytest.raises(StateError, match=f"a {type(before).__name__} was expected, not {type(record).__name__}"):
        rig.device.restore_state(record)
    assert rig.device.save_state() == before


JUNK_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(1 << 70), 1 << 70), st.floats(), st.text(max_size=4),
    st.binary(max_size=200), st.tuples(st.integers()), st.tuples(st.integers(0, 200), st.integers(0, 200)),
)  # fmt: skip


@by_name
@SETTINGS
@given(data=st.data())
def test_a_restore_takes_a_state_whole_or_raises_state_error(kind: Kind, data: st.DataObject) -> None:
    rig = busy(kind)
    before = rig.device.save_state()
    name = data.draw(st.sampled_from([field.name for field in dataclasses.fields(before)]), label="field")
    state = dataclasses.replace(before, **{name: data.draw(JUNK_VALUES, label="value")})
    try:
        rig.device.restore_state(state)
    except StateError:
        assert rig.device.save_state() == before
    else:
        assert rig.device.save_state() == state


def test_error_messages_name_the_record_and_the_field_on_one_line() -> None:
    rig = busy(UART_KIND)
    with pytest.raises(StateError) as raised:
        rig.device.restore_state(dataclasses.replace(rig.device.save_state(), ier=10**5000))
    assert str(raised.value) == "UartState.ier is int too large to show, not an integer from 0 to 15"
    with pytest.raises(StateError) as raised:
        rig.device.restore_state(dataclasses.replace(rig.device.save_state(), rx="x" * 1000))
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 120


def test_fw_cfg_directory_selection_round_trips() -> None:
    saved = Rig(FW_CFG_KIND, START)
    saved.run((write(0, FW_CFG_FILE_DIR, 2), read(1), read(1), read(1), read(1), read(1)))
    assert_restores_alike(FW_CFG_KIND, saved, [read(1)] * 80)

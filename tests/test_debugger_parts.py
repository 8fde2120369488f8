"""The debugger's pure parts, without KVM: debug-register allocation, the x87/SSE register file,
the ``gdb`` options of a machine's config, and the debugging entry of ``pykvm info``."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.config import MachineConfig, MachineOptions
from pykvm.debugger import registers
from pykvm.debugger.breakpoints import DebugRegisters, _aligned
from pykvm.errors import ConfigError, StateError
from pykvm.gdbstub import BreakpointKind, StopReason, UnsupportedError
from pykvm.info import DEBUG_SUPPORT, FULL_DEBUG_SUPPORT, Privilege, debug_support, format_info
from pykvm.kvm.debug import BreakpointKind as DebugRegisterKind
from pykvm.kvm.debug import GuestDebug, HardwareBreakpoint
from pykvm.native import ffi

ONE = 0x3FFF_8000_0000_0000_0000  # 1.0 as an x87 80-bit value
NAN = 0x7FFF_C000_0000_0000_0000
DENORMAL = 0x0000_0000_0000_0000_0001


# --- debug registers -------------------------------------------------------------------------------
def test_a_hardware_breakpoint_and_an_aligned_watchpoint_take_one_register_each() -> None:
    debug = DebugRegisters()
    debug.insert(BreakpointKind.HARDWARE, 0x100010, 1)
    debug.insert(BreakpointKind.WRITE_WATCHPOINT, 0x200000, 8)
    debug.insert(BreakpointKind.WRITE_WATCHPOINT, 0x200000, 8)  # again: nothing new
    assert debug.registers() == (
        HardwareBreakpoint(0x100010),
        HardwareBreakpoint(0x200000, DebugRegisterKind.WRITE, 8),
    )


def test_an_unaligned_watchpoint_takes_a_register_per_aligned_piece() -> None:
    debug = DebugRegisters()
    debug.insert(BreakpointKind.ACCESS_WATCHPOINT, 0x1001, 7)
    assert [(bp.addr, bp.length, bp.kind) for bp in debug.registers()] == [
        (0x1001, 1, DebugRegisterKind.ACCESS), (0x1002, 2, DebugRegisterKind.ACCESS), (0x1004, 4, DebugRegisterKind.ACCESS),
    ]  # fmt: skip


def test_dr6_names_the_breakpoint_or_watchpoint_that_fired() -> None:
    debug = DebugRegisters()
    debug.insert(BreakpointKind.ACCESS_WATCHPOINT, 0x1001, 3)  # DR0, DR1
    debug.insert(BreakpointKind.HARDWARE, 0x100010, 1)  # DR2
    debug.insert(BreakpointKind.WRITE_WATCHPOINT, 0x2000, 4)  # DR3
    assert debug.hit(0b0010) == (StopReason.ACCESS_WATCHPOINT, 0x1001)
    assert debug.hit(0b0100) == (StopReason.HARDWARE_BREAKPOINT, None)
    assert debug.hit(0b1000) == (StopReason.WRITE_WATCHPOINT, 0x2000)
    assert debug.hit(1 << 14) is None  # BS: a step, not a debug register
    debug.remove(BreakpointKind.ACCESS_WATCHPOINT, 0x1001, 3)
    assert debug.hit(0b0001) == (StopReason.HARDWARE_BREAKPOINT, None)  # the rest moved down


def test_a_fifth_debug_register_is_refused_in_plain_words() -> None:
    debug = DebugRegisters()
    for address in range(0x1000, 0x1004):
        debug.insert(BreakpointKind.HARDWARE, address, 1)
    with pytest.raises(UnsupportedError, match="x86 has 4 debug registers, 4 of them in use, and this needs 1"):
        debug.insert(BreakpointKind.HARDWARE, 0x2000, 1)
    debug.remove(BreakpointKind.HARDWARE, 0x1000, 1)
    debug.insert(BreakpointKind.HARDWARE, 0x2000, 1)
    assert len(debug.registers()) == 4


def test_what_the_debug_registers_cannot_watch_is_refused() -> None:
    debug = DebugRegisters()
    with pytest.raises(UnsupportedError, match="cannot watch reads alone: use awatch"):
        debug.insert(BreakpointKind.READ_WATCHPOINT, 0x1000, 4)
    with pytest.raises(UnsupportedError, match="one instruction address \\(length 1, not 2\\)"):
        debug.insert(BreakpointKind.HARDWARE, 0x1000, 2)
    with pytest.raises(UnsupportedError, match="more than x86's debug registers can watch"):
        debug.insert(BreakpointKind.WRITE_WATCHPOINT, 0x1000, 1 << 40)  # refused before anything is built
    debug.insert(BreakpointKind.WRITE_WATCHPOINT, 0x1000, 32)  # four 8-byte pieces: the most there is
    assert debug.registers() and debug.hit(0b1000) == (StopReason.WRITE_WATCHPOINT, 0x1000)


@given(st.integers(0, (1 << 64) - 64), st.integers(1, 32))
def test_aligned_pieces_cover_the_range_exactly(address: int, length: int) -> None:
    pieces = _aligned(address, length)
    assert [start for start, _ in pieces] == [address + sum(size for _, size in pieces[:i]) for i in range(len(pieces))]
    assert sum(size for _, size in pieces) == length
    assert all(size in (1, 2, 4, 8) and start % size == 0 for start, size in pieces)


# --- x87 and SSE ----------------------------------------------------------------------------------
def xsave_area(*, stack: tuple[int, ...] = (), fsw: int = 0, ftwx: int = 0, last_ip: int = 0, xmm0: int = 0,
               components: int = 0) -> bytes:  # fmt: skip
    """An XSAVE area: the FXSAVE legacy region, then the header's XSTATE_BV."""
    fpr = b"".join(value.to_bytes(16, "little") for value in stack).ljust(128, b"\0")
    xmm = xmm0.to_bytes(16, "little").ljust(256, b"\0")
    legacy = registers._FXSAVE.pack(0x37F, fsw, ftwx, 0x123, last_ip, 0xABCD_0000_1234, 0x1F80, 0xFFFF, fpr, xmm)
    return legacy.ljust(512, b"\0") + components.to_bytes(8, "little") + bytes(56)


def test_the_legacy_region_is_laid_out_as_fxsave() -> None:  # Intel SDM vol. 1, table 10-2
    area = xsave_area(stack=(0x1234,), xmm0=0x5678)
    assert registers._FXSAVE.size == 416
    assert area[24:28] == (0x1F80).to_bytes(4, "little") and area[32:34] == (0x1234).to_bytes(2, "little")
    assert area[160:162] == (0x5678).to_bytes(2, "little")


def test_the_full_tag_word_comes_from_the_register_contents() -> None:
    top = 6  # ST(0) is physical register 6
    blob = xsave_area(stack=(ONE, 0, NAN, DENORMAL), fsw=top << 11, ftwx=0b11000011)
    values = registers._fpu_registers(blob)
    # physical 6, 7, 0, 1 = ST(0..3) are in use (abridged bits 6, 7, 0, 1): valid, zero, special, special
    tags = [values["ftag"] >> 2 * physical & 3 for physical in range(8)]
    assert tags == [2, 2, 3, 3, 3, 3, 0, 1]
    assert values["st0"] == ONE and values["st2"] == NAN


def test_an_empty_x87_stack_is_all_empty_tags() -> None:
    values = registers._fpu_registers(xsave_area())
    assert values["ftag"] == 0xFFFF and values["fctrl"] == 0x37F and values["mxcsr"] == 0x1F80


def test_gdb_pointer_fields_split_the_instruction_and_operand_pointers() -> None:
    values = registers._fpu_registers(xsave_area(last_ip=0x0000_0010_0040_1234))
    assert (values["fiseg"], values["fioff"]) == (0x10, 0x0040_1234)
    assert (values["foseg"], values["fooff"], values["fop"]) == (0xABCD, 0x1234, 0x123)


def test_changing_some_fpu_registers_keeps_the_rest() -> None:
    area = xsave_area(stack=(ONE,), fsw=0, ftwx=0b1, last_ip=0xFFFF_0010_0040_1234, xmm0=7, components=0b100)
    changed = registers._changed_fpu(area, {"st1": NAN, "xmm3": 1 << 127, "fioff": 0x5678, "ftag": 0xFFF0})
    before, after = registers._fpu_registers(area), registers._fpu_registers(changed)
    assert (after["st1"], after["xmm3"], after["fioff"]) == (NAN, 1 << 127, 0x5678)
    assert {k: v for k, v in after.items() if k not in ("st1", "xmm3", "fioff", "ftag")} == {
        k: v for k, v in before.items() if k not in ("st1", "xmm3", "fioff", "ftag")
    }
    fields = registers._FXSAVE.unpack_from(changed)
    assert fields[4] == 0xFFFF_0010_0000_5678  # the pointer's upper bits stay
    assert fields[2] == 0b11  # ftag 0xfff0: physical registers 0 and 1 in use
    assert changed[512:520] == (0b111).to_bytes(8, "little")  # XSTATE_BV: x87 and SSE hold state now
    assert changed[520:] == area[520:]


# --- the binding's record ----------------------------------------------------------------------------
def test_guest_debug_injects_only_the_debug_exceptions() -> None:
    assert GuestDebug(inject=1).inject == 1 and GuestDebug(inject=3).inject == 3
    with pytest.raises(StateError, match="injects #DB \\(1\\) or #BP \\(3\\), not vector 14"):
        GuestDebug(inject=14)


# --- configuration and pykvm info --------------------------------------------------------------------
def test_gdb_wait_needs_a_gdb_address() -> None:
    with pytest.raises(ConfigError, match="gdb_wait holds the guest until gdb continues it: give gdb an address"):
        MachineConfig(gdb_wait=True).validate()


@pytest.mark.parametrize("address", ["tcp:1234", "udp::1234", "tcp::99999", "unix:"])
def test_a_malformed_gdb_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match="gdb address"):
        MachineConfig(gdb=address).validate()


def test_the_keyword_options_of_a_machine_are_its_config_fields() -> None:
    assert set(typing.get_type_hints(MachineOptions)) == {field.name for field in dataclasses.fields(MachineConfig)}


def test_hardware_backends_and_unknown_ones_can_do_all_guest_debugging() -> None:
    assert debug_support("kvm_intel") == debug_support("kvm_amd") == debug_support(None) == FULL_DEBUG_SUPPORT
    pvm = debug_support("kvm_pvm")
    assert pvm is DEBUG_SUPPORT["kvm_pvm"] and not pvm.watchpoints
    assert pvm.software_breakpoints == {Privilege.KERNEL} and Privilege.USER not in pvm.single_step


def test_pykvm_info_lists_where_each_debug_event_works() -> None:
    info = {"device": "/dev/kvm", "api_version": 12, "backend": "kvm_pvm", "backend_kind": "software", "guests": "small kernels",
            "cpu_model": "cpu", "host_cpus": 2, "host_kernel": "6.1", "limits": {}, "capabilities": {},
            "debugging": DEBUG_SUPPORT["kvm_pvm"].as_dict()}  # fmt: skip
    text = format_info(info)
    assert "  single step              real mode, kernel mode\n" in text
    assert "  watchpoints              nowhere\n" in text
    assert "  software breakpoints     kernel mode\n" in text

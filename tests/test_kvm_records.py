"""The binding's pure parts, without KVM: the dirty bitmap decoder and the debug-register encoder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.errors import StateError
from pykvm.kvm.debug import BreakpointKind, GuestDebug, HardwareBreakpoint
from pykvm.kvm.dirty_bitmap import PAGE_SIZE, DirtyBitmap, bitmap_size

PYKVM = Path(__file__).resolve().parent.parent / "pykvm"


def reference_pages(bitmap: bytes, pages: int) -> list[int]:
    """Bit i of the little-endian bitmap is page i: the plain reading of KVM's format."""
    return [page for page in range(pages) if bitmap[page // 8] >> (page % 8) & 1]


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[int, bytes]:
    pages = draw(st.integers(min_value=1, max_value=1200))
    size = bitmap_size(pages)
    used = (pages + 7) // 8
    # Runs of whole 0x00 / 0xff bytes as well as arbitrary bytes, so both decoder paths are exercised.
    byte = st.one_of(st.sampled_from([0x00, 0xFF]), st.integers(0, 255))
    data = bytearray(draw(st.lists(byte, min_size=used, max_size=used)))
    if pages % 8:
        data[-1] &= (1 << (pages % 8)) - 1  # KVM never sets bits past the slot's last page
    return pages, bytes(data).ljust(size, b"\0")


@given(bitmaps())
def test_dirty_pages_are_exactly_the_set_bits(example: tuple[int, bytes]) -> None:
    pages, bitmap = example
    dirty = DirtyBitmap(slot=3, gpa=0x4000_0000, pages=pages, bitmap=bitmap)
    expected = reference_pages(bitmap, pages)
    assert list(dirty.page_numbers()) == expected
    assert dirty.count() == len(expected)
    assert bool(dirty) == bool(expected)


@given(bitmaps())
def test_runs_are_maximal_and_ranges_are_their_guest_physical_bytes(example: tuple[int, bytes]) -> None:
    pages, bitmap = example
    dirty = DirtyBitmap(slot=0, gpa=0x10_0000, pages=pages, bitmap=bitmap)
    runs = list(dirty.runs())
    assert all(length > 0 for _, length in runs)
    assert all(first + length < next_first for (first, length), (next_first, _) in zip(runs, runs[1:]))
    assert [page for first, length in runs for page in range(first, first + length)] == reference_pages(bitmap, pages)
    assert list(dirty.ranges()) == [(0x10_0000 + first * PAGE_SIZE, length * PAGE_SIZE) for first, length in runs]


def test_a_fully_dirty_gib_is_one_run() -> None:
    pages = (1 << 30) // PAGE_SIZE
    dirty = DirtyBitmap(slot=0, gpa=0, pages=pages, bitmap=b"\xff" * bitmap_size(pages))
    assert list(dirty.runs()) == [(0, pages)]
    assert dirty.count() == pages


def test_a_bitmap_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(StateError, match="100 pages has 16 bytes, not 8"):
        DirtyBitmap(slot=0, gpa=0, pages=100, bitmap=bytes(8))


def test_dr7_arms_each_breakpoint_with_its_kind_and_length() -> None:
    debug = GuestDebug(
        hardware_breakpoints=(
            HardwareBreakpoint(0x1000),
            HardwareBreakpoint(0x2000, BreakpointKind.WRITE, 8),
            HardwareBreakpoint(0x3002, BreakpointKind.ACCESS, 2),
        )
    )
    # G0 | G1 | G2 (bits 1, 3, 5), GE and bit 10; R/W1 = 01, LEN1 = 10 (8 bytes); R/W2 = 11, LEN2 = 01.
    expected_dr7 = 0b101010 | 0x600 | (0b01 | 0b10 << 2) << 20 | (0b11 | 0b01 << 2) << 24
    assert debug.dr7() == expected_dr7
    assert debug.debugreg() == (0x1000, 0x2000, 0x3002, 0, 0, 0, 0, expected_dr7)


def test_without_hardware_breakpoints_dr7_is_zero() -> None:
    assert GuestDebug(single_step=True).debugreg() == (0,) * 8


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: HardwareBreakpoint(0x1000, BreakpointKind.WRITE, 3), "1, 2, 4 or 8 bytes"),
        (lambda: HardwareBreakpoint(0x1000, BreakpointKind.EXECUTE, 4), "execute breakpoint has length 1"),
        (lambda: HardwareBreakpoint(0x1004, BreakpointKind.WRITE, 8), "not a 8-byte aligned"),
        (lambda: HardwareBreakpoint(1 << 64), "64-bit address"),
        (lambda: GuestDebug(hardware_breakpoints=tuple(HardwareBreakpoint(a) for a in range(5))), "x86 has 4"),
    ],
    ids=["odd-length", "long-execute", "misaligned", "beyond-64-bits", "five-breakpoints"],
)
def test_impossible_breakpoints_are_refused_when_described(make, message) -> None:
    with pytest.raises(StateError, match=message):
        make()


@pytest.mark.parametrize("module", ["state", "dirty_bitmap", "debug"])
def test_the_record_modules_load_without_the_c_extension(module: str) -> None:
    """Imported under bare stand-ins for the packages (their __init__ imports the C extension),
    with the C extension made unimportable: they need nothing of it."""
    code = (
        "import importlib, sys, types\n"
        f"for name, path in (('pykvm', {str(PYKVM)!r}), ('pykvm.kvm', {str(PYKVM / 'kvm')!r})):\n"
        "    sys.modules[name] = types.ModuleType(name)\n"
        "    sys.modules[name].__path__ = [path]\n"
        "sys.modules['pykvm._native'] = None\n"
        f"importlib.import_module('pykvm.kvm.{module}')\n"
        "assert 'pykvm.native' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

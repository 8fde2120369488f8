"""The C run loop's fast-handler table (pykvm.kvm.fastpath), without KVM: what Python writes is what C reads."""

from __future__ import annotations

import pytest

from pykvm.errors import PykvmError
from pykvm.kvm.fastpath import FastKind, FastTable, Space
from pykvm.native import lib


def test_an_entry_is_written_into_the_c_table_enabled() -> None:
    table = FastTable()
    handler = table.add(FastKind.CONSTANT, Space.PIO, 0x80, 1, value=0xAB)
    entry = table.cdata.handlers[0]
    assert table.cdata.count == 1
    written = (entry.kind, entry.space, entry.base, entry.length, entry.value)
    assert written == (lib.PYKVM_FAST_CONSTANT, lib.PYKVM_SPACE_PIO, 0x80, 1, 0xAB)
    assert (handler.kind, handler.space, handler.base, handler.enabled) == (FastKind.CONSTANT, Space.PIO, 0x80, True)


def test_switching_an_entry_off_and_changing_its_value_reach_the_c_table() -> None:
    table = FastTable()
    table.add(FastKind.CONSTANT, Space.PIO, 0x80, 1)
    handler = table.add(FastKind.BYTE_REGISTER, Space.PIO, 0x3FD, 1, value=0x60)
    handler.enabled = False
    handler.value = 0x61
    entry = table.cdata.handlers[1]
    assert (entry.enabled, entry.value) == (0, 0x61) and (handler.enabled, handler.value) == (False, 0x61)
    assert table.cdata.handlers[0].enabled == 1  # the other entry is untouched


def test_a_table_holds_at_most_its_c_capacity() -> None:
    table = FastTable()
    for index in range(lib.PYKVM_FAST_MAX):
        table.add(FastKind.CONSTANT, Space.MMIO, 0xD000_0000 + 0x1000 * index, 4)
    with pytest.raises(PykvmError, match=f"no room for another fast handler \\(at most {lib.PYKVM_FAST_MAX}\\)"):
        table.add(FastKind.CONSTANT, Space.PIO, 0x80, 1)
    assert table.cdata.count == lib.PYKVM_FAST_MAX and len(table.handlers) == lib.PYKVM_FAST_MAX


def test_counters_start_at_zero() -> None:
    handler = FastTable().add(FastKind.DEBUG_EXIT, Space.PIO, 0xF4, 4)
    assert (handler.reads, handler.writes) == (0, 0)

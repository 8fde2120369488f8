"""KVM's dirty log on /dev/kvm: a guest writes known pages of a logged slot; the log names exactly those.

dirty_pages.bin writes one byte into each page of a list the host puts in its RAM, then stops on
the debug-exit port.  The logged slot is a separate one, so the guest's page-table walks and its
code (in slot 0) cannot add pages to the log.
"""

from __future__ import annotations

import errno
import mmap
import struct
from typing import Iterator

import pytest

from conftest import guest
from pykvm import Machine
from pykvm.errors import KvmIoctlError, StateError
from pykvm.kvm.dirty_bitmap import PAGE_SIZE, DirtyBitmap
from pykvm.native import ffi, lib
from pykvm.result import ExitReason

pytestmark = pytest.mark.kvm

PAGE_LIST = 0x200000  # dirty_pages.asm: where it reads the count and the addresses
ROUND_DONE = 0x31  # dirty_pages.asm's debug-exit value after each round
WRITTEN_BYTE = 0xA5
LOGGED_SLOT = 1
LOGGED_GPA = 0x8000_0000  # inside the identity map, away from the machine's RAM
LOGGED_SIZE = 16 << 20


@pytest.fixture
def logged_memory() -> Iterator[mmap.mmap]:
    memory = mmap.mmap(-1, LOGGED_SIZE)
    yield memory
    memory.close()


def machine_with_logged_slot(
    machine_factory, memory: mmap.mmap, *, manual: bool = False, user: bool = False
) -> Machine:
    machine = machine_factory(memory="16M", irqchip=False)
    if manual:
        if not machine.vm.manual_dirty_log_protect2() & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            pytest.skip("this host's KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        machine.vm.enable_manual_dirty_log_protect()
    host_addr = int(ffi.cast("uintptr_t", ffi.from_buffer(memory)))
    machine.vm.set_user_memory_region(LOGGED_SLOT, LOGGED_GPA, LOGGED_SIZE, host_addr)
    machine.vm.set_dirty_logging(LOGGED_SLOT)
    machine.load(guest("dirty_pages.bin"), mode="long", user=user)
    return machine


def write_pages(machine: Machine, pages: list[int]) -> None:
    """One round of the guest: it writes a byte into each page (slot-relative numbers) of the logged slot."""
    addresses = [LOGGED_GPA + page * PAGE_SIZE + 0x123 for page in pages]
    machine.memory.write(PAGE_LIST, struct.pack(f"<{len(pages) + 1}Q", len(pages), *addresses))
    result = machine.run(timeout=60)
    assert (result.reason, result.exit_value) == (ExitReason.DEBUG_EXIT, ROUND_DONE), result.diagnosis


@pytest.mark.parametrize("user", [False, True], ids=["cpl0", "cpl3"])
def test_the_log_reports_exactly_the_pages_the_guest_wrote(logged_memory, machine_factory, user) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory, user=user)
    written = [0, 5, 6, 7, 8, 100, 2047, LOGGED_SIZE // PAGE_SIZE - 1]
    write_pages(machine, written)
    dirty = machine.vm.get_dirty_log(LOGGED_SLOT)
    assert list(dirty.page_numbers()) == written
    assert list(dirty.runs()) == [(0, 1), (5, 4), (100, 1), (2047, 1), (LOGGED_SIZE // PAGE_SIZE - 1, 1)]
    assert all(logged_memory[page * PAGE_SIZE + 0x123] == WRITTEN_BYTE for page in written)
    assert next(dirty.ranges()) == (LOGGED_GPA, PAGE_SIZE)


def test_reading_the_log_starts_it_afresh(logged_memory, machine_factory) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory)
    write_pages(machine, [1, 2, 3])
    assert list(machine.vm.get_dirty_log(LOGGED_SLOT).page_numbers()) == [1, 2, 3]
    assert not machine.vm.get_dirty_log(LOGGED_SLOT)
    write_pages(machine, [2, 64])  # a page written before is logged again
    assert list(machine.vm.get_dirty_log(LOGGED_SLOT).page_numbers()) == [2, 64]


def test_host_writes_are_not_logged(logged_memory, machine_factory) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory)
    logged_memory[0 : 3 * PAGE_SIZE] = b"\x01" * (3 * PAGE_SIZE)
    write_pages(machine, [])
    assert machine.vm.get_dirty_log(LOGGED_SLOT).count() == 0


def test_with_manual_protection_the_log_holds_until_cleared(logged_memory, machine_factory) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory, manual=True)
    write_pages(machine, [1, 2, 64])
    dirty = machine.vm.get_dirty_log(LOGGED_SLOT)
    assert list(dirty.page_numbers()) == [1, 2, 64]
    assert machine.vm.get_dirty_log(LOGGED_SLOT) == dirty  # not reset by reading
    machine.vm.clear_dirty_log(dirty)
    assert not machine.vm.get_dirty_log(LOGGED_SLOT)
    write_pages(machine, [2, 9])  # cleared pages are write-protected again
    assert list(machine.vm.get_dirty_log(LOGGED_SLOT).page_numbers()) == [2, 9]


def test_stopping_the_log_makes_kvm_refuse_to_read_it(logged_memory, machine_factory) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory)
    machine.vm.set_dirty_logging(LOGGED_SLOT, False)
    assert machine.vm.memory_slots()[LOGGED_SLOT].flags & lib.KVM_MEM_LOG_DIRTY_PAGES == 0
    with pytest.raises(KvmIoctlError) as info:
        machine.vm.get_dirty_log(LOGGED_SLOT)
    assert (info.value.ioctl, info.value.errno) == ("KVM_GET_DIRTY_LOG", errno.ENOENT)


def test_an_unknown_slot_is_a_clear_error(machine_factory) -> None:
    machine = machine_factory(memory="16M", irqchip=False)
    with pytest.raises(StateError, match="memory slot 7 is not registered in this VM"):
        machine.vm.get_dirty_log(7)
    with pytest.raises(StateError, match="memory slot 7 is not registered"):
        machine.vm.set_dirty_logging(7)


def test_a_bitmap_of_another_size_than_its_slot_is_not_cleared(logged_memory, machine_factory) -> None:
    machine = machine_with_logged_slot(machine_factory, logged_memory)
    with pytest.raises(StateError, match=f"64 pages does not cover slot {LOGGED_SLOT}"):
        machine.vm.clear_dirty_log(DirtyBitmap(LOGGED_SLOT, LOGGED_GPA, 64, bytes(8)))

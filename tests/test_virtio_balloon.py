"""virtio-balloon against the driver-side harness (tests/virtio_driver.py), without KVM.

The protocol (5.5): features and dense queue numbering, the configuration space and its
change interrupt, inflate/deflate with PFNs checked and pages really released (RSS),
statistics held and returned, free page reporting; hostile input is named for its rule.
"""

from __future__ import annotations

import struct

import psutil
import pytest

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.balloon import (
    F_DEFLATE_ON_OOM,
    F_FREE_PAGE_HINT,
    F_MUST_TELL_HOST,
    F_REPORTING,
    F_STATS_VQ,
    PAGE,
    VirtioBalloon,
    runs,
    usable_ranges,
)
from pykvm.config import MachineConfig
from pykvm.errors import ConfigError
from pykvm.memory import GuestMemory
from pykvm.x86.e820 import E820Type, build_memory_map, ram_regions
from pykvm.x86.layout import MIB

from virtio_driver import Driver, connect

INFLATE, DEFLATE, STATS = 0, 1, 2
RING_AREA = 0x1000
BUFFERS = (0x40000, 0x40000)  # below 1 MiB, away from every page the tests inflate
VERSION_1 = mmio.VIRTIO_F_VERSION_1
ALL = VERSION_1 | 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING


@pytest.fixture
def memory():
    with GuestMemory([(0, 64 * MIB)]) as mem:
        yield mem


def balloon_driver(memory: GuestMemory, accept: int = ALL, **options: object) -> tuple[VirtioBalloon, Driver]:
    device = VirtioBalloon(build_memory_map(memory.size), **options)  # type: ignore[arg-type]
    driver = connect(device, memory, RING_AREA, buffer_area=BUFFERS)
    driver.negotiate(accept)
    return device, driver


def pfn_bytes(pfns: list[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def send_pfns(driver: Driver, queue: int, pfns: list[int], batch: int = 256) -> list[tuple[int, int]]:
    """Post the PFNs in chains of ``batch`` (as Linux does: 256 per buffer), one notify per chain."""
    used = []
    for i in range(0, len(pfns), batch):
        driver.post(queue, [pfn_bytes(pfns[i : i + batch])], [])
        driver.notify(queue)
        used += driver.used(queue)
    return used


def pages(start: int, size: int) -> list[int]:
    return list(range(start // PAGE, (start + size) // PAGE))


# --- features, queues, configuration -------------------------------------------------------
def test_device_id_5_and_stats_offered_by_default_deflate_on_oom_and_reporting_only_when_asked(memory) -> None:
    plain = connect(VirtioBalloon(), memory, RING_AREA)
    assert plain.read_reg(mmio.DEVICE_ID) == 5
    features = plain.device_features()
    assert features & (1 << F_STATS_VQ)
    assert not features & (1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING | 1 << F_FREE_PAGE_HINT | 1 << F_MUST_TELL_HOST)
    full = connect(VirtioBalloon(deflate_on_oom=True, free_page_reporting=True), memory, RING_AREA).device_features()
    assert full & (1 << F_DEFLATE_ON_OOM) and full & (1 << F_REPORTING)


def test_one_queue_per_role_that_may_be_negotiated(memory) -> None:
    assert len(connect(VirtioBalloon(), memory, RING_AREA).transport.queues) == 3
    assert len(connect(VirtioBalloon(free_page_reporting=True), memory, RING_AREA).transport.queues) == 4


@pytest.mark.parametrize(
    "accept, roles",
    [
        (VERSION_1, {0: "inflate", 1: "deflate"}),
        (VERSION_1 | 1 << F_STATS_VQ, {0: "inflate", 1: "deflate", 2: "stats"}),
        (VERSION_1 | 1 << F_REPORTING, {0: "inflate", 1: "deflate", 2: "reporting"}),
        (ALL, {0: "inflate", 1: "deflate", 2: "stats", 3: "reporting"}),
    ],
)
def test_queues_are_numbered_densely_over_the_negotiated_features(memory, accept: int, roles: dict) -> None:
    device, _ = balloon_driver(memory, accept, free_page_reporting=True)
    assert device._roles == roles


def test_reporting_on_queue_2_when_stats_was_not_negotiated(memory) -> None:
    device, driver = balloon_driver(memory, VERSION_1 | 1 << F_REPORTING, free_page_reporting=True)
    memory.write(8 * MIB, b"\xaa" * (2 * MIB))
    driver.post_buffers(2, [(8 * MIB, 2 * MIB, True)])
    driver.notify(2)
    assert len(driver.used(2)) == 1
    assert memory.read(8 * MIB, 2 * MIB) == bytes(2 * MIB)
    assert device.counters()["reported_bytes"] == 2 * MIB


def test_config_space_is_num_pages_then_actual_little_endian(memory) -> None:
    device, driver = balloon_driver(memory)
    device.target = "8M"
    assert driver.read_config(0, 4) == 2048
    assert driver.read_config(0, 2) == 2048  # narrower reads see the low bytes
    driver.write_config(4, 1234)
    assert driver.read_config(4, 4) == 1234 and device.actual == 1234 * PAGE


def test_a_new_target_raises_a_config_change_interrupt_and_a_new_generation(memory) -> None:
    device, driver = balloon_driver(memory)
    generation, interrupts = driver.read_reg(mmio.CONFIG_GENERATION), driver.interrupts
    device.target = 16 * MIB
    assert driver.interrupt_status() & mmio.INTERRUPT_CONFIG_CHANGE
    assert driver.read_reg(mmio.CONFIG_GENERATION) == generation + 1 and driver.interrupts == interrupts + 1
    device.target = "16M"  # unchanged: no interrupt
    assert driver.interrupts == interrupts + 1


def test_target_is_a_size_rounded_down_to_pages_and_at_most_guest_ram(memory) -> None:
    device, _ = balloon_driver(memory)
    device.target = 10 * PAGE + 100
    assert device.target == 10 * PAGE and device.num_pages == 10
    device.target = "64M"
    with pytest.raises(ConfigError, match="out of range"):
        device.target = "65M"
    with pytest.raises(ConfigError):
        device.target = "lots"


def test_rule_num_pages_is_read_only_for_the_driver(memory) -> None:
    device, driver = balloon_driver(memory)
    device.target = "4M"
    driver.write_config(0, 7)
    driver.write_config(8, 7)  # free_page_hint_cmd_id: device-written
    assert device.num_pages == 1024 and device.stats["config_writes_ignored"] == 2


def test_actual_accepts_partial_writes(memory) -> None:
    device, driver = balloon_driver(memory)
    driver.write_config(4, 0x1234, size=2)
    driver.write_config(6, 0x01, size=1)
    assert device.actual_pages == 0x011234


# --- inflate and deflate ----------------------------------------------------------------
def test_inflate_releases_the_pages_they_read_as_zero_and_chains_complete_with_length_0(memory) -> None:
    device, driver = balloon_driver(memory)
    memory.write(4 * MIB, b"\x5a" * (2 * MIB))
    before = driver.interrupts
    used = send_pfns(driver, INFLATE, pages(4 * MIB, 1 * MIB))
    assert [length for _, length in used] == [0]
    assert driver.interrupts == before + 1
    assert memory.read(4 * MIB, MIB) == bytes(MIB)
    assert memory.read(5 * MIB, MIB) == b"\x5a" * MIB  # the page after the balloon is untouched
    assert device.counters()["inflated_bytes"] == MIB and device.held_pages() == 256


def test_inflate_gathers_every_available_chain_and_merges_runs_before_releasing(memory) -> None:
    device, driver = balloon_driver(memory)
    calls = []
    original = memory.discard
    memory.discard = lambda gpa, length: (calls.append((gpa, length)), original(gpa, length))  # type: ignore[method-assign]
    try:
        whole = pages(8 * MIB, 2 * MIB)
        driver.post(INFLATE, [pfn_bytes(whole[256:][::-1])], [])  # second half first, descending
        driver.post(INFLATE, [pfn_bytes(whole[:256])], [])
        driver.notify(INFLATE)
    finally:
        del memory.discard
    assert calls == [(8 * MIB, 2 * MIB)]  # one call for the whole 2 MiB: a THP is freed, not split
    assert len(driver.used(INFLATE)) == 2


def test_deflate_records_the_pages_which_are_usable_again_and_read_as_zero(memory) -> None:
    device, driver = balloon_driver(memory)
    memory.write(6 * MIB, b"\x11" * MIB)
    send_pfns(driver, INFLATE, pages(6 * MIB, MIB))
    used = send_pfns(driver, DEFLATE, pages(6 * MIB, MIB // 2))
    assert [length for _, length in used] == [0]
    assert device.counters()["deflated_bytes"] == MIB // 2 and device.held_pages() == 128
    assert memory.read(6 * MIB, 4) == bytes(4)
    memory.write(6 * MIB, b"back")
    assert memory.read(6 * MIB, 4) == b"back"


def test_the_held_pages_follow_runs_that_start_and_end_inside_a_byte(memory) -> None:
    device, driver = balloon_driver(memory)
    first = 4 * MIB // PAGE + 3
    send_pfns(driver, INFLATE, list(range(first, first + 1001)) + [first + 2000, first + 2002])
    assert device.held_pages() == 1003
    send_pfns(driver, DEFLATE, list(range(first + 5, first + 998)))
    assert device.held_pages() == 1003 - 993
    send_pfns(driver, DEFLATE, [first, first + 2000, first + 2001])  # one never held: nothing to clear
    assert device.held_pages() == 1003 - 995


def test_rule_pfns_below_1mib_beyond_ram_or_in_the_mmio_hole_are_ignored_and_counted() -> None:
    ram = 3 * 1024 * MIB + 512 * MIB  # RAM below the hole and above 4 GiB; nothing is touched
    with GuestMemory(ram_regions(ram)) as memory:
        memory.write(0x7000, b"boot")  # the VMM's boot structures live down here
        device = VirtioBalloon(build_memory_map(ram))
        driver = connect(device, memory, RING_AREA, buffer_area=BUFFERS)
        driver.negotiate(ALL)
        hole = 0xD000_0000 // PAGE
        beyond = (0x1_0000_0000 + ram) // PAGE + 5
        good = 0x1_0000_0000 // PAGE + 1
        used = send_pfns(driver, INFLATE, [0x7, 0x9F, 0xE0, hole, beyond, 0xFFFFFFFF, good])
        assert len(used) == 1
        assert device.stats["bad_pfns"] == 6 and device.counters()["inflated_bytes"] == PAGE
        assert memory.read(0x7000, 4) == b"boot"


def test_rule_inflate_buffer_not_a_multiple_of_4_is_skipped_and_the_chain_still_completed(memory) -> None:
    device, driver = balloon_driver(memory)
    memory.write(4 * MIB, b"\x77" * PAGE)
    head = driver.post(INFLATE, [pfn_bytes(pages(4 * MIB, PAGE)) + b"\x01\x02"], [])
    driver.notify(INFLATE)
    assert driver.used(INFLATE) == [(head, 0)]
    assert memory.read(4 * MIB, PAGE) == b"\x77" * PAGE
    assert device.stats["bad_buffers"] == 1 and device.counters()["inflated_bytes"] == 0


def test_rule_device_writable_pfn_buffers_are_skipped(memory) -> None:
    device, driver = balloon_driver(memory)
    gpa = driver.buffer(pfn_bytes(pages(4 * MIB, PAGE)))
    memory.write(4 * MIB, b"\x33")
    driver.post_buffers(INFLATE, [(gpa, 4, True)])
    driver.notify(INFLATE)
    assert len(driver.used(INFLATE)) == 1 and memory.read(4 * MIB, 1) == b"\x33"
    assert device.stats["bad_buffers"] == 1


def test_rule_a_good_buffer_in_the_same_chain_as_a_bad_one_is_still_used(memory) -> None:
    device, driver = balloon_driver(memory)
    memory.write(4 * MIB, b"\x44" * 2 * PAGE)
    good = driver.buffer(pfn_bytes([4 * MIB // PAGE]))
    bad = driver.buffer(b"\x00\x01\x00")
    driver.post_buffers(INFLATE, [(bad, 3, False), (good, 4, False)])
    driver.notify(INFLATE)
    assert memory.read(4 * MIB, PAGE) == bytes(PAGE) and memory.read(4 * MIB + PAGE, 1) == b"\x44"


def test_rule_a_queue_whose_feature_was_not_negotiated_has_no_role_and_is_not_read(memory) -> None:
    device, driver = balloon_driver(memory, VERSION_1)  # the harness readies queue 2 all the same
    memory.write(4 * MIB, b"\x21")
    driver.post(2, [pfn_bytes([4 * MIB // PAGE])], [])
    driver.notify(2)
    assert device.stats["notifications_without_role"] == 1
    assert driver.used(2) == [] and memory.read(4 * MIB, 1) == b"\x21"


def test_reset_forgets_actual_and_the_held_pages(memory) -> None:
    device, driver = balloon_driver(memory)
    send_pfns(driver, INFLATE, pages(4 * MIB, 64 * PAGE))
    driver.write_config(4, 64)
    driver.reset()
    assert device.actual == 0 and device.held_pages() == 0


# --- statistics ----------------------------------------------------------------------------
def stats_buffer(entries: dict[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries.items())


def test_stats_are_kept_by_name_and_the_buffer_is_held_until_the_host_wants_more(memory) -> None:
    device, driver = balloon_driver(memory)
    driver.post(STATS, [stats_buffer({5: 64 * MIB, 4: 40 * MIB, 6: 50 * MIB, 42: 7})], [])
    driver.notify(STATS)
    assert driver.used(STATS) == []  # held
    assert device.guest_stats() == {"memfree": 40 * MIB, "memtot": 64 * MIB, "avail": 50 * MIB, "tag_42": 7}
    assert device.stats["unknown_stat_tags"] == 1
    assert device.request_stats()
    assert len(driver.used(STATS)) == 1  # "send me fresh statistics"
    assert not device.request_stats()  # nothing held until the driver posts again
    driver.post(STATS, [stats_buffer({4: 30 * MIB})], [])
    driver.notify(STATS)
    assert device.guest_stats()["memfree"] == 30 * MIB and device.guest_stats()["memtot"] == 64 * MIB
    assert device.stats_generation == 2


def test_rule_stats_trailing_bytes_are_ignored_and_the_whole_entries_kept(memory) -> None:
    device, driver = balloon_driver(memory)
    driver.post(STATS, [stats_buffer({5: 1, 4: 2}) + b"\x06\x00\x01"], [])
    driver.notify(STATS)
    assert device.guest_stats() == {"memfree": 2, "memtot": 1} and device.stats["bad_buffers"] == 1


def test_a_second_stats_buffer_returns_the_first(memory) -> None:
    device, driver = balloon_driver(memory)
    first = driver.post(STATS, [stats_buffer({4: 1})], [])
    driver.notify(STATS)
    driver.post(STATS, [stats_buffer({4: 2})], [])
    driver.notify(STATS)
    assert [head for head, _ in driver.used(STATS)] == [first] and device.guest_stats()["memfree"] == 2


def test_without_stats_negotiated_there_is_nothing_to_request(memory) -> None:
    device, _ = balloon_driver(memory, VERSION_1)
    assert not device.request_stats() and device.guest_stats() == {}


def test_the_counters_are_still_a_counter(memory) -> None:
    device, driver = balloon_driver(memory)
    send_pfns(driver, INFLATE, [0])
    assert device.stats["bad_pfns"] == 1 and dict(device.stats)["bad_pfns"] == 1


# --- free page reporting -----------------------------------------------------------------
def test_reported_free_memory_is_released_and_the_chain_completed(memory) -> None:
    device, driver = balloon_driver(memory, free_page_reporting=True)
    memory.write(16 * MIB, b"\x99" * (4 * MIB))
    driver.post_buffers(3, [(16 * MIB, 2 * MIB, True), (18 * MIB, 2 * MIB, True)])
    driver.notify(3)
    assert [length for _, length in driver.used(3)] == [0]
    assert memory.read(16 * MIB, 4 * MIB) == bytes(4 * MIB)
    assert device.counters()["reported_bytes"] == 4 * MIB and device.held_pages() == 0


@pytest.mark.parametrize(
    "gpa, length, counter",
    [(16 * MIB + 512, PAGE, "bad_buffers"), (16 * MIB, PAGE + 1, "bad_buffers"), (0x9F000, 2 * PAGE, "bad_reports")],
)
def test_rule_reports_that_are_not_whole_pages_of_usable_ram_are_skipped(memory, gpa: int, length: int, counter: str) -> None:
    device, driver = balloon_driver(memory, free_page_reporting=True)
    memory.write(gpa, b"\x12" * length)
    driver.post_buffers(3, [(gpa, length, True)])
    driver.notify(3)
    assert len(driver.used(3)) == 1
    assert memory.read(gpa, length) == b"\x12" * length and device.stats[counter] == 1


# --- RSS ----------------------------------------------------------------------------------------
def test_inflating_touched_memory_gives_at_least_90_percent_of_it_back_to_the_host() -> None:
    touched = 64 * MIB
    with GuestMemory([(0, 128 * MIB)]) as memory:
        device = VirtioBalloon(build_memory_map(memory.size))
        driver = connect(device, memory, RING_AREA, buffer_area=BUFFERS)
        driver.negotiate(ALL)
        process = psutil.Process()
        memory.write(32 * MIB, b"\xc3" * touched)
        before = process.memory_info().rss
        guest_before = memory.resident()["rss"]
        send_pfns(driver, INFLATE, pages(32 * MIB, touched))
        after = process.memory_info().rss
        assert before - after >= 0.9 * touched, (before, after)
        assert guest_before - memory.resident()["rss"] >= 0.9 * touched
        send_pfns(driver, DEFLATE, pages(32 * MIB, touched))
        assert memory.read(32 * MIB, touched) == bytes(touched)


# --- pure helpers ---------------------------------------------------------------------------
def test_runs_merge_consecutive_numbers() -> None:
    assert list(runs([1, 2, 3, 7, 9, 10])) == [(1, 3), (7, 1), (9, 2)]
    assert list(runs([])) == []


def test_usable_ranges_are_e820_ram_from_1mib_in_whole_pages() -> None:
    ram = 3 * 1024 * MIB + 256 * MIB
    e820_ram = [(e.addr, e.end) for e in build_memory_map(ram) if e.type is E820Type.RAM]
    assert usable_ranges(e820_ram) == [(MIB, 0xC000_0000), (0x1_0000_0000, 0x1_0000_0000 + 256 * MIB)]
    assert usable_ranges([(0, 2 * MIB + 100)]) == [(MIB, 2 * MIB)]


def test_the_balloon_options_are_checked_in_the_config() -> None:
    MachineConfig(balloon=True, deflate_on_oom=True, free_page_reporting=True).validate()
    with pytest.raises(ConfigError, match="irqchip"):
        MachineConfig(balloon=True, irqchip=False).validate()
    for option in ("deflate_on_oom", "free_page_reporting"):
        with pytest.raises(ConfigError, match="balloon=True"):
            MachineConfig(**{option: True}).validate()


@pytest.mark.kvm
def test_a_machine_attaches_the_balloon_with_the_configured_features(machine_factory) -> None:
    assert machine_factory(memory="16M").balloon is None
    vm = machine_factory(memory="16M", balloon=True, deflate_on_oom=True, free_page_reporting=True)
    assert vm.balloon.features == 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING
    assert vm.devices.virtio[-1].transport.device is vm.balloon and len(vm.devices.virtio[-1].transport.queues) == 4
    assert vm.balloon.usable == [(MIB, 16 * MIB)]  # e820 RAM from 1 MiB up

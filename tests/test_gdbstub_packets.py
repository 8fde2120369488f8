"""The gdb stub's pure parts: packet framing, register layouts and target descriptions, addresses."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.errors import ConfigError
from pykvm.gdbstub import REGISTER_NAMES, CpuMode, parse_address
from pykvm.gdbstub.packets import (
    Control,
    MalformedPacket,
    Packet,
    PacketReader,
    checksum,
    escape,
    frame,
    parse_hex_bytes,
    parse_int,
    unescape,
)
from pykvm.gdbstub.registers import I386, X86_64, layout_for


# --- framing ----------------------------------------------------------------------------------
def test_a_packet_is_framed_with_its_checksum() -> None:
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"") == 0 and frame(b"") == b"$#00"


@given(st.binary(max_size=200))
def test_escaping_hides_every_framing_byte_and_comes_back(data: bytes) -> None:
    escaped = escape(data)
    assert not set(escaped) & set(b"#$*")
    assert unescape(escaped) == data


def test_an_escape_cut_short_is_malformed() -> None:
    with pytest.raises(MalformedPacket):
        unescape(b"ab}")


@given(st.lists(st.binary(min_size=0, max_size=50).map(escape), max_size=5), st.integers(1, 7))
def test_packets_come_out_whole_however_the_stream_is_cut(payloads: list[bytes], step: int) -> None:
    stream = b"".join(frame(payload) for payload in payloads)
    reader = PacketReader(4096)
    events = []
    for i in range(0, len(stream), step):
        events += reader.feed(stream[i : i + step])
    assert events == [Packet(payload) for payload in payloads]


def test_acks_naks_and_ctrl_c_are_told_apart_between_packets_and_noise_is_skipped() -> None:
    reader = PacketReader(64)
    events = reader.feed(b"+xyz-\x03 \r\n" + frame(b"g") + b"junk\x03")
    assert events == [Control.ACK, Control.NAK, Control.INTERRUPT, Packet(b"g"), Control.INTERRUPT]


def test_the_interrupt_byte_inside_a_packet_is_data() -> None:
    assert PacketReader(64).feed(frame(b"X400000,1:\x03")) == [Packet(b"X400000,1:\x03")]


def test_a_bad_checksum_is_reported_corrupt() -> None:
    reader = PacketReader(64)
    assert reader.feed(b"$g#00$g#zz") == [Control.CORRUPT, Control.CORRUPT]
    assert reader.feed(frame(b"g")) == [Packet(b"g")]


def test_a_dollar_inside_a_packet_starts_it_again() -> None:
    assert PacketReader(64).feed(b"$m4000" + frame(b"?")) == [Packet(b"?")]


def test_an_oversized_packet_is_reported_and_never_held() -> None:
    reader = PacketReader(16)
    huge = b"A" * 1_000_000
    events = reader.feed(b"$" + huge[:500_000])
    events += reader.feed(huge[500_000:] + b"#" + b"%02x" % checksum(huge))
    assert events == [Control.OVERSIZED]
    assert len(reader._data) <= 16
    assert reader.feed(frame(b"A" * 16)) == [Packet(b"A" * 16)]


def test_hex_fields_are_checked() -> None:
    assert parse_int(b"ffff", "x") == 0xFFFF and parse_hex_bytes(b"00ff", "x") == b"\x00\xff"
    for bad in (b"", b"xyz", b"1" * 17, b"-1"):
        with pytest.raises(MalformedPacket):
            parse_int(bad, "x")
    for bad in (b"0", b"zz"):
        with pytest.raises(MalformedPacket):
            parse_hex_bytes(bad, "x")


# --- register layouts -------------------------------------------------------------------------
def _described(layout) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    root = ElementTree.fromstring(layout.target_xml)
    return [(reg.get("name"), int(reg.get("bitsize"))) for reg in root.iter("reg")]


@pytest.mark.parametrize("layout", [X86_64, I386], ids=["x86-64", "i386"])
def test_the_description_lists_exactly_the_packed_registers(layout) -> None:  # type: ignore[no-untyped-def]
    described = _described(layout)
    assert described == [(register.name, register.bits) for register in layout.registers]
    assert sum(bits for _, bits in described) // 8 == layout.size
    assert len(layout.encode({})) == 2 * layout.size
    assert {register.source for register in layout.registers} <= set(REGISTER_NAMES)


def test_the_x86_64_layout_follows_qemus_order() -> None:
    names = [name for name, _ in _described(X86_64)]
    assert names[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "eflags"]  # fmt: skip
    assert names[18:33] == ["cs", "ss", "ds", "es", "fs", "gs", "fs_base", "gs_base", "k_gs_base",
                            "cr0", "cr2", "cr3", "cr4", "cr8", "efer"]  # fmt: skip
    assert names[33:49] == [f"st{i}" for i in range(8)] + ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg",
                                                           "fooff", "fop"]  # fmt: skip
    assert names[49:] == [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    assert ElementTree.fromstring(X86_64.target_xml).findtext("architecture") == "i386:x86-64"


def test_the_i386_layout_uses_gdbs_i386_order() -> None:
    names = [name for name, _ in _described(I386)]
    assert names[:10] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip", "eflags"]
    assert names[-9:] == [f"xmm{i}" for i in range(8)] + ["mxcsr"]
    assert ElementTree.fromstring(I386.target_xml).findtext("architecture") == "i386"


def test_the_mode_picks_the_layout() -> None:
    assert layout_for(CpuMode.LONG) is X86_64
    assert layout_for(CpuMode.PROTECTED) is I386 and layout_for(CpuMode.REAL) is I386


def test_a_narrow_field_shows_the_low_bits_and_a_write_keeps_the_high_ones() -> None:
    eax = I386.registers[0]
    current = {"rax": 0x1122334455667788}
    assert I386.encode_one(eax, current) == b"88776655"
    assert I386.decode_one(eax, b"efbeadde", current) == 0x11223344DEADBEEF


def test_a_g_packet_of_the_wrong_length_or_bad_hex_is_malformed() -> None:
    current = {"rax": 1}
    with pytest.raises(MalformedPacket):
        X86_64.decode(b"00" * (X86_64.size - 1), current)
    with pytest.raises(MalformedPacket):
        X86_64.decode(b"zz" * X86_64.size, current)


def test_g_writes_only_what_changed_and_skips_unavailable_registers() -> None:
    current = {"rax": 1, "rbx": 2}
    data = X86_64.encode({"rax": 1, "rbx": 7})
    assert X86_64.decode(data, current) == {"rbx": 7}


# --- addresses --------------------------------------------------------------------------------
def test_the_address_forms() -> None:
    assert parse_address("tcp::1234").sockaddr == ("127.0.0.1", 1234)
    assert parse_address("tcp:0.0.0.0:1234").sockaddr == ("0.0.0.0", 1234)
    v6 = parse_address("tcp:[::1]:0")
    assert v6.family == socket.AF_INET6 and v6.sockaddr == ("::1", 0)
    unix = parse_address("unix:/tmp/gdb.sock")
    assert unix.family == socket.AF_UNIX and unix.sockaddr == "/tmp/gdb.sock"


@pytest.mark.parametrize("spec", ["1234", "tcp:1234", "tcp::", "tcp::http", "tcp::65536", "tcp:::1:1234",
                                  "unix:", "udp::1234", ""])  # fmt: skip
def test_a_bad_address_is_a_one_line_config_error(spec: str) -> None:
    with pytest.raises(ConfigError, match="gdb address") as error:
        parse_address(spec)
    assert "\n" not in str(error.value)

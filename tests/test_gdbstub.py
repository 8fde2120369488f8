"""The gdb server over a real socket, driven by a scripted client, against the fake target.

The client speaks the wire protocol byte by byte (checksums, acks), so these tests show
what any gdb gets: every command, the stop replies, per-thread vCont, malformed and
hostile packets, and the server answering on afterwards.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator

import pytest
from fake_debug_target import CODE, DATA, HLT, INC_RAX, LOAD_AL, MAPPED, NOP, STORE_AL, FakeTarget, jmp

from pykvm.gdbstub import (
    Action,
    BreakpointKind,
    CpuMode,
    GdbServer,
    GdbServerError,
    Killed,
    UnsupportedError,
)
from pykvm.gdbstub.packets import checksum, escape, frame
from pykvm.gdbstub.registers import I386, X86_64
from pykvm.gdbstub.session import PACKET_SIZE

LOOP = NOP + INC_RAX + jmp(-6)  # 0x400000: nop; 0x400001: inc rax; 0x400004: jmp 0x400000


class Client:
    """A gdb stand-in: sends packets, checks the acks and the replies' checksums."""

    def __init__(self, address: str) -> None:
        self.address = address
        kind, _, where = address.partition(":")
        if kind == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gdb does
        self.sock.settimeout(60)
        self.acks = True
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _byte(self) -> int:
        if not self._buffer:
            self._buffer = self.sock.recv(65536)
            assert self._buffer, "the server closed the connection"
        byte, self._buffer = self._buffer[0], self._buffer[1:]
        return byte

    def expect(self, answer: bytes) -> None:
        assert bytes([self._byte()]) == answer

    def reply(self) -> bytes:
        """The next packet from the server (after checking its checksum), acked."""
        while (byte := self._byte()) != ord("$"):
            assert byte == ord("+"), f"unexpected byte {byte:#x} between packets"
        data = bytearray()
        while (byte := self._byte()) != ord("#"):
            data.append(byte)
        received = bytes([self._byte(), self._byte()])
        assert int(received, 16) == checksum(data), f"bad checksum on {bytes(data)!r}"
        if self.acks:
            self.send_raw(b"+")
        return bytes(data)

    def ask(self, data: bytes) -> bytes:
        """Send a packet and return the reply."""
        self.send_raw(frame(data))
        if self.acks:
            self.expect(b"+")
        return self.reply()

    def send(self, data: bytes) -> None:
        """Send a packet that has no reply now (a resume)."""
        self.send_raw(frame(data))
        if self.acks:
            self.expect(b"+")

    def closed(self) -> bool:
        """Whether the server has closed the connection (reading nothing else before)."""
        try:
            return self._buffer == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:  # it closed with our last ack unread
            return True

    def sync(self) -> None:
        """Wait until the server has handled everything sent so far, while the guest runs."""
        assert self.ask(b"qC") == b"E10"


@pytest.fixture
def make_target() -> Iterator:  # type: ignore[type-arg]
    targets: list[FakeTarget] = []

    def make(program: bytes = LOOP, **options) -> FakeTarget:  # type: ignore[no-untyped-def]
        targets.append(FakeTarget(program, **options))
        return targets[-1]

    yield make
    for target in targets:
        target.close()


@pytest.fixture
def serve(make_target) -> Iterator:  # type: ignore[no-untyped-def,type-arg]
    """``serve(program or target, ...)``: a (held) target behind a server, and a connected client."""
    servers: list[GdbServer] = []
    clients: list[Client] = []

    def start(guest: bytes | FakeTarget = LOOP, *, hold: bool = True,
              **options) -> tuple[FakeTarget, Client]:  # type: ignore[no-untyped-def]  # fmt: skip
        target = make_target(guest, **options) if isinstance(guest, bytes) else guest
        servers.append(GdbServer(target, "tcp::0", hold=hold))
        clients.append(Client(servers[-1].address))
        return target, clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.close()


def registers_of(reply: bytes, layout=X86_64) -> dict[str, int | None]:  # type: ignore[no-untyped-def]
    """A ``g`` reply decoded by gdb's register names (None: unavailable)."""
    values: dict[str, int | None] = {}
    offset = 0
    for register in layout.registers:
        field = reply[offset : offset + 2 * register.size]
        offset += 2 * register.size
        values[register.name] = (
            None if field.startswith(b"x") else int.from_bytes(bytes.fromhex(field.decode()), "little")
        )
    assert offset == len(reply)
    return values


def register_number(name: str, layout=X86_64) -> bytes:  # type: ignore[no-untyped-def]
    return b"%x" % [register.name for register in layout.registers].index(name)


# --- connecting -------------------------------------------------------------------------------
def test_qsupported_announces_the_packet_size_and_the_features(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    reply = gdb.ask(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386;vContSupported+")
    features = reply.split(b";")
    assert b"PacketSize=%x" % PACKET_SIZE in features
    for feature in (b"qXfer:features:read+", b"QStartNoAckMode+", b"swbreak+", b"hwbreak+", b"vContSupported+"):
        assert feature in features


def test_no_ack_mode_ends_the_acks_both_ways(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    assert gdb.ask(b"QStartNoAckMode") == b"OK"
    gdb.acks = False
    gdb.send_raw(frame(b"?"))
    assert gdb._byte() == ord("$")  # the reply comes without a '+' before it
    gdb._buffer = b"$" + gdb._buffer
    assert gdb.reply() == b"T05thread:1;"
    gdb.send_raw(b"$?#00")  # a bad checksum is not nakked any more either: nothing comes back
    assert gdb.ask(b"qC") == b"QC1"


def test_a_held_guest_runs_nothing_until_gdb_continues(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(hold=True)
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert target.resumes == [] and target.regs[0]["rip"] == CODE
    gdb.send(b"c")
    gdb.sync()
    assert target.resumes == [{0: Action.CONTINUE}]


def test_connecting_stops_a_running_guest(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(hold=False)
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert not target.running and target.resumes == [{0: Action.CONTINUE}]
    assert target.regs[0]["rip"] in (CODE, CODE + 1, CODE + 4)


def test_the_target_description_is_read_in_pieces_and_matches_g(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    document, offset = b"", 0
    while True:
        reply = gdb.ask(b"qXfer:features:read:target.xml:%x,100" % offset)
        assert reply[:1] in (b"m", b"l") and len(reply) <= 1 + 0x100
        document += reply[1:]
        offset += len(reply) - 1
        if reply[:1] == b"l":
            break
    root = ElementTree.fromstring(document)
    assert root.findtext("architecture") == "i386:x86-64"
    bits = sum(int(reg.get("bitsize")) for reg in root.iter("reg"))
    assert len(gdb.ask(b"g")) == bits // 4
    assert gdb.ask(b"qXfer:features:read:target.xml:%x,100" % len(document)) == b"l"
    assert gdb.ask(b"qXfer:features:read:other.xml:0,100") == b"E00"
    assert gdb.ask(b"qXfer:memory-map:read::0,100") == b""


def test_a_protected_mode_guest_gets_the_i386_layout(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(mode=CpuMode.PROTECTED)
    target.regs[0]["rax"] = 0xFFFFFFFF_12345678
    assert gdb.ask(b"qXfer:features:read:target.xml:0,3000").startswith(b"l")
    assert b"<architecture>i386</architecture>" in gdb.ask(b"qXfer:features:read:target.xml:0,3000")
    registers = registers_of(gdb.ask(b"g"), I386)
    assert registers["eip"] == CODE and registers["eax"] == 0x12345678
    assert gdb.ask(b"P%s=efbeadde" % register_number("eax", I386)) == b"OK"
    assert target.regs[0]["rax"] == 0xFFFFFFFF_DEADBEEF  # the upper half is kept


# --- registers --------------------------------------------------------------------------------
def test_registers_are_read_and_written_whole_and_one_by_one(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    target.regs[0].update(rax=0x1122334455667788, r15=0xF00D, xmm3=(1 << 127) | 5, st7=(1 << 79) | 3)
    registers = registers_of(gdb.ask(b"g"))
    assert registers["rax"] == 0x1122334455667788 and registers["r15"] == 0xF00D and registers["rip"] == CODE
    assert registers["eflags"] == 0x202 and registers["cs"] == 0x10 and registers["cr0"] == 0x80000011
    assert registers["efer"] == 0x500 and registers["xmm3"] == (1 << 127) | 5 and registers["st7"] == (1 << 79) | 3
    assert gdb.ask(b"p" + register_number("r15")) == (0xF00D).to_bytes(8, "little").hex().encode()
    assert gdb.ask(b"P%s=%s" % (register_number("rbx"), (0xABCD).to_bytes(8, "little").hex().encode())) == b"OK"
    assert target.regs[0]["rbx"] == 0xABCD
    whole = bytearray(gdb.ask(b"g"))
    whole[32:48] = (0x42).to_bytes(8, "little").hex().encode()  # rcx, the third register
    assert gdb.ask(b"G" + bytes(whole)) == b"OK"
    assert target.regs[0]["rcx"] == 0x42 and target.regs[0]["rax"] == 0x1122334455667788


def test_a_register_the_target_cannot_set_gets_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    assert gdb.ask(b"P%s=08000000" % register_number("cs")) == b"E5f"
    assert target.regs[0]["cs"] == 0x10
    assert gdb.ask(b"P%s=10000000" % register_number("cs")) == b"OK"  # the same value: nothing to do


def test_registers_the_target_does_not_give_are_unavailable(serve, make_target) -> None:  # type: ignore[no-untyped-def]
    target = make_target()
    for name in [f"st{i}" for i in range(8)] + [f"xmm{i}" for i in range(16)]:
        del target.regs[0][name]
    _, gdb = serve(target)
    reply = gdb.ask(b"g")
    assert len(reply) == 2 * X86_64.size
    registers = registers_of(reply)
    assert registers["st0"] is None and registers["xmm15"] is None and registers["mxcsr"] == 0x1F80
    assert gdb.ask(b"p" + register_number("xmm0")) == b"xx" * 16
    assert gdb.ask(b"P%s=%s" % (register_number("xmm0"), b"00" * 16)) == b"E5f"
    assert gdb.ask(b"G" + reply) == b"OK"


def test_malformed_register_packets_get_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    assert gdb.ask(b"G00") == b"E16"
    assert gdb.ask(b"G" + b"zz" * X86_64.size) == b"E16"
    assert gdb.ask(b"p") == b"E16"
    assert gdb.ask(b"p%x" % len(X86_64.registers)) == b"E16"
    assert gdb.ask(b"pzz") == b"E16"
    assert gdb.ask(b"P0") == b"E16"
    assert gdb.ask(b"P0=1234") == b"E16"
    assert gdb.ask(b"P0=zzzzzzzzzzzzzzzz") == b"E16"
    assert gdb.ask(b"p0") == b"00" * 8  # still answering


# --- memory -----------------------------------------------------------------------------------
def test_memory_is_read_and_written_in_hex_and_in_binary(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    assert gdb.ask(b"m%x,6" % CODE) == (LOOP[:6]).hex().encode()
    assert gdb.ask(b"M%x,4:deadbeef" % DATA) == b"OK"
    assert target.memory[DATA - CODE : DATA - CODE + 4] == b"\xde\xad\xbe\xef"
    awkward = bytes([0x23, 0x24, 0x7D, 0x2A, 0x03, 0x00, 0xFF])  # # $ } * Ctrl-C NUL
    assert gdb.ask(b"X%x,%x:" % (DATA, len(awkward)) + escape(awkward)) == b"OK"
    assert gdb.ask(b"m%x,%x" % (DATA, len(awkward))) == awkward.hex().encode()
    assert gdb.ask(b"X%x,0:" % DATA) == b"OK"  # gdb's probe for X


def test_a_read_running_into_unmapped_memory_returns_what_precedes_it(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    end = CODE + MAPPED
    assert gdb.ask(b"m%x,10" % (end - 4)) == b"00" * 4
    assert gdb.ask(b"m%x,4" % end) == b"E0e"
    assert gdb.ask(b"m0,4") == b"E0e"
    assert gdb.ask(b"M%x,2:0102" % (end - 1)) == b"E0e"


def test_a_read_longer_than_a_packet_is_clipped(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    reply = gdb.ask(b"m%x,%x" % (CODE, 1 << 40))
    assert len(reply) == PACKET_SIZE and reply.startswith(LOOP.hex().encode())
    assert gdb.ask(b"m%x,1" % CODE) == b"90"


def test_malformed_memory_packets_get_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    for packet in (b"m", b"m400000", b"mzz,4", b"m400000,", b"m400000,zz", b"m2,ffffffffffffffff",
                   b"m10000000000000000,1", b"M400000,2", b"M400000,2:01", b"M400000,2:zzzz", b"M400000,1:0102",
                   b"X400000,2:a", b"X400000,1:}", b"Xfffffffffffffff0,20:" + b"a" * 32):  # fmt: skip
        assert gdb.ask(packet) == b"E16", packet
    assert target.memory[:3] == LOOP[:3]
    assert gdb.ask(b"m%x,1" % CODE) == b"90"


# --- breakpoints and stop replies -------------------------------------------------------------
def test_a_software_breakpoint_stops_the_guest_with_swbreak(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    gdb.ask(b"qSupported:swbreak+;hwbreak+")
    assert gdb.ask(b"Z0,%x,1" % (CODE + 4)) == b"OK"
    assert (BreakpointKind.SOFTWARE, CODE + 4, 1) in target.breakpoints
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;swbreak:;"
    assert target.regs[0]["rip"] == CODE + 4 and target.regs[0]["rax"] == 1
    assert gdb.ask(b"z0,%x,1" % (CODE + 4)) == b"OK"
    assert target.breakpoints == set()


def test_swbreak_and_hwbreak_are_only_told_to_a_gdb_that_asked(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    gdb.ask(b"qSupported:multiprocess+")
    assert gdb.ask(b"Z1,%x,1" % (CODE + 1)) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;"


def test_a_hardware_breakpoint_stops_the_guest_with_hwbreak(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    gdb.ask(b"qSupported:swbreak+;hwbreak+")
    assert gdb.ask(b"Z1,%x,1" % (CODE + 1)) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;hwbreak:;"
    assert target.regs[0]["rip"] == CODE + 1


@pytest.mark.parametrize(
    ("kind", "instruction", "field"),
    [(2, STORE_AL, b"watch"), (3, LOAD_AL, b"rwatch"), (4, STORE_AL, b"awatch"), (4, LOAD_AL, b"awatch")],
)
def test_a_watchpoint_reports_the_address_and_its_kind(serve, kind, instruction, field) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(NOP + instruction + jmp(-5))
    target.regs[0].update(rbx=DATA + 2, rax=0x55)
    assert gdb.ask(b"Z%d,%x,4" % (kind, DATA)) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;%s:%x;" % (field, DATA + 2)
    assert target.regs[0]["rip"] == CODE + 3  # after the access, as x86 reports data breakpoints
    assert gdb.ask(b"z%d,%x,4" % (kind, DATA)) == b"OK"
    assert target.breakpoints == set()


def test_a_watchpoint_of_another_kind_does_not_fire(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(NOP + LOAD_AL + jmp(-5))
    target.regs[0]["rbx"] = DATA
    assert gdb.ask(b"Z2,%x,1" % DATA) == b"OK"  # a write watchpoint; the guest only reads
    assert gdb.ask(b"Z0,%x,1" % (CODE + 3)) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;"


def test_a_breakpoint_the_target_cannot_give_gets_an_error_reply(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(unsupported=[BreakpointKind.WRITE_WATCHPOINT])
    assert gdb.ask(b"Z2,%x,8" % DATA) == b"E5f"
    assert gdb.ask(b"Z0,10,1") == b"E0e"  # nothing mapped there
    assert gdb.ask(b"Z5,%x,1" % CODE) == b""  # a type gdb's protocol does not define
    assert gdb.ask(b"Z0,%x" % CODE) == b"E16"
    assert gdb.ask(b"Z0,%x,0" % CODE) == b"E16"
    assert gdb.ask(b"Zx,%x,1" % CODE) == b"E16"
    assert target.breakpoints == set()


def test_a_step_executes_one_instruction_of_one_thread(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(vcpus=2)
    gdb.send(b"s")
    assert gdb.reply() == b"T05thread:1;"
    assert target.regs[0]["rip"] == CODE + 1 and target.regs[1]["rip"] == CODE
    assert target.resumes[-1] == {0: Action.STEP}
    gdb.send(b"s")
    assert gdb.reply() == b"T05thread:1;"
    assert target.regs[0]["rax"] == 1 and target.regs[0]["rip"] == CODE + 4


def test_continue_and_step_from_an_address(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    gdb.send(b"s%x" % (CODE + 1))
    assert gdb.reply() == b"T05thread:1;"
    assert target.regs[0]["rip"] == CODE + 4 and target.regs[0]["rax"] == 1
    assert gdb.ask(b"Z0,%x,1" % CODE) == b"OK"
    gdb.send(b"C05;%x" % (CODE + 1))  # the signal is ignored
    assert gdb.reply() == b"T05thread:1;"
    assert target.regs[0]["rip"] == CODE and target.regs[0]["rax"] == 2


def test_ctrl_c_interrupts_a_running_guest(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(jmp(-2))
    gdb.send(b"c")
    gdb.sync()
    assert target.running
    gdb.send_raw(b"\x03")
    assert gdb.reply() == b"T02thread:1;"
    assert not target.running and target.regs[0]["rip"] == CODE


def test_a_refused_resume_tells_gdb_why_on_its_console(serve, make_target, caplog) -> None:  # type: ignore[no-untyped-def]
    target = make_target()

    def refuse(actions: object) -> None:
        raise UnsupportedError("cannot step vCPU 0: not here")

    target.resume = refuse
    _, gdb = serve(target)
    gdb.send(b"s")
    assert gdb.reply() == b"O" + b"cannot step vCPU 0: not here\n".hex().encode()  # gdb waits: it prints this
    assert gdb.reply() == b"E5f"
    assert gdb.ask(b"?") == b"T05thread:1;"  # still stopped
    assert "gdb asked for what this machine cannot do: cannot step vCPU 0: not here" in caplog.text


def test_packets_while_the_guest_runs_are_refused(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(jmp(-2))
    gdb.send(b"c")
    assert gdb.ask(b"g") == b"E10" and gdb.ask(b"m%x,1" % CODE) == b"E10"
    assert target.running
    gdb.send_raw(b"\x03")
    assert gdb.reply() == b"T02thread:1;"


def test_the_guest_ending_is_reported_with_its_status(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(NOP + NOP + HLT)
    target.regs[0]["rax"] = 7
    gdb.send(b"c")
    assert gdb.reply() == b"W07"
    assert gdb.ask(b"?") == b"W07"
    assert gdb.ask(b"g") == b"E03" and gdb.ask(b"m%x,1" % CODE) == b"E03" and gdb.ask(b"T1") == b"E03"
    assert gdb.ask(b"c") == b"E03"


def test_a_guest_killed_from_outside_is_reported(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve(b"\x0f\x0b")  # ud2: the fake has no such instruction and kills the guest
    gdb.send(b"c")
    assert gdb.reply() == b"X09"


def test_kill_ends_the_guest_and_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    gdb.send(b"k")
    assert gdb.closed()
    assert isinstance(target.wait_stop(0), Killed)


def test_detach_removes_breakpoints_and_lets_the_guest_run(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    assert gdb.ask(b"Z0,%x,1" % (CODE + 4)) == b"OK"
    assert gdb.ask(b"D") == b"OK"
    assert gdb.closed()
    assert target.detached and target.breakpoints == set() and target.running


def test_a_new_gdb_finds_the_guest_where_the_last_one_left_it(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    assert gdb.ask(b"Z0,%x,1" % (CODE + 4)) == b"OK"
    gdb.send(b"s")
    assert gdb.reply() == b"T05thread:1;"
    gdb.close()  # gone without detaching
    second = Client(gdb.address)
    assert second.ask(b"?") == b"T05thread:1;"
    assert registers_of(second.ask(b"g"))["rip"] == CODE + 1
    assert (BreakpointKind.SOFTWARE, CODE + 4, 1) in target.breakpoints and not target.running
    second.close()


# --- threads ----------------------------------------------------------------------------------
def test_every_vcpu_is_a_thread(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(vcpus=3, starts=[CODE, CODE + 1, CODE + 4])
    assert gdb.ask(b"qfThreadInfo") == b"m1,2,3"
    assert gdb.ask(b"qsThreadInfo") == b"l"
    assert gdb.ask(b"qC") == b"QC1"
    assert gdb.ask(b"T2") == b"OK" and gdb.ask(b"T3") == b"OK"
    assert gdb.ask(b"T4") == b"E03" and gdb.ask(b"Tzz") == b"E16"
    assert bytes.fromhex(gdb.ask(b"qThreadExtraInfo,2").decode()) == b"vCPU 1, long mode"
    assert gdb.ask(b"Hg2") == b"OK"
    assert registers_of(gdb.ask(b"g"))["rip"] == CODE + 1
    assert gdb.ask(b"P%s=%s" % (register_number("rdx"), b"0700000000000000")) == b"OK"
    assert target.regs[1]["rdx"] == 7 and target.regs[0]["rdx"] == 0
    assert gdb.ask(b"Hg0") == b"OK" and registers_of(gdb.ask(b"g"))["rip"] == CODE  # any: the current one
    assert gdb.ask(b"Hg9") == b"E03" and gdb.ask(b"Hx1") == b"E16"


def test_hc_picks_the_thread_that_steps(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(vcpus=2, starts=[CODE, CODE + 1])
    assert gdb.ask(b"Hc2") == b"OK"
    gdb.send(b"s")
    assert gdb.reply() == b"T05thread:2;"
    assert target.resumes[-1] == {1: Action.STEP} and target.regs[1]["rax"] == 1
    assert gdb.ask(b"qC") == b"QC2"
    assert gdb.ask(b"Hc-1") == b"OK"
    gdb.send(b"s")
    assert gdb.reply() == b"T05thread:2;"  # the current thread now


def test_vcont_gives_each_thread_its_own_action(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(vcpus=3, starts=[CODE, CODE + 1, CODE])
    assert gdb.ask(b"vCont?") == b"vCont;c;C;s;S;t"
    gdb.send(b"vCont;s:2")
    assert gdb.reply() == b"T05thread:2;"
    assert target.resumes[-1] == {1: Action.STEP}  # the others stay stopped
    assert target.regs[1]["rip"] == CODE + 4 and target.regs[0]["rip"] == CODE and target.regs[2]["rip"] == CODE
    gdb.send(b"vCont;s:1;t:3;c")  # leftmost action wins: 1 steps, 3 stays, 2 continues
    gdb.reply()
    assert target.resumes[-1] == {0: Action.STEP, 1: Action.CONTINUE}
    gdb.send(b"vCont;S05:3;C05")
    gdb.reply()
    assert target.resumes[-1] == {0: Action.CONTINUE, 1: Action.CONTINUE, 2: Action.STEP}
    assert gdb.ask(b"vCont;t") == b"T00thread:%x;" % int(gdb.ask(b"qC")[2:], 16)


def test_malformed_vcont_gets_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve(vcpus=2)
    for packet in (b"vCont", b"vCont;", b"vCont;x", b"vCont;c:9", b"vCont;c:zz", b"vCont;C", b"vCont;r1,2",
                   b"vCont;Czz"):  # fmt: skip
        assert gdb.ask(packet) in (b"E16", b"E03"), packet
    assert target.resumes == []
    assert gdb.ask(b"qC") == b"QC1"


# --- hostile and odd input --------------------------------------------------------------------
def test_a_bad_checksum_is_nakked_and_the_server_goes_on(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    gdb.send_raw(b"$g#00")
    gdb.expect(b"-")
    assert gdb.ask(b"qC") == b"QC1"


def test_a_nak_gets_the_last_reply_again(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    gdb.send_raw(frame(b"qC"))
    gdb.expect(b"+")
    gdb.acks = False
    assert gdb.reply() == b"QC1"
    gdb.send_raw(b"-")
    gdb.acks = True
    assert gdb.reply() == b"QC1"


def test_an_oversized_packet_is_refused_and_the_server_goes_on(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    huge = b"M400000,80000:" + b"00" * 0x80000
    gdb.send_raw(frame(huge))
    gdb.expect(b"+")
    assert gdb.reply() == b"E16"
    assert gdb.ask(b"m%x,1" % CODE) == b"90"


def test_garbage_between_packets_is_skipped(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    gdb.send_raw(b"hello\r\n\x00\xff#12")
    assert gdb.ask(b"qC") == b"QC1"


def test_unknown_packets_get_the_empty_reply(serve) -> None:  # type: ignore[no-untyped-def]
    _, gdb = serve()
    for packet in (b"vMustReplyEmpty", b"qTStatus", b"!", b"qSymbol::", b"vRun;", b"bc", b"", b"\xff\x00", b"qXyz"):
        assert gdb.ask(packet) == b"", packet
    assert gdb.ask(b"qAttached") == b"1"
    assert gdb.ask(b"qC") == b"QC1"


def test_a_second_gdb_is_turned_away_while_one_is_served(serve) -> None:  # type: ignore[no-untyped-def]
    target, gdb = serve()
    second = Client(gdb.address)
    assert second.closed()
    second.close()
    assert gdb.ask(b"qC") == b"QC1"


# --- the server -------------------------------------------------------------------------------
def test_a_unix_socket_is_private_and_removed_on_close(make_target, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gdb.sock"
    path.touch()
    with pytest.raises(GdbServerError, match="not a socket"):
        GdbServer(make_target(), f"unix:{path}")
    path.unlink()
    server = GdbServer(make_target(), f"unix:{path}", hold=True)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and server.gdb_address == str(path)
    gdb = Client(server.address)
    assert gdb.ask(b"qC") == b"QC1"
    gdb.close()
    server.close()
    assert not path.exists()


def test_a_port_in_use_is_a_clear_error(make_target) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        target = make_target()
        with pytest.raises(GdbServerError, match=f"cannot listen on tcp::{port}"):
            GdbServer(target, f"tcp::{port}")
        assert target.resumes == []


def test_close_returns_while_gdb_waits_for_a_running_guest(make_target) -> None:  # type: ignore[no-untyped-def]
    target = make_target(jmp(-2))
    server = GdbServer(target, "tcp::0", hold=True)
    gdb = Client(server.address)
    gdb.send(b"c")
    server.close()
    assert not server._thread.is_alive()
    assert gdb.closed()
    gdb.close()
    server.close()  # again: nothing happens


def test_close_returns_while_the_target_never_stops(make_target) -> None:  # type: ignore[no-untyped-def]
    target = make_target(jmp(-2))
    target.interrupt = lambda: None  # a target that ignores the interrupt: gdb's attach never completes
    server = GdbServer(target, "tcp::0")
    gdb = Client(server.address)
    gdb.send_raw(frame(b"?"))
    closer = threading.Thread(target=server.close)
    closer.start()
    closer.join(60)  # a guard against a hang, not a speed limit
    assert not closer.is_alive() and not server._thread.is_alive()
    gdb.close()


class LateTarget(FakeTarget):
    """Keeps its stops to itself while the server polls (once ``late`` is set): as a guest
    that ends just when its machine closes the server."""

    late = False

    def wait_stop(self, timeout: float):  # type: ignore[no-untyped-def]
        if self.late and timeout > 0:
            time.sleep(timeout)
            return None
        return super().wait_stop(timeout)


def test_close_still_tells_a_waiting_gdb_how_the_guest_ended() -> None:
    target = LateTarget(NOP + NOP + HLT)
    target.regs[0]["rax"] = 7
    server = GdbServer(target, "tcp::0", hold=True)
    gdb = Client(server.address)
    try:
        assert gdb.ask(b"?") == b"T05thread:1;"
        target.late = True
        gdb.send(b"c")
        while not target.resumes or target.running:  # until the guest has run and ended
            time.sleep(0.01)
        server.close()
        assert gdb.reply() == b"W07"
        assert gdb.closed()
    finally:
        gdb.close()
        server.close()
        target.close()


def test_close_before_any_gdb_leaves_the_target_alone(make_target) -> None:  # type: ignore[no-untyped-def]
    target = make_target()
    GdbServer(target, "tcp::0", hold=True).close()
    assert target.resumes == [] and not target.running

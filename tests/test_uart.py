"""The 16550A UART model, driven through a port-I/O bus at COM1 as a guest would."""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import uart
from pykvm.devices.bus import Bus
from pykvm.devices.uart import (
    DLL,
    DLM,
    FCR,
    FCR_FIFO_ENABLE,
    FCR_RCVR_FIFO_RESET,
    IER,
    IER_EDSSI,
    IER_ELSI,
    IER_ERBFI,
    IER_ETBEI,
    IIR,
    IIR_FIFOS_ENABLED,
    IIR_MODEM_STATUS,
    IIR_NO_INTERRUPT,
    IIR_RECEIVED_DATA,
    IIR_RECEIVER_LINE_STATUS,
    IIR_THR_EMPTY,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_BI,
    LSR_DR,
    LSR_OE,
    LSR_RCVR_FIFO_ERROR,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    MSR_CTS,
    MSR_DCD,
    MSR_DCTS,
    MSR_DDCD,
    MSR_DDSR,
    MSR_DSR,
    MSR_RI,
    MSR_TERI,
    RBR,
    RX_FIFO_DEPTH,
    SCR,
    THR,
    Uart16550,
)
from pykvm.errors import StateError

COM1 = 0x3F8
LCR_8N1 = 0x03


class Guest:
    """A UART at COM1 on a bus, with the host-side callbacks recorded."""

    def __init__(self) -> None:
        self.output: list[bytes] = []
        self.levels: list[bool] = []
        self.fast: list[bool] = []
        self.line_status: list[int | None] = []
        self.uart = Uart16550(self.output.append, self.levels.append, self.fast.append, self.line_status.append)
        self.bus = Bus("pio")
        self.bus.register(COM1, Uart16550.SIZE, self.uart)

    def inb(self, reg: int) -> int:
        return self.bus.read(COM1 + reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.bus.write(COM1 + reg, 1, value)

    @property
    def transmitted(self) -> bytes:
        return b"".join(self.output)


@pytest.fixture
def guest() -> Guest:
    return Guest()


# --- transmit, divisor, scratch -----------------------------------------------------


def test_thr_writes_reach_output_in_order(guest: Guest) -> None:
    for byte in b"hello, world\n":
        guest.outb(THR, byte)
    assert guest.transmitted == b"hello, world\n"
    assert guest.uart.stats["tx_bytes"] == 13


def test_divisor_latch_round_trips_and_leaves_ier_and_rbr_alone(guest: Guest) -> None:
    guest.outb(IER, IER_ERBFI)
    guest.outb(LCR, LCR_DLAB | LCR_8N1)
    guest.outb(DLL, 0x01)
    guest.outb(DLM, 0x80)
    assert (guest.inb(DLL), guest.inb(DLM)) == (0x01, 0x80)
    assert guest.transmitted == b""
    guest.outb(LCR, LCR_8N1)
    assert guest.inb(IER) == IER_ERBFI
    assert guest.inb(LCR) == LCR_8N1
    guest.outb(LCR, LCR_DLAB)
    assert (guest.inb(DLL), guest.inb(DLM)) == (0x01, 0x80)


def test_scratch_register_is_plain_storage(guest: Guest) -> None:
    for value in (0x00, 0x5A, 0xA5, 0xFF):
        guest.outb(SCR, value)
        assert guest.inb(SCR) == value


def test_ier_and_mcr_reserved_bits_read_zero(guest: Guest) -> None:
    guest.outb(IER, 0xFF)
    guest.outb(MCR, 0xFF)
    assert guest.inb(IER) == 0x0F
    assert guest.inb(MCR) == 0x1F


def test_lsr_and_msr_writes_are_ignored(guest: Guest) -> None:
    guest.outb(LSR, 0x00)
    guest.outb(MSR, 0x00)
    assert guest.inb(LSR) == LSR_THRE | LSR_TEMT
    assert guest.inb(MSR) == MSR_CTS | MSR_DSR | MSR_DCD


# --- receive and line status ---------------------------------------------------------


def test_lsr_after_reset_reports_transmitter_empty_and_no_data(guest: Guest) -> None:
    assert guest.inb(LSR) == LSR_THRE | LSR_TEMT


def test_lsr_transmitter_stays_empty_after_transmit(guest: Guest) -> None:
    guest.outb(THR, ord("x"))
    assert guest.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_lsr_data_ready_while_bytes_wait_and_rbr_pops_in_order(guest: Guest) -> None:
    guest.uart.receive(b"ab")
    assert guest.inb(LSR) & LSR_DR
    assert guest.inb(RBR) == ord("a")
    assert guest.inb(LSR) & LSR_DR
    assert guest.inb(RBR) == ord("b")
    assert not guest.inb(LSR) & LSR_DR
    assert guest.uart.stats["rx_bytes"] == 2


def test_empty_rbr_keeps_last_received_byte(guest: Guest) -> None:
    guest.uart.receive(b"z")
    assert guest.inb(RBR) == ord("z")
    assert guest.inb(RBR) == ord("z")
    assert not guest.inb(LSR) & LSR_DR


def test_receive_from_another_thread_loses_and_reorders_nothing(guest: Guest) -> None:
    payload = bytes(random.Random(1).randrange(256) for _ in range(100 * 1024))
    guest.outb(IER, IER_ERBFI)
    guest.outb(MCR, MCR_OUT2)

    def feed() -> None:
        chunks = random.Random(2)
        sent = 0
        while sent < len(payload):
            size = chunks.randrange(1, 4096)
            guest.uart.receive(payload[sent : sent + size])
            sent += size

    feeder = threading.Thread(target=feed)
    feeder.start()
    received = bytearray()
    deadline = time.monotonic() + 60
    while len(received) < len(payload) and time.monotonic() < deadline:
        if guest.inb(LSR) & LSR_DR:
            received.append(guest.inb(RBR))
    feeder.join()
    assert bytes(received) == payload
    assert guest.uart.stats["rx_bytes"] == len(payload)
    assert all(a != b for a, b in zip(guest.levels, guest.levels[1:])), "irq reported without a level change"
    assert guest.levels[-1] is False


# --- FIFO control --------------------------------------------------------------------


def test_iir_bits_6_7_reflect_fifo_enable(guest: Guest) -> None:
    assert guest.inb(IIR) == IIR_NO_INTERRUPT
    guest.outb(FCR, FCR_FIFO_ENABLE)
    assert guest.inb(IIR) == IIR_FIFOS_ENABLED | IIR_NO_INTERRUPT
    guest.outb(FCR, 0)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_rcvr_fifo_reset_discards_the_fifo_and_keeps_later_host_input(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    data = bytes(range(RX_FIFO_DEPTH + 4))
    guest.uart.receive(data)
    guest.outb(FCR, FCR_FIFO_ENABLE | FCR_RCVR_FIFO_RESET)
    rest = bytes(guest.inb(RBR) for _ in range(4))
    assert rest == data[RX_FIFO_DEPTH:]
    assert not guest.inb(LSR) & LSR_DR
    assert guest.uart.stats["rx_discarded"] == RX_FIFO_DEPTH


def test_fcr_bits_are_not_programmed_without_fifo_enable(guest: Guest) -> None:
    guest.uart.receive(b"keep")
    guest.outb(FCR, FCR_RCVR_FIFO_RESET)
    assert guest.inb(LSR) & LSR_DR
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_disabling_fifos_clears_the_receiver_fifo(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.uart.receive(b"gone")
    guest.outb(FCR, 0)
    assert not guest.inb(LSR) & LSR_DR
    assert guest.uart.stats["rx_discarded"] == 4


# --- break and line status interrupt --------------------------------------------------


def test_break_reveals_bi_at_the_head_and_reading_lsr_clears_it(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.uart.receive(b"a")
    guest.uart.receive_break()
    assert guest.inb(LSR) == LSR_DR | LSR_THRE | LSR_TEMT | LSR_RCVR_FIFO_ERROR
    assert guest.inb(RBR) == ord("a")
    assert guest.inb(LSR) == LSR_DR | LSR_BI | LSR_THRE | LSR_TEMT | LSR_RCVR_FIFO_ERROR
    assert guest.inb(LSR) & LSR_BI == 0
    assert guest.inb(RBR) == 0
    assert guest.inb(LSR) == LSR_THRE | LSR_TEMT


# --- interrupt identification ----------------------------------------------------------


def test_iir_reports_interrupts_in_datasheet_priority_order(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP)  # host lines drop: modem status deltas
    guest.uart.receive_break()  # line status (BI) and received data (the break's 0 byte)
    guest.outb(IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)  # THRE pending
    assert guest.inb(IIR) == IIR_RECEIVER_LINE_STATUS
    guest.inb(LSR)
    assert guest.inb(IIR) == IIR_RECEIVED_DATA
    guest.inb(RBR)
    assert guest.inb(IIR) == IIR_THR_EMPTY
    assert guest.inb(IIR) == IIR_MODEM_STATUS
    assert guest.inb(MSR) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_thre_interrupt_pending_after_each_thr_write_and_cleared_by_iir_read(guest: Guest) -> None:
    guest.outb(IER, IER_ETBEI)
    assert guest.inb(IIR) == IIR_THR_EMPTY  # enabling ETBEI with the THR empty
    assert guest.inb(IIR) == IIR_NO_INTERRUPT
    for byte in b"ab":
        guest.outb(THR, byte)
        assert guest.inb(IIR) == IIR_THR_EMPTY
        assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_thr_write_without_etbei_leaves_no_thre_interrupt(guest: Guest) -> None:
    guest.outb(THR, ord("x"))
    guest.outb(IER, IER_ERBFI)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_clearing_etbei_cancels_a_pending_thre_interrupt(guest: Guest) -> None:
    guest.outb(IER, IER_ETBEI)
    guest.outb(IER, 0)
    guest.outb(IER, IER_ERBFI)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_received_data_interrupt_pending_while_data_ready(guest: Guest) -> None:
    guest.outb(IER, IER_ERBFI)
    guest.uart.receive(b"xy")
    assert guest.inb(IIR) == IIR_RECEIVED_DATA
    guest.inb(RBR)
    assert guest.inb(IIR) == IIR_RECEIVED_DATA
    guest.inb(RBR)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT


def test_irq_line_follows_pending_interrupts_only_while_out2_is_set(guest: Guest) -> None:
    guest.outb(IER, IER_ERBFI)
    guest.uart.receive(b"x")
    assert guest.levels == []  # pending, but OUT2 gates the line
    guest.outb(MCR, MCR_OUT2)
    assert guest.levels == [True]
    guest.inb(RBR)
    assert guest.levels == [True, False]
    guest.uart.receive(b"y")
    assert guest.levels == [True, False, True]
    guest.outb(MCR, 0)
    assert guest.levels == [True, False, True, False]
    assert guest.uart.irq_level is False


def test_irq_callback_fires_only_on_level_changes(guest: Guest) -> None:
    guest.outb(MCR, MCR_OUT2)
    guest.outb(IER, IER_ERBFI | IER_ETBEI)
    guest.uart.receive(b"abc")
    guest.outb(THR, ord("z"))
    assert guest.levels == [True]
    for _ in range(3):
        guest.inb(RBR)
    guest.inb(IIR)  # clears THRE
    assert guest.levels == [True, False]


def test_irq_line_rises_for_thre_when_transmit_interrupt_enabled(guest: Guest) -> None:
    guest.outb(MCR, MCR_OUT2)
    guest.outb(IER, IER_ETBEI)
    assert guest.levels == [True]
    guest.inb(IIR)
    assert guest.levels == [True, False]
    guest.outb(THR, ord("a"))
    assert guest.levels == [True, False, True]


# --- loopback and modem status -----------------------------------------------------------


def test_loopback_sends_transmitted_bytes_to_the_receiver_not_output(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.outb(MCR, MCR_LOOP)
    for byte in b"echo":
        guest.outb(THR, byte)
    assert guest.transmitted == b""
    assert bytes(guest.inb(RBR) for _ in range(4)) == b"echo"
    guest.outb(MCR, 0)
    guest.outb(THR, ord("!"))
    assert guest.transmitted == b"!"


def test_loopback_fills_the_16_byte_fifo_then_overruns_and_drops_the_new_byte(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.outb(MCR, MCR_LOOP)
    for byte in range(RX_FIFO_DEPTH + 3):
        guest.outb(THR, byte)
    assert guest.uart.stats["rx_overruns"] == 3
    assert guest.inb(LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert not guest.inb(LSR) & LSR_OE  # reading LSR clears it
    assert bytes(guest.inb(RBR) for _ in range(RX_FIFO_DEPTH)) == bytes(range(RX_FIFO_DEPTH))
    assert not guest.inb(LSR) & LSR_DR


def test_loopback_without_fifos_overwrites_the_unread_byte(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP)
    for byte in b"abc":
        guest.outb(THR, byte)
    assert guest.uart.stats["rx_overruns"] == 2
    assert guest.inb(LSR) & (LSR_OE | LSR_DR) == LSR_OE | LSR_DR
    assert guest.inb(RBR) == ord("c")
    assert not guest.inb(LSR) & LSR_DR


def test_loopback_overrun_raises_the_receiver_line_status_interrupt(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP | MCR_OUT2)
    guest.outb(IER, IER_ELSI)
    guest.outb(THR, 1)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT
    guest.outb(THR, 2)
    assert guest.inb(IIR) == IIR_RECEIVER_LINE_STATUS
    assert guest.levels == [True]
    guest.inb(LSR)
    assert guest.levels == [True, False]


def test_a_guest_transmitting_in_loopback_cannot_grow_the_receive_queue(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.outb(MCR, MCR_LOOP)
    for _ in range(10_000):
        guest.outb(THR, 0x55)
    assert len(guest.uart.save_state().rx) == RX_FIFO_DEPTH
    assert guest.uart.stats["rx_overruns"] == 10_000 - RX_FIFO_DEPTH


def test_host_input_is_never_dropped_even_past_a_full_loopback_fifo(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.uart.receive(bytes(range(RX_FIFO_DEPTH * 2)))
    guest.outb(MCR, MCR_LOOP)
    guest.outb(THR, 0xEE)  # the receiver is full: this one is lost, the host's bytes are not
    assert bytes(guest.inb(RBR) for _ in range(RX_FIFO_DEPTH * 2)) == bytes(range(RX_FIFO_DEPTH * 2))
    assert guest.uart.stats["rx_overruns"] == 1


def test_loopback_msr_reflects_mcr_outputs(guest: Guest) -> None:
    wiring = {MCR_DTR: MSR_DSR, MCR_RTS: MSR_CTS, MCR_OUT1: MSR_RI, MCR_OUT2: MSR_DCD}
    for mcr_bit, msr_bit in wiring.items():
        guest.outb(MCR, MCR_LOOP | mcr_bit)
        assert guest.inb(MSR) & 0xF0 == msr_bit
    guest.outb(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2)  # Linux's autoconfig probe
    assert guest.inb(MSR) & 0xF0 == MSR_CTS | MSR_DCD


def test_msr_outside_loopback_reports_a_connected_host(guest: Guest) -> None:
    assert guest.inb(MSR) == MSR_CTS | MSR_DSR | MSR_DCD


def test_msr_delta_bits_set_on_line_changes_and_cleared_by_reading(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT2)  # DSR, CTS, DCD stay high
    assert guest.inb(MSR) & 0x0F == 0
    guest.outb(MCR, MCR_LOOP | MCR_DTR)  # CTS and DCD drop
    assert guest.inb(MSR) & 0x0F == MSR_DCTS | MSR_DDCD
    assert guest.inb(MSR) & 0x0F == 0


def test_msr_teri_set_only_on_the_trailing_edge_of_ri(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP)
    guest.inb(MSR)
    guest.outb(MCR, MCR_LOOP | MCR_OUT1)  # RI rises: no TERI
    assert guest.inb(MSR) & MSR_TERI == 0
    guest.outb(MCR, MCR_LOOP)  # RI falls
    assert guest.inb(MSR) & MSR_TERI


def test_modem_status_interrupt_pending_while_a_delta_is_set(guest: Guest) -> None:
    guest.outb(IER, IER_EDSSI)
    guest.outb(MCR, MCR_LOOP | MCR_OUT2)
    assert guest.inb(IIR) == IIR_MODEM_STATUS
    assert guest.levels == [True]
    guest.inb(MSR)
    assert guest.inb(IIR) == IIR_NO_INTERRUPT
    assert guest.levels == [True, False]


# --- the C fast path's condition -------------------------------------------------------------


def test_fast_transmit_ok_tracks_dlab_loopback_and_thre_interrupt(guest: Guest) -> None:
    assert guest.uart.fast_transmit_ok is True
    guest.outb(IER, IER_ERBFI)  # unrelated: no change reported
    guest.outb(LCR, LCR_DLAB)
    guest.outb(LCR, LCR_8N1)
    guest.outb(MCR, MCR_LOOP)
    guest.outb(MCR, MCR_OUT2)
    guest.outb(IER, IER_ETBEI)
    assert guest.uart.fast_transmit_ok is False
    guest.outb(IER, 0)
    assert guest.fast == [False, True, False, True, False, True]
    assert guest.uart.fast_transmit_ok is True


def test_fast_transmit_change_reported_once_per_change(guest: Guest) -> None:
    guest.outb(MCR, MCR_LOOP)
    guest.outb(IER, IER_ETBEI)  # still not ok: no new report
    guest.outb(LCR, LCR_DLAB)
    guest.outb(LCR, 0)
    guest.outb(MCR, 0)
    assert guest.fast == [False]
    guest.outb(IER, 0)
    assert guest.fast == [False, True]


# What a guest and the host do to a UART, for the fast line-status check below.
GUEST_ACCESS = st.tuples(st.sampled_from(["in", "out"]), st.integers(0, Uart16550.SIZE - 1), st.integers(0, 0xFF))
HOST_INPUT = st.one_of(st.binary(min_size=1, max_size=20), st.just("break"))
OPERATIONS = st.lists(st.one_of(GUEST_ACCESS, HOST_INPUT), max_size=60)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_fast_line_status_is_what_an_lsr_read_gives_and_such_a_read_changes_nothing(operations: list) -> None:
    """The C fast path answers 1-byte LSR reads with ``fast_line_status`` while it is not None:
    after anything the guest or the host does, that value (the last one reported to the callback)
    must be exactly what the model's own LSR read gives, and that read must change no state."""
    guest = Guest()
    guest.outb(MCR, MCR_OUT2)
    for operation in operations:
        if operation == "break":
            guest.uart.receive_break()
        elif isinstance(operation, bytes):
            guest.uart.receive(operation)
        elif operation[0] == "in":
            guest.inb(operation[1])
        else:
            guest.outb(operation[1], operation[2])
        reported = guest.line_status[-1] if guest.line_status else LSR_THRE | LSR_TEMT
        assert reported == guest.uart.fast_line_status
        if reported is not None:
            before, levels = guest.uart.save_state(), list(guest.levels)
            assert guest.inb(LSR) == reported
            assert guest.uart.save_state() == before and guest.levels == levels


def test_fast_line_status_is_off_while_an_error_is_latched(guest: Guest) -> None:
    guest.outb(FCR, FCR_FIFO_ENABLE)
    guest.outb(MCR, MCR_LOOP)
    for byte in range(RX_FIFO_DEPTH):
        guest.outb(THR, byte)
    assert guest.uart.fast_line_status == LSR_THRE | LSR_TEMT | LSR_DR
    guest.outb(THR, 0xFF)  # overrun: OE latched until LSR is read
    assert guest.uart.fast_line_status is None
    assert guest.inb(LSR) & LSR_OE
    assert guest.line_status == [LSR_THRE | LSR_TEMT | LSR_DR, None, LSR_THRE | LSR_TEMT | LSR_DR]


def test_the_fast_line_status_is_current_before_the_interrupt_rises() -> None:
    """A guest's handler may read LSR through the C fast path as soon as the line rises: the fast
    path must already have the new status, or the handler finds no data and the edge is spent."""
    reported: list[int | None] = [LSR_THRE | LSR_TEMT]
    raised: list[tuple[bool, int | None]] = []
    uart = Uart16550(lambda data: None, lambda level: raised.append((level, reported[-1])), None, reported.append)
    uart.write(MCR, 1, MCR_OUT2)
    uart.write(IER, 1, IER_ERBFI)
    uart.receive(b"x")
    assert raised[-1] == (True, LSR_THRE | LSR_TEMT | LSR_DR)
    assert uart.read(RBR, 1) == ord("x")
    assert raised[-1] == (False, LSR_THRE | LSR_TEMT)
    uart.receive(b"y")
    state = uart.save_state()
    restored = Uart16550(lambda data: None, lambda level: raised.append((level, reported[-1])), None, reported.append)
    restored.restore_state(state)
    assert raised[-1] == (True, LSR_THRE | LSR_TEMT | LSR_DR)


# --- wrong widths and hostile input -----------------------------------------------------------


def test_wide_read_splits_into_byte_registers_and_is_counted(guest: Guest) -> None:
    guest.outb(SCR, 0x5A)
    assert guest.bus.read(COM1 + LSR, 2) == (MSR_CTS | MSR_DSR | MSR_DCD) << 8 | LSR_THRE | LSR_TEMT
    assert guest.bus.read(COM1 + MSR, 4) == 0xFFFF5AB0  # lanes past SCR float
    assert guest.uart.stats["wide_reads"] == 2
    assert guest.uart.stats["missed_reads"] == 2


def test_wide_write_splits_into_byte_registers_and_is_counted(guest: Guest) -> None:
    guest.bus.write(COM1 + THR, 2, 0x0241)  # THR='A', IER=ETBEI
    assert guest.transmitted == b"A"
    assert guest.inb(IER) == IER_ETBEI
    guest.bus.write(COM1 + SCR, 4, 0x12345678)
    assert guest.inb(SCR) == 0x78
    assert guest.uart.stats["wide_writes"] == 2
    assert guest.uart.stats["missed_writes"] == 3


def test_hostile_accesses_never_raise() -> None:
    for setup in (0, LCR_DLAB, MCR_LOOP):
        guest = Guest()
        guest.uart.receive(b"\x00\xff" * 8)
        guest.uart.receive_break()
        if setup == LCR_DLAB:
            guest.outb(LCR, LCR_DLAB)
        elif setup == MCR_LOOP:
            guest.outb(MCR, MCR_LOOP | MCR_OUT2)
        for offset in range(-2, Uart16550.SIZE + 3):
            for size in (0, 1, 2, 3, 4, 8):
                for value in (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, -1, 1 << 70):
                    guest.uart.write(offset, size, value)
                    assert 0 <= guest.uart.read(offset, size) <= max((1 << (8 * size)) - 1, 0)


# --- state ------------------------------------------------------------------------------------


def test_state_carries_break_entries_in_the_receive_queue(guest: Guest) -> None:
    guest.uart.receive(b"ab")
    guest.uart.receive_break()
    guest.uart.receive(b"\x00c")
    state = guest.uart.save_state()
    assert (state.rx, state.rx_breaks) == (b"ab\x00\x00c", (2,))
    restored = Guest()
    restored.outb(FCR, FCR_FIFO_ENABLE)  # overwritten by the restore
    restored.uart.restore_state(state)
    assert restored.inb(IIR) == IIR_NO_INTERRUPT
    assert bytes(restored.inb(RBR) for _ in range(2)) == b"ab"
    assert restored.inb(LSR) & LSR_BI
    assert restored.inb(RBR) == 0
    assert not restored.inb(LSR) & LSR_BI  # the second 0 byte is data, not a break
    assert restored.inb(RBR) == 0
    assert restored.inb(RBR) == ord("c")


def test_restore_announces_the_irq_level_and_the_fast_path_condition(guest: Guest) -> None:
    guest.outb(MCR, MCR_OUT2)
    guest.outb(IER, IER_ETBEI)  # THRE pending: line high; the fast path is off
    restored = Guest()
    restored.uart.restore_state(guest.uart.save_state())
    assert (restored.levels, restored.fast) == ([True], [False])
    assert restored.uart.irq_level is True
    assert restored.uart.fast_transmit_ok is False
    quiet = Guest()
    quiet.uart.restore_state(Guest().uart.save_state())
    assert (quiet.levels, quiet.fast) == ([False], [True])  # announced even when nothing changed


def test_restore_replaces_the_whole_receive_queue(guest: Guest) -> None:
    guest.uart.receive(b"old")
    guest.uart.restore_state(Guest().uart.save_state())
    assert not guest.inb(LSR) & LSR_DR
    guest.uart.receive_break()
    assert guest.uart.save_state().rx_breaks == (0,)


@pytest.mark.parametrize(
    ("rx", "breaks"),
    [(b"a\x00", (0,)), (b"\x00\x00", (1, 0)), (b"\x00\x00", (0, 0)), (b"\x00", (1,)), (b"\x00", (-1,)),
     (b"\x00", (True,)), (b"\x00", [0]), (b"\x00", ("0",))],
)  # fmt: skip
def test_restore_rejects_break_indices_that_are_not_ascending_zero_bytes(rx: bytes, breaks: object) -> None:
    guest = Guest()
    valid = guest.uart.save_state()
    with pytest.raises(StateError, match="UartState.rx_breaks"):
        guest.uart.restore_state(dataclasses.replace(valid, rx=rx, rx_breaks=breaks))
    assert guest.uart.save_state() == valid


def test_save_refuses_a_receive_queue_beyond_the_state_limit(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uart, "RX_STATE_LIMIT", 64)
    guest.uart.receive(bytes(65))
    with pytest.raises(StateError, match="UartState.rx: 65 bytes"):
        guest.uart.save_state()
    guest.inb(RBR)
    assert len(guest.uart.save_state().rx) == 64

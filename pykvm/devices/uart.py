"""A 16550A UART (National Semiconductor PC16550D), as found at COM1 (port 0x3f8, IRQ 4).

Register names and bits follow the PC16550D datasheet:

====== ================ ================== =========================
offset read (DLAB=0)    write (DLAB=0)     DLAB=1
====== ================ ================== =========================
0      RBR receiver buf THR transmit hold  DLL divisor latch (LSB)
1      IER int enable   IER                DLM divisor latch (MSB)
2      IIR int ident    FCR FIFO control
3      LCR line control LCR
4      MCR modem ctrl   MCR
5      LSR line status  (ignored: "factory test" only)
6      MSR modem status (ignored)
7      SCR scratch      SCR
====== ================ ================== =========================

What this model does, and where it simplifies the chip:

- **Transmit is instant.** A THR write goes straight to ``output`` (or, in
  loopback, to the receiver); LSR.THRE and LSR.TEMT always read 1.  The
  THRE interrupt (IER.ETBEI) becomes pending after each THR write and when
  ETBEI goes from 0 to 1 (the THR is empty); reading IIR while it reports THRE
  clears it, as does clearing ETBEI (the datasheet's "Interrupt Control
  Functions" table).  The transmitter FIFO reset (FCR.2) has nothing to clear,
  and the LCR's set-break bit sends nothing.
- **Host input is never lost.** Host input (:meth:`Uart16550.receive`, safe to
  call from any thread) waits in an unbounded host-side queue; the guest sees
  its head in RBR, LSR.DR is set while any byte waits, and the received-data
  interrupt (IER.ERBFI) is pending while DR is.  The line has no parity or
  framing errors.  IIR reports received data (0x04), never the character
  timeout (0x0c): there is no notion of character time.
- **Loopback overruns as the chip does.** In loopback (MCR.4) a transmitted
  byte enters the receiver, which holds ``RX_FIFO_DEPTH`` (16) bytes with the
  FIFOs enabled and one (RBR) without.  A byte arriving when it is full is an
  overrun: LSR.OE is latched until LSR is read (a receiver line status
  interrupt) and a character is lost, counted in ``stats["rx_overruns"]``: in
  FIFO mode the new one, without FIFOs the unread one in RBR, which the new
  one overwrites (datasheet, LSR bit 1).
- **FIFO control.** FCR.0 enables the FIFOs (IIR bits 6-7 then read 11); the
  other FCR bits are only programmed when FCR.0 is 1 in the same write.
  "RCVR FIFO reset" (FCR.1), and clearing FCR.0 while the FIFOs are enabled,
  clear the receiver FIFO: the first 16 bytes of the queue (the chip's FIFO
  depth) are discarded and counted in ``stats["rx_discarded"]``; bytes behind
  them are host input the chip has not received yet, and are kept.
- **Break.** :meth:`Uart16550.receive_break` delivers a break (Linux's serial
  console uses one for Magic SysRq): a 0 byte enters the queue, and when it
  reaches the head LSR.BI is latched until LSR is read, raising the receiver
  line status interrupt (IER.ELSI), the highest priority.  LSR bit 7 (error
  in RCVR FIFO) is set in FIFO mode while a break byte is queued.
- **Modem lines.** Outside loopback CTS, DSR and DCD read 1 (a host is always
  attached) and RI reads 0.  In loopback (MCR.4) MSR reflects MCR: CTS=RTS,
  DSR=DTR, RI=OUT1, DCD=OUT2.  Changes set the delta bits (DCTS, DDSR, TERI
  on RI's trailing edge, DDCD), which reading MSR clears; the modem status
  interrupt (IER.EDSSI) is pending while a delta bit is set.
- **Interrupt line.** IIR priorities are the datasheet's: receiver line
  status > received data > THR empty > modem status.  As on a PC, where MCR
  OUT2 enables the IRQ driver, the line is high only while MCR.OUT2 is set
  and an enabled interrupt is pending (the register bit gates it in loopback
  too).  ``irq(level)`` is called whenever the level changes.
- **Wrong widths** are split into byte accesses (see :mod:`pykvm.devices.ports`).
- **State.** :meth:`Uart16550.save_state` gives a :class:`UartState`: the
  registers, the latched line errors and modem deltas, the pending THRE
  interrupt and the whole receive queue (FIFO and host input, breaks marked).
  :meth:`Uart16550.restore_state` takes one back into a UART built with the
  same callbacks, then calls ``on_fast_transmit_change(ok)``,
  ``on_fast_line_status_change(value)`` and ``irq(level)`` once each, so that the C
  fast path and the interrupt line match the restored registers.
- **The C fast path.** Two of its entries answer for the model while its state
  allows: THR writes (:attr:`Uart16550.fast_transmit_ok`) and LSR reads
  (:attr:`Uart16550.fast_line_status`: the value a read gives while reading it
  changes nothing, that is while no line error is latched).  The model reports each
  change of either through its callback.

``stats`` counts ``tx_bytes`` (THR writes), ``rx_bytes`` (bytes entering the
receive queue, from the host or by loopback), ``rx_discarded``, ``rx_overruns``
and the width/miss counters of :class:`~pykvm.devices.ports.ByteRegisterDevice`.

Callbacks (``output``, ``irq``, ``on_fast_transmit_change``, ``on_fast_line_status_change``) run with the
UART's lock held (a re-entrant lock, so a callback may call back into the
UART); they may be called from the vCPU thread or from the thread calling
:meth:`Uart16550.receive`.  Exceptions they raise propagate to the caller.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import StateError
from ..x86.layout import MIB
from .ports import BYTE_MASK, ByteRegisterDevice
from .state import check_bits, check_bytes, check_indices, check_int, check_record, check_type

# Register offsets (the datasheet's "Summary of Registers").
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER: interrupt enable bits.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 are always 0

# IIR: bit 0 is 0 while an interrupt is pending; bits 1-3 identify the highest one.
IIR_NO_INTERRUPT = 0x01
IIR_RECEIVER_LINE_STATUS = 0x06
IIR_RECEIVED_DATA = 0x04
IIR_THR_EMPTY = 0x02
IIR_MODEM_STATUS = 0x00
IIR_FIFOS_ENABLED = 0xC0  # bits 6-7, set when FCR.0 is 1

# FCR: FIFO control.
FCR_FIFO_ENABLE = 0x01
FCR_RCVR_FIFO_RESET = 0x02
FCR_DMA_MODE_SELECT = 0x08
FCR_RCVR_TRIGGER = 0xC0
FCR_STORED_BITS = FCR_FIFO_ENABLE | FCR_DMA_MODE_SELECT | FCR_RCVR_TRIGGER
RX_FIFO_DEPTH = 16

# LCR: line control.
LCR_DLAB = 0x80  # divisor latch access bit

# MCR: modem control.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # on a PC, enables the IRQ line driver
MCR_LOOP = 0x10
MCR_MASK = 0x1F  # bits 5-7 are always 0

# LSR: line status.
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_BI = 0x10  # break interrupt
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty
LSR_RCVR_FIFO_ERROR = 0x80
LSR_LATCHED_ERRORS = LSR_OE | LSR_BI  # the line has no parity (PE) or framing (FE) errors

# MSR: modem status (deltas in bits 0-3, line states in bits 4-7).
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of ring indicator
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD
# Lines a connected host presents outside loopback.
MSR_HOST_LINES = MSR_CTS | MSR_DSR | MSR_DCD
# In loopback, each MCR output drives an MSR input.
LOOPBACK_WIRING = ((MCR_DTR, MSR_DSR), (MCR_RTS, MSR_CTS), (MCR_OUT1, MSR_RI), (MCR_OUT2, MSR_DCD))
# Which delta bit a change of each line sets (RI is edge-specific, see _note_modem_changes).
LINE_DELTAS = ((MSR_CTS, MSR_DCTS), (MSR_DSR, MSR_DDSR), (MSR_DCD, MSR_DDCD))

# Divisor after reset: 12 is 9600 baud from the PC's 1.8432 MHz clock (QEMU's choice too).
DEFAULT_DIVISOR = 12
DIVISOR_BYTE_SHIFT = 8
DIVISOR_MASK = 0xFFFF
# A queue entry with this bit set is the 0 byte a break delivers.
BREAK_ENTRY = 0x100
# The most receive-queue bytes a state carries (host input the guest has not read yet): a bound
# for a state from an untrusted stream, far above what a console user types ahead.
RX_STATE_LIMIT = 4 * MIB

OutputCallback = Callable[[bytes], None]
IrqCallback = Callable[[bool], None]
FastTransmitCallback = Callable[[bool], None]
FastLineStatusCallback = Callable[[int | None], None]


@dataclass(frozen=True)
class UartState:
    """Everything the guest can observe of a :class:`Uart16550`."""

    divisor: int
    ier: int
    fcr: int  # the stored bits: FIFO enable, DMA mode, receiver trigger
    lcr: int
    mcr: int
    scr: int
    rbr: int  # what an empty RBR reads: the last byte the guest took from it
    line_errors: int  # latched LSR bits (OE, BI), until LSR is read
    msr_deltas: int  # MSR bits 0-3, until MSR is read
    thre_pending: bool  # the THR-empty interrupt, until IIR reports it or ETBEI is cleared
    rx: bytes  # the receive queue, head first: the FIFO, then host input not received yet
    rx_breaks: tuple[int, ...]  # ascending indices in ``rx`` of the 0 bytes that breaks delivered


class Uart16550(ByteRegisterDevice):
    """A 16550A UART: eight byte-wide registers over ports ``base .. base+7``."""

    SIZE = 8

    def __init__(
        self,
        output: OutputCallback,
        irq: IrqCallback | None = None,
        on_fast_transmit_change: FastTransmitCallback | None = None,
        on_fast_line_status_change: FastLineStatusCallback | None = None,
    ) -> None:
        super().__init__()
        self._output = output
        self._irq = irq
        self._on_fast_transmit_change = on_fast_transmit_change
        self._on_fast_line_status_change = on_fast_line_status_change
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self._rx_breaks = 0
        self._rbr = 0
        self._ier = 0
        self._fcr = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._line_errors = 0
        self._msr_deltas = 0
        self._thre_pending = False
        self._irq_level = False
        self._fast_transmit_ok = self._compute_fast_transmit_ok()
        self._fast_line_status = self._compute_fast_line_status()

    # --- the bus interface and host side ------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read (see :class:`~pykvm.devices.ports.ByteRegisterDevice`)."""
        with self._lock:
            return super().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write (see :class:`~pykvm.devices.ports.ByteRegisterDevice`)."""
        with self._lock:
            super().write(offset, size, value)

    def receive(self, data: bytes) -> None:
        """Queue host input for the guest; thread-safe, never drops a byte."""
        if not data:
            return
        with self._lock:
            self._enqueue(data)
            self._update_irq()

    def receive_break(self) -> None:
        """Deliver a break condition on the receive line; thread-safe."""
        with self._lock:
            self._rx_breaks += 1
            self._enqueue((BREAK_ENTRY,))
            self._update_irq()

    @property
    def fast_transmit_ok(self) -> bool:
        """True while a THR write means only "transmit this byte".

        That is: DLAB clear (offset 0 is THR, not DLL), not in loopback (the
        byte goes to ``output``), and the THRE interrupt disabled (a write
        changes no interrupt state).  Only then may the C fast path handle
        1-byte writes to offset 0 without calling :meth:`write`.
        """
        return self._fast_transmit_ok

    @property
    def fast_line_status(self) -> int | None:
        """What an LSR read gives while reading it changes nothing, else None.

        Reading LSR clears the latched line errors (OE, BI); while none is latched a read
        only reports the line, so the C fast path may answer 1-byte LSR reads with this
        value (the one :meth:`read` gives) without calling the model.
        """
        return self._fast_line_status

    @property
    def irq_level(self) -> bool:
        """The current level of the interrupt line."""
        return self._irq_level

    # --- state -------------------------------------------------------------------------

    def save_state(self) -> UartState:
        """The guest-visible state; raises :class:`StateError` if more than
        ``RX_STATE_LIMIT`` bytes of host input wait for the guest."""
        with self._lock:
            if len(self._rx) > RX_STATE_LIMIT:
                raise StateError(f"UartState.rx: {len(self._rx)} bytes wait in the receive queue, "
                                 f"more than a state carries ({RX_STATE_LIMIT})")  # fmt: skip
            return UartState(
                divisor=self._divisor,
                ier=self._ier,
                fcr=self._fcr,
                lcr=self._lcr,
                mcr=self._mcr,
                scr=self._scr,
                rbr=self._rbr,
                line_errors=self._line_errors,
                msr_deltas=self._msr_deltas,
                thre_pending=self._thre_pending,
                rx=bytes(entry & BYTE_MASK for entry in self._rx),
                rx_breaks=tuple(index for index, entry in enumerate(self._rx) if entry & BREAK_ENTRY),
            )

    def restore_state(self, state: UartState) -> None:
        """Take ``state``, then announce the interrupt level and the fast-path condition.

        Raises :class:`StateError`, changing nothing, if a field is invalid.
        """
        check_record(state, UartState)
        check_int(state, "divisor", 0, DIVISOR_MASK)
        check_bits(state, "ier", IER_MASK)
        check_bits(state, "fcr", FCR_STORED_BITS)
        for name in ("lcr", "scr", "rbr"):
            check_int(state, name, 0, BYTE_MASK)
        check_bits(state, "mcr", MCR_MASK)
        check_bits(state, "line_errors", LSR_LATCHED_ERRORS)
        check_bits(state, "msr_deltas", MSR_DELTAS)
        check_type(state, "thre_pending", bool)
        entries = _rx_entries(state)
        with self._lock:
            self._divisor, self._ier, self._fcr = state.divisor, state.ier, state.fcr
            self._lcr, self._mcr, self._scr, self._rbr = state.lcr, state.mcr, state.scr, state.rbr
            self._line_errors, self._msr_deltas = state.line_errors, state.msr_deltas
            self._thre_pending = state.thre_pending
            self._rx = deque(entries)
            self._rx_breaks = len(state.rx_breaks)
            self._set_fast_transmit(self._compute_fast_transmit_ok())
            self._set_fast_line_status(self._compute_fast_line_status())
            self._set_irq(self._line_level())

    # --- register decoding --------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        if self._dlab and offset in (DLL, DLM):
            return (self._divisor >> (DIVISOR_BYTE_SHIFT * offset)) & BYTE_MASK
        return self._READERS[offset](self)

    def _write_register(self, offset: int, byte: int) -> bool:
        if self._dlab and offset in (DLL, DLM):
            self._write_divisor(offset, byte)
        else:
            self._WRITERS[offset](self, byte)
        return True

    @property
    def _dlab(self) -> bool:
        return bool(self._lcr & LCR_DLAB)

    @property
    def _loopback(self) -> bool:
        return bool(self._mcr & MCR_LOOP)

    @property
    def _fifos_enabled(self) -> bool:
        return bool(self._fcr & FCR_FIFO_ENABLE)

    # --- reads ---------------------------------------------------------------------

    def _read_rbr(self) -> int:
        """Pop the head of the receive queue; an empty RBR keeps its last byte."""
        if self._rx:
            entry = self._rx.popleft()
            if entry & BREAK_ENTRY:
                self._rx_breaks -= 1
            self._rbr = entry & BYTE_MASK
            self._latch_head_errors()
            self._update_irq()
        return self._rbr

    def _read_ier(self) -> int:
        return self._ier

    def _read_iir(self) -> int:
        """The highest pending interrupt; reading it while it is THRE clears THRE."""
        ident = self._interrupt_id()
        if ident == IIR_THR_EMPTY:
            self._thre_pending = False
            self._update_irq()
        return ident | (IIR_FIFOS_ENABLED if self._fifos_enabled else 0)

    def _read_lcr(self) -> int:
        return self._lcr

    def _read_mcr(self) -> int:
        return self._mcr

    def _read_lsr(self) -> int:
        """Line status; reading it clears the latched error bits (OE, PE, FE, BI)."""
        value = self._line_status()
        self._line_errors = 0
        self._update_irq()
        return value

    def _line_status(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._line_errors
        if self._rx:
            value |= LSR_DR
        if self._fifos_enabled and self._rx_breaks:
            value |= LSR_RCVR_FIFO_ERROR
        return value

    def _read_msr(self) -> int:
        """Modem status; reading it clears the delta bits."""
        value = self._modem_lines() | self._msr_deltas
        self._msr_deltas = 0
        self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self._scr

    _READERS: dict[int, Callable[[Uart16550], int]] = {
        RBR: _read_rbr,
        IER: _read_ier,
        IIR: _read_iir,
        LCR: _read_lcr,
        MCR: _read_mcr,
        LSR: _read_lsr,
        MSR: _read_msr,
        SCR: _read_scr,
    }

    # --- writes --------------------------------------------------------------------

    def _write_thr(self, byte: int) -> None:
        """Transmit at once: to ``output``, or to the receiver in loopback."""
        self.stats["tx_bytes"] += 1
        if self._loopback:
            self._loop_back(byte)
        else:
            self._output(bytes((byte,)))
        if self._ier & IER_ETBEI:
            self._thre_pending = True
        self._update_irq()

    def _write_ier(self, byte: int) -> None:
        """Enable interrupts; enabling ETBEI makes THRE pending (the THR is empty)."""
        newly_enabled = byte & ~self._ier
        self._ier = byte & IER_MASK
        if not self._ier & IER_ETBEI:
            self._thre_pending = False
        elif newly_enabled & IER_ETBEI:
            self._thre_pending = True
        self._update_irq()
        self._update_fast_transmit()

    def _write_fcr(self, byte: int) -> None:
        """FIFO control: enabling, RCVR FIFO reset, and the stored DMA/trigger bits."""
        if not byte & FCR_FIFO_ENABLE:
            if self._fifos_enabled:
                self._discard_rx_fifo()
            self._fcr = 0
        else:
            if byte & FCR_RCVR_FIFO_RESET:
                self._discard_rx_fifo()
            self._fcr = byte & FCR_STORED_BITS
        self._update_irq()

    def _write_lcr(self, byte: int) -> None:
        self._lcr = byte
        self._update_fast_transmit()

    def _write_mcr(self, byte: int) -> None:
        """Modem control: outputs, OUT2 interrupt gate, loopback."""
        old_lines = self._modem_lines()
        self._mcr = byte & MCR_MASK
        self._note_modem_changes(old_lines, self._modem_lines())
        self._update_irq()
        self._update_fast_transmit()

    def _write_read_only(self, byte: int) -> None:
        """LSR and MSR writes are for factory test only (datasheet); ignored."""

    def _write_scr(self, byte: int) -> None:
        self._scr = byte

    def _write_divisor(self, offset: int, byte: int) -> None:
        shift = DIVISOR_BYTE_SHIFT * offset
        self._divisor = (self._divisor & ~(BYTE_MASK << shift)) | (byte << shift)

    _WRITERS: dict[int, Callable[[Uart16550, int], None]] = {
        THR: _write_thr,
        IER: _write_ier,
        FCR: _write_fcr,
        LCR: _write_lcr,
        MCR: _write_mcr,
        LSR: _write_read_only,
        MSR: _write_read_only,
        SCR: _write_scr,
    }

    # --- receive queue -------------------------------------------------------------

    def _enqueue(self, entries: Iterable[int]) -> None:
        was_empty = not self._rx
        before = len(self._rx)
        self._rx.extend(entries)
        self.stats["rx_bytes"] += len(self._rx) - before
        if was_empty:
            self._latch_head_errors()

    def _loop_back(self, byte: int) -> None:
        """A transmitted byte enters the receiver, or overruns it if it is full."""
        if len(self._rx) < (RX_FIFO_DEPTH if self._fifos_enabled else 1):
            self._enqueue((byte,))
            return
        self.stats["rx_overruns"] += 1
        self._line_errors |= LSR_OE
        if not self._fifos_enabled:  # the new character overwrites the unread one in RBR
            if self._rx[0] & BREAK_ENTRY:
                self._rx_breaks -= 1
            self._rx[0] = byte
            self.stats["rx_bytes"] += 1

    def _discard_rx_fifo(self) -> None:
        """Clear the receiver FIFO: the first RX_FIFO_DEPTH queued bytes."""
        count = min(RX_FIFO_DEPTH, len(self._rx))
        for _ in range(count):
            if self._rx.popleft() & BREAK_ENTRY:
                self._rx_breaks -= 1
        self.stats["rx_discarded"] += count
        self._line_errors &= ~LSR_BI
        self._latch_head_errors()

    def _latch_head_errors(self) -> None:
        """A break byte reaching the head of the queue reveals LSR.BI."""
        if self._rx and self._rx[0] & BREAK_ENTRY:
            self._line_errors |= LSR_BI

    # --- modem lines ---------------------------------------------------------------

    def _modem_lines(self) -> int:
        """MSR bits 4-7: the host's lines, or MCR's outputs in loopback."""
        if not self._loopback:
            return MSR_HOST_LINES
        lines = 0
        for mcr_bit, msr_bit in LOOPBACK_WIRING:
            if self._mcr & mcr_bit:
                lines |= msr_bit
        return lines

    def _note_modem_changes(self, old: int, new: int) -> None:
        for line, delta in LINE_DELTAS:
            if (old ^ new) & line:
                self._msr_deltas |= delta
        if old & MSR_RI and not new & MSR_RI:
            self._msr_deltas |= MSR_TERI

    # --- interrupt and fast-path state ---------------------------------------------

    def _interrupt_id(self) -> int:
        """IIR bits 0-3: the highest-priority enabled pending interrupt."""
        if self._ier & IER_ELSI and self._line_errors:
            return IIR_RECEIVER_LINE_STATUS
        if self._ier & IER_ERBFI and self._rx:
            return IIR_RECEIVED_DATA
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THR_EMPTY
        if self._ier & IER_EDSSI and self._msr_deltas:
            return IIR_MODEM_STATUS
        return IIR_NO_INTERRUPT

    def _line_level(self) -> bool:
        return bool(self._mcr & MCR_OUT2) and self._interrupt_id() != IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        # Every change of the line status comes through here.  The C fast path answers LSR reads: it
        # must have the new status before an interrupt can make a vCPU read it, or a guest handler
        # finds no data and never sees another edge.
        self._update_fast_line_status()
        level = self._line_level()
        if level != self._irq_level:
            self._set_irq(level)

    def _set_irq(self, level: bool) -> None:
        self._irq_level = level
        if self._irq is not None:
            self._irq(level)

    def _compute_fast_transmit_ok(self) -> bool:
        return not self._dlab and not self._loopback and not self._ier & IER_ETBEI

    def _update_fast_transmit(self) -> None:
        ok = self._compute_fast_transmit_ok()
        if ok != self._fast_transmit_ok:
            self._set_fast_transmit(ok)

    def _set_fast_transmit(self, ok: bool) -> None:
        self._fast_transmit_ok = ok
        if self._on_fast_transmit_change is not None:
            self._on_fast_transmit_change(ok)

    def _compute_fast_line_status(self) -> int | None:
        return None if self._line_errors else self._line_status()

    def _update_fast_line_status(self) -> None:
        value = self._compute_fast_line_status()
        if value != self._fast_line_status:
            self._set_fast_line_status(value)

    def _set_fast_line_status(self, value: int | None) -> None:
        self._fast_line_status = value
        if self._on_fast_line_status_change is not None:
            self._on_fast_line_status_change(value)


def _rx_entries(state: UartState) -> list[int]:
    """The receive queue's entries from ``state.rx`` and ``state.rx_breaks`` (checked)."""
    entries = list(check_bytes(state, "rx", RX_STATE_LIMIT))
    for index in check_indices(state, "rx_breaks", len(entries)):
        if entries[index]:
            raise StateError(f"UartState.rx_breaks names byte {index} of UartState.rx, which is not a 0 byte")
        entries[index] = BREAK_ENTRY
    return entries

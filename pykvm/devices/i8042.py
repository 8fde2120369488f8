"""An Intel 8042 PS/2 controller that emulates just enough to reset the machine.

Like Firecracker's ``devices/legacy/i8042.rs``: there is no keyboard or mouse
behind it, no interrupt, and commands complete at once (the input buffer is
never full).  It is registered over PC ports 0x60..0x64 (length 5):

- offset 0 (port 0x60), the data port: a read pops the output buffer (0 when
  it is empty); a write is the parameter of a pending ``0x60``/``0xD1``
  command, or else a byte for the keyboard, which is ignored (logged, counted
  in ``stats["keyboard_writes"]``).
- offset 4 (port 0x64): reads the status register (OBF, bit 0, while a byte
  waits in the output buffer; SYS, bit 2, copied from the command byte as on
  the 8042); writes are controller commands.
- offsets 1-3 (ports 0x61-0x63) are not the 8042's: reads float as 0xff and
  writes are dropped, counted as misses.

Controller commands (names from the 8042 / IBM PC AT technical reference):

====== ====================================================================
0x20   read the command byte into the output buffer
0x60   the next data write sets the command byte
0xAA   self-test: 0x55 ("test passed") into the output buffer
0xAB   keyboard interface test: 0x00 ("no error") into the output buffer
0xAD   disable the keyboard (sets command byte bit 4), recorded
0xAE   enable the keyboard (clears command byte bit 4), recorded
0xD0   read the output port into the output buffer
0xD1   the next data write sets the output port; bit 0 low is the CPU reset
       line, so a value with bit 0 clear calls ``on_reset()`` (Linux's
       ``reboot=k`` fallback writes 0xFE here)
0xF0-  pulse output port bits 0-3 low for each 0 bit of the command's low
0xFF   nibble; bit 0 is the reset line, so 0xFE (what every OS uses) and
       any even command in this range call ``on_reset()``
====== ====================================================================

Any other command is ignored with a debug log line and counted in
``stats["unknown_commands"]``.  ``on_reset()`` runs on the vCPU thread in the
middle of the port write: it should request a reset or stop of the machine,
not tear it down.  Wrong widths are split into byte accesses (see
:mod:`pykvm.devices.ports`).

State (:class:`I8042State`): the command byte, the output port, a command
waiting for its data byte, and the byte in the output buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .ports import BYTE_MASK, ByteRegisterDevice
from .state import check_choice, check_int, check_record

log = logging.getLogger(__name__)

# Port offsets inside the 0x60..0x64 range.
DATA_PORT = 0
COMMAND_PORT = STATUS_PORT = 4

# Status register bits.
STATUS_OUTPUT_FULL = 0x01  # OBF
STATUS_SYSTEM_FLAG = 0x04  # SYS, mirrors command byte bit 2

# Command byte ("controller configuration byte") bits.
CTR_KBD_INTERRUPT = 0x01
CTR_SYSTEM_FLAG = 0x04
CTR_KBD_DISABLE = 0x10
CTR_TRANSLATE = 0x40
CTR_DEFAULT = CTR_KBD_INTERRUPT | CTR_SYSTEM_FLAG | CTR_TRANSLATE

# Output port bits.
OUTPUT_PORT_RESET = 0x01  # active low: 0 holds the CPU in reset
OUTPUT_PORT_A20 = 0x02
OUTPUT_PORT_DEFAULT = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

# Controller commands.
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_OUTPUT_PORT = 0xF0  # 0xF0-0xFF: low nibble = lines NOT pulsed
CMD_PULSE_MASK = 0xF0
CMD_RESET_CPU = 0xFE  # pulse the reset line only

# Responses.
SELF_TEST_PASSED = 0x55
KBD_TEST_NO_ERROR = 0x00
EMPTY_DATA = 0x00


@dataclass(frozen=True)
class I8042State:
    """Everything the guest can observe of an :class:`I8042`."""

    command_byte: int
    output_port: int
    pending_command: int | None  # 0x60 or 0xD1, waiting for its data byte
    output: int | None  # the byte in the output buffer (OBF set), if any


class I8042(ByteRegisterDevice):
    """The 8042's data and command/status ports, enough to reset the machine."""

    SIZE = 5

    def __init__(self, on_reset: Callable[[], None]) -> None:
        super().__init__()
        self._on_reset = on_reset
        self._output: int | None = None
        self._pending: int | None = None
        self._ctr = CTR_DEFAULT
        self._output_port = OUTPUT_PORT_DEFAULT

    @property
    def keyboard_enabled(self) -> bool:
        """False after command 0xAD, True again after 0xAE (command byte bit 4)."""
        return not self._ctr & CTR_KBD_DISABLE

    def save_state(self) -> I8042State:
        """The guest-visible state."""
        return I8042State(self._ctr, self._output_port, self._pending, self._output)

    def restore_state(self, state: I8042State) -> None:
        """Take ``state``; raises :class:`StateError`, changing nothing, if a field is invalid."""
        check_record(state, I8042State)
        check_int(state, "command_byte", 0, BYTE_MASK)
        check_int(state, "output_port", 0, BYTE_MASK)
        check_choice(state, "pending_command", (None, CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT))
        if state.output is not None:
            check_int(state, "output", 0, BYTE_MASK)
        self._ctr, self._output_port = state.command_byte, state.output_port
        self._pending, self._output = state.pending_command, state.output

    def _read_register(self, offset: int) -> int | None:
        if offset == DATA_PORT:
            return self._read_data()
        if offset == STATUS_PORT:
            return self._status()
        return None

    def _write_register(self, offset: int, byte: int) -> bool:
        if offset == DATA_PORT:
            self._write_data(byte)
        elif offset == COMMAND_PORT:
            self._command(byte)
        else:
            return False
        return True

    def _status(self) -> int:
        status = STATUS_OUTPUT_FULL if self._output is not None else 0
        if self._ctr & CTR_SYSTEM_FLAG:
            status |= STATUS_SYSTEM_FLAG
        return status

    def _read_data(self) -> int:
        byte, self._output = self._output, None
        return EMPTY_DATA if byte is None else byte

    def _write_data(self, byte: int) -> None:
        pending, self._pending = self._pending, None
        if pending == CMD_WRITE_CTR:
            self._ctr = byte
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self._write_output_port(byte)
        else:
            self.stats["keyboard_writes"] += 1
            log.debug("i8042: keyboard byte %#x ignored (no keyboard)", byte)

    def _write_output_port(self, byte: int) -> None:
        self._output_port = byte
        if not byte & OUTPUT_PORT_RESET:
            self._reset()

    def _command(self, command: int) -> None:
        """Run a controller command; a new command cancels a pending parameter."""
        self._pending = None
        if command in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT):
            self._pending = command
        elif command in self._RESPONSES:
            self._output = self._RESPONSES[command](self)
        elif command in (CMD_KBD_DISABLE, CMD_KBD_ENABLE):
            self._set_keyboard_enabled(command == CMD_KBD_ENABLE)
        elif command & CMD_PULSE_MASK == CMD_PULSE_OUTPUT_PORT:
            self._pulse_output_port(command)
        else:
            self.stats["unknown_commands"] += 1
            log.debug("i8042: unknown controller command %#x ignored", command)

    def _set_keyboard_enabled(self, enabled: bool) -> None:
        self._ctr = self._ctr & ~CTR_KBD_DISABLE if enabled else self._ctr | CTR_KBD_DISABLE

    def _pulse_output_port(self, command: int) -> None:
        """Command 0xF0-0xFF: a 0 in bit 0 pulses the reset line."""
        if not command & OUTPUT_PORT_RESET:
            self._reset()

    def _reset(self) -> None:
        self.stats["resets"] += 1
        log.debug("i8042: guest requested a CPU reset")
        self._on_reset()

    _RESPONSES: dict[int, Callable[[I8042], int]] = {
        CMD_READ_CTR: lambda self: self._ctr,
        CMD_SELF_TEST: lambda self: SELF_TEST_PASSED,
        CMD_KBD_TEST: lambda self: KBD_TEST_NO_ERROR,
        CMD_READ_OUTPUT_PORT: lambda self: self._output_port,
    }

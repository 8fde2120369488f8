"""One gdb session: the remote protocol's commands, carried out on a :class:`DebugTarget`.

:class:`Session` answers packet data with reply data (framing and acks are the
connection's, :mod:`pykvm.gdbstub.server`).  It serves gdb's all-stop mode: a resume
command (``c``, ``s``, ``vCont``) gets no reply until the target stops, and the
connection then sends :meth:`Session.stopped`.

Every vCPU is a thread; a thread id is the vCPU id + 1 (gdb reserves 0 for "any
thread" and -1 for "all").  A malformed packet gets ``E16`` (EINVAL), an unknown thread
or a guest that ended ``E03`` (ESRCH), an unmapped address ``E0e`` (EFAULT), something
the target cannot do ``E5f`` (EOPNOTSUPP), any other failure of the target ``E05``
(EIO), and a packet this stub does not know the empty reply.  Nothing a client sends
makes :meth:`Session.handle` raise.

An error packet carries no words that gdb shows, so what the target cannot do is also
logged, and when the target refuses to resume, its reason goes to gdb's console first
(:meth:`Session.take_console_output`: gdb, waiting for a stop reply, prints ``O``
packets).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping

from .packets import MalformedPacket, escape, parse_hex_bytes, parse_int, unescape
from .registers import X86_64, Register, layout_for
from .target import (
    Action,
    BreakpointKind,
    DebugTarget,
    DebugTargetError,
    Exited,
    Killed,
    Stop,
    StopEvent,
    StopReason,
    UnmappedAddressError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

#: The largest packet announced to gdb (its data, without ``$``, ``#`` and checksum).
PACKET_SIZE = 0x4000
ADDRESS_SPACE = 1 << 64
SIGINT, SIGTRAP, SIGKILL = 2, 5, 9
OK = b"OK"
E_NO_THREAD = b"E03"  # ESRCH
E_TARGET = b"E05"  # EIO
E_FAULT = b"E0e"  # EFAULT
E_BUSY = b"E10"  # EBUSY: a request while the target runs
E_MALFORMED = b"E16"  # EINVAL
E_UNSUPPORTED = b"E5f"  # EOPNOTSUPP
E_XFER = b"E00"  # qXfer's "malformed, or annex invalid"

_NAMED_COMMAND = re.compile(rb"[qQv][A-Za-z]+\??")
_WATCH_FIELDS = {
    StopReason.WRITE_WATCHPOINT: b"watch",
    StopReason.READ_WATCHPOINT: b"rwatch",
    StopReason.ACCESS_WATCHPOINT: b"awatch",
}


class Refused(Exception):
    """A well-formed request the session turns down; ``reply`` is the error packet it gets."""

    def __init__(self, reply: bytes, message: str) -> None:
        super().__init__(message)
        self.reply = reply


class Session:
    """One gdb connection's view of the target: selected threads, layout, features, run state."""

    def __init__(self, target: DebugTarget, stop: StopEvent) -> None:
        """Start serving a target that is stopped because of ``stop``."""
        self.target = target
        self.vcpus = tuple(target.vcpu_ids())
        self.event = stop  # why the target is stopped (while not running)
        self.running = False
        self.finished = False  # the connection ends once this reply is sent (D, k)
        self.no_ack = False
        self._console: list[str] = []  # for gdb's console, before the next reply
        self.current = stop.vcpu if isinstance(stop, Stop) else self.vcpus[0]  # the last stop's thread
        self._general = self.current  # Hg: the thread registers and memory are read through
        self._continue: int | None = None  # Hc: the thread ``c``/``s`` act on; None for all
        self._gdb_features: frozenset[bytes] = frozenset()
        # One layout for the whole session (gdb cannot change it): the first vCPU's mode now.
        self.layout = layout_for(target.cpu_mode(self.vcpus[0])) if isinstance(stop, Stop) else X86_64
        self._commands: dict[bytes, Callable[[bytes], bytes | None]] = {
            b"?": self._halt_reason,
            b"g": self._read_registers,
            b"G": self._write_registers,
            b"p": self._read_register,
            b"P": self._write_register,
            b"m": self._read_memory,
            b"M": self._write_memory,
            b"X": self._write_binary_memory,
            b"Z": self._insert_breakpoint,
            b"z": self._remove_breakpoint,
            b"c": self._continue_all,
            b"C": self._continue_with_signal,
            b"s": self._step,
            b"S": self._step_with_signal,
            b"H": self._select_thread,
            b"T": self._thread_alive,
            b"D": self._detach,
            b"k": self._kill,
            b"qSupported": self._supported,
            b"qXfer": self._transfer,
            b"qfThreadInfo": self._first_thread_info,
            b"qsThreadInfo": self._next_thread_info,
            b"qC": self._current_thread,
            b"qThreadExtraInfo": self._thread_extra_info,
            b"qAttached": self._attached,
            b"QStartNoAckMode": self._start_no_ack_mode,
            b"vCont?": self._vcont_actions,
            b"vCont": self._vcont,
        }

    # --- dispatch ----------------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes | None:
        """The reply to one packet: None when there is none (yet), ``b""`` for an unknown one."""
        match = _NAMED_COMMAND.match(data)
        name = match.group() if match else data[:1]
        command = self._commands.get(name)
        if command is None:
            return b""
        if self.running:
            log.debug("gdb sent %r while the target runs", data[:40])
            return E_BUSY
        try:
            return command(data[len(name) :])
        except MalformedPacket as err:
            reply, message = E_MALFORMED, str(err)
        except Refused as err:
            reply, message = err.reply, str(err)
        except UnmappedAddressError as err:
            reply, message = E_FAULT, str(err)
        except UnsupportedError as err:
            reply, message = E_UNSUPPORTED, str(err)
        except DebugTargetError as err:
            reply, message = E_TARGET, str(err)
        except Exception:  # a bug here must not end the session, nor the guest
            log.exception("gdb packet %r failed", data[:40])
            return E_TARGET
        if reply == E_UNSUPPORTED:
            log.warning("gdb asked for what this machine cannot do: %s", message)
        else:
            log.debug("gdb packet %r refused: %s", data[:40], message)
        return reply

    def take_console_output(self) -> list[str]:
        """Lines to show on gdb's console (as ``O`` packets) before the reply to the last packet."""
        lines, self._console = self._console, []
        return lines

    def stopped(self, event: StopEvent) -> bytes:
        """The target stopped after a resume: note it, and give the stop reply."""
        self.running = False
        self.event = event
        if isinstance(event, Stop):
            self.current = self._general = event.vcpu
        return self._stop_reply(event)

    def _stop_reply(self, event: StopEvent) -> bytes:
        if isinstance(event, Exited):
            return b"W%02x" % (event.status & 0xFF)
        if isinstance(event, Killed):
            return b"X%02x" % SIGKILL
        signal = SIGINT if event.reason is StopReason.INTERRUPTED else SIGTRAP
        reply = b"T%02xthread:%x;" % (signal, _thread_id(event.vcpu))
        if event.reason is StopReason.SOFTWARE_BREAKPOINT and b"swbreak+" in self._gdb_features:
            reply += b"swbreak:;"
        elif event.reason is StopReason.HARDWARE_BREAKPOINT and b"hwbreak+" in self._gdb_features:
            reply += b"hwbreak:;"
        elif event.reason in _WATCH_FIELDS and event.address is not None:
            reply += b"%s:%x;" % (_WATCH_FIELDS[event.reason], event.address)
        return reply

    def _require_live(self) -> None:
        if not isinstance(self.event, Stop):
            raise Refused(E_NO_THREAD, "the guest has ended")

    # --- stop state and threads --------------------------------------------------------------
    def _halt_reason(self, args: bytes) -> bytes:
        """``?``: why the target is stopped (as QEMU, SIGTRAP for any stop)."""
        if isinstance(self.event, Stop):
            return b"T%02xthread:%x;" % (SIGTRAP, _thread_id(self.current))
        return self._stop_reply(self.event)

    def _thread(self, field: bytes) -> int | None:
        """The vCPU a thread id names: None for all (-1), the current one for any (0)."""
        if field == b"-1":
            return None
        thread = parse_int(field, "thread id", 8)
        if thread == 0:
            return self.current
        if thread - 1 not in self.vcpus:
            raise Refused(E_NO_THREAD, f"there is no thread {thread}")
        return thread - 1

    def _select_thread(self, args: bytes) -> bytes:
        """``Hg``/``Hc``: the thread for registers and memory / for ``c`` and ``s``."""
        operation, vcpu = args[:1], self._thread(args[1:])
        if operation == b"g":
            self._general = self.current if vcpu is None else vcpu
        elif operation == b"c":
            self._continue = vcpu
        else:
            raise MalformedPacket(f"H{operation!r} selects no known operation")
        return OK

    def _thread_alive(self, args: bytes) -> bytes:
        self._require_live()
        self._thread(args)
        return OK

    def _first_thread_info(self, args: bytes) -> bytes:
        return b"m" + b",".join(b"%x" % _thread_id(vcpu) for vcpu in self.vcpus)

    def _next_thread_info(self, args: bytes) -> bytes:
        return b"l"

    def _current_thread(self, args: bytes) -> bytes:
        return b"QC%x" % _thread_id(self.current)

    def _thread_extra_info(self, args: bytes) -> bytes:
        if not args.startswith(b","):
            raise MalformedPacket("qThreadExtraInfo needs ,thread-id")
        vcpu = self._thread(args[1:])
        if vcpu is None:
            raise MalformedPacket("qThreadExtraInfo names one thread")
        text = f"vCPU {vcpu}"
        if isinstance(self.event, Stop):
            text += f", {self.target.cpu_mode(vcpu).value}"
        return text.encode().hex().encode()

    # --- registers ---------------------------------------------------------------------------
    def _registers(self) -> Mapping[str, int]:
        self._require_live()
        return self.target.read_registers(self._general)

    def _register(self, field: bytes) -> Register:
        number = parse_int(field, "register number", 8)
        if number >= len(self.layout.registers):
            raise MalformedPacket(f"there is no register {number} (the layout has {len(self.layout.registers)})")
        return self.layout.registers[number]

    def _read_registers(self, args: bytes) -> bytes:
        return self.layout.encode(self._registers())

    def _write_registers(self, args: bytes) -> bytes:
        changes = self.layout.decode(args, self._registers())
        if changes:
            self.target.write_registers(self._general, changes)
        return OK

    def _read_register(self, args: bytes) -> bytes:
        return self.layout.encode_one(self._register(args), self._registers())

    def _write_register(self, args: bytes) -> bytes:
        number, equals, value = args.partition(b"=")
        if not equals:
            raise MalformedPacket("P needs register=value")
        register, current = self._register(number), self._registers()
        if register.source not in current:
            raise UnsupportedError(f"{register.name} is not available on this target")
        self.target.write_registers(self._general, {register.source: self.layout.decode_one(register, value, current)})
        return OK

    # --- memory ------------------------------------------------------------------------------
    def _range(self, field: bytes) -> tuple[int, int]:
        """``address,length`` (hex), inside the 64-bit address space."""
        address, comma, length = field.partition(b",")
        if not comma:
            raise MalformedPacket("expected address,length")
        start, size = parse_int(address, "address"), parse_int(length, "length")
        if start + size > ADDRESS_SPACE:
            raise MalformedPacket(f"{size:#x} bytes at {start:#x} run past the end of the address space")
        return start, size

    def _read_memory(self, args: bytes) -> bytes:
        """``m``: a read longer than a reply can carry is clipped (gdb reads the rest next)."""
        address, length = self._range(args)
        self._require_live()
        length = min(length, PACKET_SIZE // 2)
        if not length:
            return b""
        try:
            data = self.target.read_memory(self._general, address, length)
        except UnmappedAddressError as err:
            readable = err.address - address
            if not 0 < readable < length:
                raise
            data = self.target.read_memory(self._general, address, readable)  # what precedes the hole
        return data[:length].hex().encode()

    def _write_memory(self, args: bytes) -> bytes:
        header, colon, data = args.partition(b":")
        return self._write(header, colon, parse_hex_bytes(data, "M data"))

    def _write_binary_memory(self, args: bytes) -> bytes:
        header, colon, data = args.partition(b":")
        return self._write(header, colon, unescape(data))

    def _write(self, header: bytes, colon: bytes, data: bytes) -> bytes:
        if not colon:
            raise MalformedPacket("expected address,length:data")
        address, length = self._range(header)
        if length != len(data):
            raise MalformedPacket(f"the packet says {length} bytes and carries {len(data)}")
        self._require_live()
        if data:
            self.target.write_memory(self._general, address, data)
        return OK

    # --- breakpoints -------------------------------------------------------------------------
    def _insert_breakpoint(self, args: bytes) -> bytes:
        return self._change_breakpoint(args, self.target.insert_breakpoint)

    def _remove_breakpoint(self, args: bytes) -> bytes:
        return self._change_breakpoint(args, self.target.remove_breakpoint)

    def _change_breakpoint(self, args: bytes, change: Callable[[BreakpointKind, int, int], None]) -> bytes:
        """``Z``/``z`` ``type,address,kind`` (conditions after ``;`` are not offered, so not expected)."""
        fields = args.split(b",")
        if len(fields) != 3:
            raise MalformedPacket("expected type,address,kind")
        kind = parse_int(fields[0], "breakpoint type", 1)
        address, length = self._range(fields[1] + b"," + fields[2])
        if not length:
            raise MalformedPacket("a breakpoint covers at least one byte")
        if kind not in _BREAKPOINT_KINDS:
            return b""
        self._require_live()
        change(_BREAKPOINT_KINDS[kind], address, length)
        return OK

    # --- running -----------------------------------------------------------------------------
    def _resume(self, actions: Mapping[int, Action]) -> None:
        self._require_live()
        try:
            self.target.resume(actions)
        except DebugTargetError as err:
            self._console.append(f"{err}\n")  # gdb waits for a stop reply: it shows console output
            raise
        self.running = True

    def _set_pc(self, vcpu: int, field: bytes) -> None:
        if field:
            address = parse_int(field, "resume address")
            self._require_live()
            self.target.write_registers(vcpu, {"rip": address})

    def _continue_all(self, args: bytes) -> None:
        """``c [address]``: every vCPU continues (the Hc thread, or the current one, from ``address``)."""
        self._set_pc(self.current if self._continue is None else self._continue, args)
        self._resume({vcpu: Action.CONTINUE for vcpu in self.vcpus})

    def _step(self, args: bytes) -> None:
        """``s [address]``: the Hc thread, or the current one, executes one instruction; the others stay."""
        vcpu = self.current if self._continue is None else self._continue
        self._set_pc(vcpu, args)
        self._resume({vcpu: Action.STEP})

    def _continue_with_signal(self, args: bytes) -> None:
        """``C sig[;address]``: a guest has no signals to be given, so ``sig`` is ignored (as QEMU)."""
        self._continue_all(_without_signal(args))

    def _step_with_signal(self, args: bytes) -> None:
        self._step(_without_signal(args))

    def _vcont_actions(self, args: bytes) -> bytes:
        return b"vCont;c;C;s;S;t"

    def _vcont(self, args: bytes) -> bytes | None:
        """``vCont;action[:thread]...``: each vCPU takes the leftmost action naming it; ``t`` and no
        action leave it stopped.  If nothing is resumed, the stop is reported at once (signal 0)."""
        if not args.startswith(b";"):
            raise MalformedPacket("vCont needs ;action")
        chosen: dict[int, Action | None] = {}
        for part in args[1:].split(b";"):
            action, colon, thread = part.partition(b":")
            what = _vcont_action(action)
            vcpu = self._thread(thread) if colon else None
            for each in self.vcpus if vcpu is None else (vcpu,):
                chosen.setdefault(each, what)
        actions = {vcpu: what for vcpu, what in chosen.items() if what is not None}
        if not actions:
            self._require_live()
            return b"T00thread:%x;" % _thread_id(self.current)
        self._resume(actions)
        return None

    def _detach(self, args: bytes) -> bytes:
        """``D``: breakpoints go, the guest runs on, gdb leaves."""
        self.target.detach()
        self.finished = True
        return OK

    def _kill(self, args: bytes) -> None:
        """``k``: the guest ends; gdb expects no reply."""
        if isinstance(self.event, Stop):
            self.target.kill()
        self.finished = True

    # --- queries -----------------------------------------------------------------------------
    def _supported(self, args: bytes) -> bytes:
        self._gdb_features = frozenset(args.lstrip(b":").split(b";"))
        return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;swbreak+;hwbreak+;vContSupported+"
                % PACKET_SIZE)  # fmt: skip

    def _start_no_ack_mode(self, args: bytes) -> bytes:
        self.no_ack = True
        return OK

    def _attached(self, args: bytes) -> bytes:
        """Attached to a guest that existed before: gdb detaches, not kills, when it quits."""
        return b"1"

    def _transfer(self, args: bytes) -> bytes:
        """``qXfer:features:read:target.xml:offset,length``: the target description, in pieces."""
        fields = args.split(b":")
        if len(fields) != 5 or fields[0]:
            raise MalformedPacket("expected qXfer:object:read:annex:offset,length")
        if fields[1:3] != [b"features", b"read"]:
            return b""
        if fields[3] != b"target.xml":
            raise Refused(E_XFER, f"there is no feature file {fields[3][:40]!r}")
        offset, length = self._range(fields[4])
        document = self.layout.target_xml
        piece = document[offset : offset + min(length, (PACKET_SIZE - 1) // 2)]  # room to escape it all
        return (b"l" if offset + len(piece) >= len(document) else b"m") + escape(piece)


_BREAKPOINT_KINDS = {kind.value: kind for kind in BreakpointKind}
_VCONT_ACTIONS = {b"c": Action.CONTINUE, b"s": Action.STEP, b"t": None}


def _thread_id(vcpu: int) -> int:
    return vcpu + 1


def _without_signal(args: bytes) -> bytes:
    """The address of ``C``/``S`` arguments ``sig[;address]``, the signal checked."""
    signal, _, address = args.partition(b";")
    parse_int(signal, "signal", 2)
    return address


def _vcont_action(action: bytes) -> Action | None:
    """A vCont action; ``C``/``S`` carry a signal, ignored as for ``C``/``S`` packets."""
    if action[:1] in (b"C", b"S") and len(action) == 3:
        parse_int(action[1:], "signal", 2)
        action = action[:1].lower()
    if action not in _VCONT_ACTIONS:
        raise MalformedPacket(f"unknown vCont action {action[:10]!r}")
    return _VCONT_ACTIONS[action]

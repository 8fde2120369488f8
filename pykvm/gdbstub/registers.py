"""The register layouts gdb is given: the target description and the ``g``/``G`` packets.

One table per layout says, in order, each register gdb sees: its name, width and type,
and the target register (:data:`~pykvm.gdbstub.target.REGISTER_NAMES`) it shows.  The
target description (``target.xml``) and the packing of ``g``, ``G``, ``p`` and ``P`` are
both made from that table, so they cannot disagree.

The order is QEMU's (``target/i386/gdbstub.c``, ``gdb-xml/i386-64bit.xml``): general
registers in gdb's order, the instruction pointer, eflags, the six selectors,
fs_base/gs_base/k_gs_base, cr0/cr2/cr3/cr4/cr8/efer, then the x87 registers, and the SSE
registers in their own feature.  gdb accepts an ``org.gnu.gdb.i386.core`` feature only
with the x87 registers in it (``i386_validate_tdesc_p``), so they are always described;
a target that cannot read them leaves them out and gdb shows them as unavailable.

gdb cannot change register sizes within a session, so one layout serves a whole
connection.  As QEMU does, a value wider than its field (a 64-bit register in the i386
layout) is shown truncated, and writing the field keeps the register's upper bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .packets import MalformedPacket, parse_hex_bytes
from .target import CpuMode

CORE_FEATURE = "org.gnu.gdb.i386.core"
SSE_FEATURE = "org.gnu.gdb.i386.sse"

# gdb's names for the general registers, in the order of its i386 and amd64 register numbers.
_GPRS_64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # fmt: skip
_GPRS_32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_POINTERS = {"rsp": "data_ptr", "rbp": "data_ptr", "esp": "data_ptr", "ebp": "data_ptr"}
_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_EFLAGS_BITS = ((0, "CF"), (1, ""), (2, "PF"), (4, "AF"), (6, "ZF"), (7, "SF"), (8, "TF"), (9, "IF"),
                (10, "DF"), (11, "OF"), (14, "NT"), (16, "RF"), (17, "VM"), (18, "AC"), (19, "VIF"),
                (20, "VIP"), (21, "ID"))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Register:
    """One register as gdb sees it, and the target register it shows."""

    name: str
    source: str
    bits: int
    type: str
    feature: str = CORE_FEATURE
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bits // 8

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


class Layout:
    """A register layout: gdb's architecture name and its registers in packet order."""

    def __init__(self, architecture: str, registers: tuple[Register, ...]) -> None:
        self.architecture = architecture
        self.registers = registers
        self.size = sum(register.size for register in registers)  # bytes of registers in a ``g`` reply
        self.target_xml = _target_xml(architecture, registers)

    def encode(self, values: Mapping[str, int]) -> bytes:
        """The ``g`` reply: every register in hex, ``xx`` for those the target did not give."""
        return b"".join(self.encode_one(register, values) for register in self.registers)

    def encode_one(self, register: Register, values: Mapping[str, int]) -> bytes:
        value = values.get(register.source)
        if value is None:
            return b"xx" * register.size
        return (value & register.mask).to_bytes(register.size, "little").hex().encode()

    def decode(self, data: bytes, current: Mapping[str, int]) -> dict[str, int]:
        """The registers a ``G`` packet changes, by target name (unavailable fields are skipped)."""
        if len(data) != 2 * self.size:
            raise MalformedPacket(f"{len(data)} hex digits of registers where {2 * self.size} are needed")
        changes: dict[str, int] = {}
        offset = 0
        for register in self.registers:
            field = data[offset : offset + 2 * register.size]
            offset += 2 * register.size
            if field == b"xx" * register.size or register.source not in current:
                continue
            value = self.decode_one(register, field, current)
            if value != current[register.source]:
                changes[register.source] = value
        return changes

    def decode_one(self, register: Register, field: bytes, current: Mapping[str, int]) -> int:
        """The target register's new value from one field (upper bits beyond the field kept)."""
        if len(field) != 2 * register.size:
            raise MalformedPacket(f"{register.name} takes {2 * register.size} hex digits, not {len(field)}")
        value = int.from_bytes(parse_hex_bytes(field, register.name), "little")
        return (current.get(register.source, 0) & ~register.mask) | value


def _target_xml(architecture: str, registers: tuple[Register, ...]) -> bytes:
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             f"<architecture>{architecture}</architecture>"]  # fmt: skip
    features: dict[str, list[str]] = {}
    for register in registers:
        group = f' group="{register.group}"' if register.group else ""
        features.setdefault(register.feature, []).append(
            f'<reg name="{register.name}" bitsize="{register.bits}" type="{register.type}"{group}/>'
        )
    for feature, regs in features.items():
        lines.append(f'<feature name="{feature}">')
        lines.extend(_TYPES[feature])
        lines.extend(regs)
        lines.append("</feature>")
    lines.append("</target>")
    return ("\n".join(lines) + "\n").encode()


_TYPES = {
    CORE_FEATURE: ['<flags id="i386_eflags" size="4">']
    + [f'<field name="{name}" start="{bit}" end="{bit}"/>' for bit, name in _EFLAGS_BITS]
    + ["</flags>"],
    SSE_FEATURE: [
        '<vector id="v4f" type="ieee_single" count="4"/>',
        '<vector id="v2d" type="ieee_double" count="2"/>',
        '<vector id="v16i8" type="int8" count="16"/>',
        '<vector id="v8i16" type="int16" count="8"/>',
        '<vector id="v4i32" type="int32" count="4"/>',
        '<vector id="v2i64" type="int64" count="2"/>',
        '<union id="vec128">',
        '<field name="v4_float" type="v4f"/>',
        '<field name="v2_double" type="v2d"/>',
        '<field name="v16_int8" type="v16i8"/>',
        '<field name="v8_int16" type="v8i16"/>',
        '<field name="v4_int32" type="v4i32"/>',
        '<field name="v2_int64" type="v2i64"/>',
        '<field name="uint128" type="uint128"/>',
        "</union>",
    ],
}


def _layout(architecture: str, bits: int, gprs: tuple[str, ...], xmm_count: int) -> Layout:
    """QEMU's order for a ``bits``-wide CPU whose general registers gdb names ``gprs``."""
    word = f"int{bits}"
    wide = "r" if bits == 64 else "e"
    registers = [Register(name, "r" + name[1:], bits, _POINTERS.get(name, word)) for name in gprs]
    registers += [
        Register(wide + "ip", "rip", bits, "code_ptr"),
        Register("eflags", "rflags", 32, "i386_eflags"),
        *(Register(name, name, 32, "int32") for name in _SELECTORS),
        Register("fs_base", "fs_base", bits, word),
        Register("gs_base", "gs_base", bits, word),
        Register("k_gs_base", "kernel_gs_base", bits, word),
        *(Register(name, name, bits, word, group="system") for name in _CONTROL),
        *(Register(f"st{i}", f"st{i}", 80, "i387_ext") for i in range(8)),
        *(Register(name, name, 32, "int", group="float") for name in _X87_CONTROL),
        *(Register(f"xmm{i}", f"xmm{i}", 128, "vec128", SSE_FEATURE) for i in range(xmm_count)),
        Register("mxcsr", "mxcsr", 32, "int", SSE_FEATURE, group="vector"),
    ]
    return Layout(architecture, tuple(registers))


X86_64 = _layout("i386:x86-64", 64, _GPRS_64, 16)
I386 = _layout("i386", 32, _GPRS_32, 8)


def layout_for(mode: CpuMode) -> Layout:
    """The layout for a vCPU in ``mode``: x86-64 in long mode, i386 otherwise.

    gdb has no real-mode architecture: as QEMU, a real-mode vCPU gets the i386 layout
    (``eip`` holds IP; ``set architecture i8086`` disassembles 16-bit code) and memory
    addresses are linear (``cs * 16 + ip``).
    """
    return X86_64 if mode is CpuMode.LONG else I386

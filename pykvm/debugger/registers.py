"""A vCPU's registers under the gdb server's names (:data:`pykvm.gdbstub.REGISTER_NAMES`).

The general registers come from ``KVM_GET_REGS``, selectors, segment bases, control
registers and EFER from ``KVM_GET_SREGS``, the swapgs base from its MSR, and the x87 and
SSE registers from the legacy region of the XSAVE area (``KVM_GET_XSAVE``, laid out as
FXSAVE's: Intel SDM vol. 1, 10.5.1; ``KVM_GET_FPU`` has no MXCSR).  Writes go back through
the same ioctls, each read-modify-write.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..errors import KvmIoctlError
from ..gdbstub import CpuMode, DebugTargetError, UnsupportedError
from ..info import Privilege
from ..kvm import Vcpu
from ..kvm.state import GPR_NAMES, Segment, SRegs

MSR_KERNEL_GS_BASE = 0xC0000102
CR0_PE = 1 << 0
EFER_LMA = 1 << 10
USER_CPL = 3
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_GENERAL = (*GPR_NAMES, "rip", "rflags")
_X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
_SSE = (*(f"xmm{i}" for i in range(16)), "mxcsr")
_STACK = tuple(f"st{i}" for i in range(8))
_FPU_NAMES = frozenset((*_STACK, *_X87_CONTROL, *_SSE))
# The XSAVE area's legacy region (FXSAVE's 64-bit layout): FCW, FSW, the abridged tag word (one bit
# per physical register), FOP, the 64-bit instruction and operand pointers, MXCSR, MXCSR_MASK, ST(0)-
# ST(7) in 16-byte slots, XMM0-XMM15.  XSTATE_BV, in the XSAVE header after the 512-byte legacy
# region, says which components hold state; the others read as their initial values.
_FXSAVE = struct.Struct("<HHBxHQQII128s256s")
_XSTATE_BV = struct.Struct("<Q")
_XSTATE_BV_OFFSET = 512
_X87_AND_SSE = 0b11
_SLOT = 16  # bytes per ST and XMM slot
_X87_BITS = 80
_TAG_VALID, _TAG_ZERO, _TAG_SPECIAL, _TAG_EMPTY = 0, 1, 2, 3
_FOP_MASK = 0x7FF


def cpu_mode(sregs: SRegs) -> CpuMode:
    """The mode the segment and control registers put the vCPU in."""
    if not sregs.cr0 & CR0_PE:
        return CpuMode.REAL
    return CpuMode.LONG if sregs.efer & EFER_LMA else CpuMode.PROTECTED


def privilege(sregs: SRegs) -> Privilege:
    """Real mode, or the current privilege level (SS's DPL, which KVM keeps equal to the CPL)."""
    if not sregs.cr0 & CR0_PE:
        return Privilege.REAL
    return Privilege.USER if sregs.ss.dpl == USER_CPL else Privilege.KERNEL


def linear_rip(vcpu: Vcpu) -> int:
    """The linear address of the vCPU's next instruction: CS base + RIP (real mode: CS * 16 + IP;
    64-bit code has no CS base)."""
    cs = vcpu.get_sregs().cs
    return ((0 if cs.l else cs.base) + vcpu.get_regs().rip) & (1 << 64) - 1


def read_registers(vcpu: Vcpu) -> dict[str, int]:
    """Every register of :data:`~pykvm.gdbstub.REGISTER_NAMES` this vCPU has."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    values = {name: getattr(regs, name) for name in _GENERAL}
    values.update({name: getattr(sregs, name).selector for name in SELECTORS})
    values.update({name: getattr(sregs, name) for name in CONTROL})
    values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
    msrs = vcpu.get_msrs([MSR_KERNEL_GS_BASE])
    if MSR_KERNEL_GS_BASE in msrs:
        values["kernel_gs_base"] = msrs[MSR_KERNEL_GS_BASE]
    values.update(_fpu_registers(vcpu.get_xsave()))
    return values


def write_registers(vcpu: Vcpu, values: Mapping[str, int]) -> None:
    """Set the registers named; raises :class:`UnsupportedError` for one that cannot be set this way."""
    try:
        _write(vcpu, values)
    except KvmIoctlError as err:
        raise DebugTargetError(f"KVM refused the new {', '.join(sorted(values))} of vCPU {vcpu.id}: {err}") from err


def _write(vcpu: Vcpu, values: Mapping[str, int]) -> None:
    unknown = set(values) - set(_GENERAL) - set(SELECTORS) - set(CONTROL) - _FPU_NAMES
    unknown -= {"fs_base", "gs_base", "kernel_gs_base"}
    if unknown:
        raise UnsupportedError(f"there is no register {sorted(unknown)[0]} to set")
    sregs = None  # computed first: a selector that cannot be loaded refuses the whole write
    if any(name in values for name in (*SELECTORS, *CONTROL, "fs_base", "gs_base")):
        sregs = _changed_sregs(vcpu.get_sregs(), values)
    if any(name in values for name in _GENERAL):
        regs = vcpu.get_regs()
        for name in _GENERAL:
            if name in values:
                setattr(regs, name, values[name])
        vcpu.set_regs(regs)
    if sregs is not None:
        vcpu.set_sregs(sregs)
    if "kernel_gs_base" in values:
        if vcpu.set_msrs({MSR_KERNEL_GS_BASE: values["kernel_gs_base"]}) != 1:
            raise DebugTargetError(f"KVM refused kernel_gs_base {values['kernel_gs_base']:#x}")
    if _FPU_NAMES.intersection(values):
        vcpu.set_xsave(_changed_fpu(vcpu.get_xsave(), values))


def _changed_sregs(sregs: SRegs, values: Mapping[str, int]) -> SRegs:
    for name in SELECTORS:
        if name in values and values[name] != getattr(sregs, name).selector:
            _load_selector(getattr(sregs, name), name, values[name], cpu_mode(sregs))
    for name in CONTROL:
        if name in values:
            setattr(sregs, name, values[name])
    sregs.fs.base = values.get("fs_base", sregs.fs.base)
    sregs.gs.base = values.get("gs_base", sregs.gs.base)
    return sregs


def _load_selector(segment: Segment, name: str, selector: int, mode: CpuMode) -> None:
    """Real mode loads a selector as the CPU does (base = selector * 16); the other modes would
    need the descriptor from the guest's GDT or LDT, which a debugger has no business loading."""
    if mode is not CpuMode.REAL:
        raise UnsupportedError(f"{name} cannot be set in {mode.value}: loading a selector needs its descriptor")
    segment.selector, segment.base = selector & 0xFFFF, (selector & 0xFFFF) << 4


def _fpu_registers(xsave: bytes) -> dict[str, int]:
    fcw, fsw, ftwx, fop, last_ip, last_dp, mxcsr, _, fpr, xmm = _FXSAVE.unpack_from(xsave)
    values = {name: int.from_bytes(fpr[i * _SLOT : i * _SLOT + 10], "little") for i, name in enumerate(_STACK)}
    values.update(
        fctrl=fcw, fstat=fsw, ftag=_full_tag_word(ftwx, fsw, values), fop=fop & _FOP_MASK, mxcsr=mxcsr,
        fioff=last_ip & 0xFFFFFFFF, fiseg=last_ip >> 32 & 0xFFFF,
        fooff=last_dp & 0xFFFFFFFF, foseg=last_dp >> 32 & 0xFFFF,
    )  # fmt: skip
    values.update({f"xmm{i}": int.from_bytes(xmm[i * _SLOT : (i + 1) * _SLOT], "little") for i in range(16)})
    return values


def _changed_fpu(xsave: bytes, values: Mapping[str, int]) -> bytes:
    """``xsave`` with the registers of ``values`` changed; the rest, the upper bits of the
    64-bit instruction and operand pointers included, as they were."""
    fcw, fsw, ftwx, fop, last_ip, last_dp, mxcsr, mxcsr_mask, fpr, xmm = _FXSAVE.unpack_from(xsave)
    stack = bytearray(fpr)
    for i, name in enumerate(_STACK):
        if name in values:
            stack[i * _SLOT : i * _SLOT + 10] = (values[name] & (1 << _X87_BITS) - 1).to_bytes(10, "little")
    vectors = bytearray(xmm)
    for i in range(16):
        if f"xmm{i}" in values:
            vectors[i * _SLOT : (i + 1) * _SLOT] = (values[f"xmm{i}"] & (1 << 128) - 1).to_bytes(_SLOT, "little")
    if "ftag" in values:
        ftwx = sum(1 << i for i in range(8) if values["ftag"] >> 2 * i & 3 != _TAG_EMPTY)
    last_ip = _with_pointer(last_ip, values.get("fiseg"), values.get("fioff"))
    last_dp = _with_pointer(last_dp, values.get("foseg"), values.get("fooff"))
    out = bytearray(xsave)
    _FXSAVE.pack_into(
        out, 0, values.get("fctrl", fcw) & 0xFFFF, values.get("fstat", fsw) & 0xFFFF, ftwx,
        values.get("fop", fop) & _FOP_MASK, last_ip, last_dp, values.get("mxcsr", mxcsr) & 0xFFFFFFFF, mxcsr_mask,
        bytes(stack), bytes(vectors),
    )  # fmt: skip
    (components,) = _XSTATE_BV.unpack_from(out, _XSTATE_BV_OFFSET)
    _XSTATE_BV.pack_into(out, _XSTATE_BV_OFFSET, components | _X87_AND_SSE)  # the legacy region holds them now
    return bytes(out)


def _with_pointer(pointer: int, segment: int | None, offset: int | None) -> int:
    """An x87 instruction or operand pointer with gdb's segment (bits 32-47) and offset (0-31) fields set."""
    if segment is not None:
        pointer = pointer & ~(0xFFFF << 32) | (segment & 0xFFFF) << 32
    if offset is not None:
        pointer = pointer & ~0xFFFFFFFF | offset & 0xFFFFFFFF
    return pointer


def _full_tag_word(abridged: int, fsw: int, values: Mapping[str, int]) -> int:
    """FXSAVE keeps one bit per physical register (in use or empty); gdb shows the full tag
    word, two bits each, which the CPU derives from the register's contents (as gdb's own
    i387_supply_fxsave does)."""
    top = fsw >> 11 & 7
    tags = 0
    for physical in range(8):
        tag = _TAG_EMPTY
        if abridged >> physical & 1:
            tag = _tag_of(values[f"st{(physical - top) & 7}"])
        tags |= tag << 2 * physical
    return tags


def _tag_of(value: int) -> int:
    exponent, mantissa = value >> 64 & 0x7FFF, value & (1 << 64) - 1
    if exponent == 0x7FFF:
        return _TAG_SPECIAL  # infinity or NaN
    if exponent == 0:
        return _TAG_ZERO if mantissa == 0 else _TAG_SPECIAL  # zero, or a denormal
    return _TAG_VALID if mantissa >> 63 else _TAG_SPECIAL  # normal, or an unnormal

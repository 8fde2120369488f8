"""CPU feature words: what CPUID told a guest, and whether another host can tell it the same.

A guest decides once, at boot, which instructions it may use, from the feature bits CPUID
gives it.  A snapshot (or a migration) records those bits; the machine it is restored on
must offer every one of them, or the guest would fault on an instruction it was promised.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..kvm.state import CpuidEntry

_OSXSAVE = 1 << 27  # leaf 1 ECX: mirrors the guest's CR4.OSXSAVE, not a host capability
# (leaf, subleaf, register, bits that describe the host rather than the guest's own state)
FEATURE_WORDS = {
    "1.ecx": (1, 0, "ecx", ~_OSXSAVE & 0xFFFFFFFF),
    "1.edx": (1, 0, "edx", 0xFFFFFFFF),
    "7.0.ebx": (7, 0, "ebx", 0xFFFFFFFF),
    "7.0.ecx": (7, 0, "ecx", 0xFFFFFFFF),
    "7.0.edx": (7, 0, "edx", 0xFFFFFFFF),
    "0xd.1.eax": (0xD, 1, "eax", 0xFFFFFFFF),
    "0x80000001.ecx": (0x8000_0001, 0, "ecx", 0xFFFFFFFF),
    "0x80000001.edx": (0x8000_0001, 0, "edx", 0xFFFFFFFF),
}
# Linux's names (/proc/cpuinfo) of the bits a missing-feature message is most likely to name.
FEATURE_NAMES = {
    "1.ecx": {0: "sse3", 1: "pclmulqdq", 9: "ssse3", 12: "fma", 13: "cx16", 19: "sse4_1", 20: "sse4_2",
              21: "x2apic", 22: "movbe", 23: "popcnt", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand"},
    "1.edx": {0: "fpu", 4: "tsc", 5: "msr", 6: "pae", 8: "cx8", 9: "apic", 11: "sep", 15: "cmov", 19: "clflush",
              23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2"},
    "7.0.ebx": {0: "fsgsbase", 3: "bmi1", 5: "avx2", 7: "smep", 8: "bmi2", 9: "erms", 10: "invpcid",
                16: "avx512f", 18: "rdseed", 19: "adx", 20: "smap", 23: "clflushopt", 24: "clwb", 29: "sha_ni"},
    "7.0.ecx": {1: "avx512vbmi", 2: "umip", 4: "pku", 8: "gfni", 9: "vaes", 10: "vpclmulqdq", 22: "rdpid"},
    "0xd.1.eax": {0: "xsaveopt", 1: "xsavec", 3: "xsaves"},
    "0x80000001.ecx": {0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch"},
    "0x80000001.edx": {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}  # fmt: skip


def feature_words(entries: Iterable[CpuidEntry]) -> dict[str, int]:
    """The feature words of a CPUID table (a word whose leaf is absent is 0)."""
    leaves = {(entry.function, entry.index): entry for entry in entries}
    words = {}
    for name, (function, index, register, mask) in FEATURE_WORDS.items():
        entry = leaves.get((function, index))
        words[name] = getattr(entry, register) & mask if entry is not None else 0
    return words


def missing_features(seen: Mapping[str, int], offered: Mapping[str, int]) -> list[str]:
    """The features of ``seen`` that ``offered`` lacks, by name (``"7.0.ebx bit 30"`` when unnamed)."""
    missing = []
    for word, bits in seen.items():
        for bit in range(32):
            if bits >> bit & 1 and not offered.get(word, 0) >> bit & 1:
                missing.append(FEATURE_NAMES.get(word, {}).get(bit, f"{word} bit {bit}"))
    return missing

"""KVM structures made of a header and N entries (a C flexible array member).

``struct kvm_cpuid2``, ``kvm_msrs``, ``kvm_msr_list`` and ``kvm_irq_routing`` are a count
followed by that many entries; the caller allocates room for as many as it wants KVM to
read or write.  :class:`Fam` describes one such layout and builds and reads them, in
the spirit of kvm-ioctls' ``FamStructWrapper``.  An entry count that KVM writes back is
never trusted beyond the room allocated.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..native import ffi

T = TypeVar("T")


@dataclass(frozen=True)
class Fam:
    """The layout of one "header + entries" structure: its C type and two field names."""

    ctype: str
    count_field: str
    array_field: str

    def new(self, capacity: int) -> Any:
        """A zeroed ``ctype *`` with room for ``capacity`` entries, its count set to ``capacity``."""
        cdata = ffi.new(f"{self.ctype} *", {self.array_field: capacity})
        setattr(cdata, self.count_field, capacity)
        return cdata

    def build(self, items: Iterable[T], fill: Callable[[Any, T], None]) -> Any:
        """A new structure holding one entry per item, each written by ``fill(entry, item)``."""
        items = list(items)
        cdata = self.new(len(items))
        array = getattr(cdata, self.array_field)
        for i, item in enumerate(items):
            fill(array[i], item)
        return cdata

    def sized_to_fit(self, call: Callable[[Any], int], capacity: int, limit: int) -> tuple[Any, int]:
        """Run ``call(cdata)`` with room for ``capacity`` entries, doubling it while the answer
        is ``-E2BIG`` (KVM's "too small"), up to ``limit``; returns the structure and the answer."""
        while True:
            cdata = self.new(capacity)
            ret = call(cdata)
            if ret != -errno.E2BIG or capacity >= limit:
                return cdata, ret
            capacity = min(capacity * 2, limit)

    def count(self, cdata: Any) -> int:
        """The entry count the header holds (as KVM wrote it back)."""
        return int(getattr(cdata, self.count_field))

    def entries(self, cdata: Any) -> list[Any]:
        """The entries the header counts, at most as many as there is room for."""
        array = getattr(cdata, self.array_field)
        return list(array[0 : min(self.count(cdata), len(array))])


CPUID2 = Fam("struct kvm_cpuid2", "nent", "entries")
MSRS = Fam("struct kvm_msrs", "nmsrs", "entries")
MSR_LIST = Fam("struct kvm_msr_list", "nmsrs", "indices")
IRQ_ROUTING = Fam("struct kvm_irq_routing", "nr", "entries")

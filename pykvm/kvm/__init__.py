"""The ``/dev/kvm`` binding: one class per file descriptor (Kvm -> Vm -> Vcpu), nothing else.

The classes are imported when first used, so that the plain records of :mod:`pykvm.kvm.state`
load without the C extension.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .system import Kvm
    from .vcpu import Vcpu
    from .vm import Vm

_EXPORTS = {"Kvm": ".system", "Vm": ".vm", "Vcpu": ".vcpu"}  # name -> the module that defines it
__all__ = ["Kvm", "Vm", "Vcpu"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

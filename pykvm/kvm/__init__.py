"""The ``/dev/kvm`` binding: one class per file descriptor (Kvm -> Vm -> Vcpu), nothing else.

The classes are imported when first used, so that the plain records of :mod:`pykvm.kvm.state`
load without the C extension.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .system import Kvm
    from .vcpu import Vcpu
    from .vm import Vm

_EXPORTS = {"Kvm": ".system", "Vm": ".vm", "Vcpu": ".vcpu"}  # name -> the module that defines it
__all__ = ["Kvm", "Vm", "Vcpu"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pykvm.kvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value

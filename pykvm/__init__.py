"""pykvm: a small hardware-assisted hypervisor driving /dev/kvm from Python.

>>> import pykvm                                                      # doctest: +SKIP
>>> with pykvm.Machine(memory="64M", capture_serial=True) as vm:      # doctest: +SKIP
...     vm.load("guests/build/multiboot.elf", cmdline="hello")
...     result = vm.run(timeout=5)
>>> result.status, result.reason, result.serial                       # doctest: +SKIP

The names below are imported when first used, so that ``import pykvm`` (and
``import pykvm.signals``, what the ``pykvm`` command does first) does not load the whole package.
"""

from __future__ import annotations

from .lazy_exports import lazy_exports

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .config import MachineConfig
    from .devices.bus import Device
    from .errors import PykvmError
    from .kvm import Kvm
    from .machine import Machine
    from .result import ExitReason, RunResult, RunStats

# name -> the module that defines it
_EXPORTS = {
    "Machine": ".machine",
    "MachineConfig": ".config",
    "ExitReason": ".result",
    "RunResult": ".result",
    "RunStats": ".result",
    "PykvmError": ".errors",
    "Kvm": ".kvm",
    "Device": ".devices.bus",
}
__all__ = ["Machine", "MachineConfig", "ExitReason", "RunResult", "RunStats", "PykvmError", "Kvm", "Device"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

"""pykvm: a small hardware-assisted hypervisor driving /dev/kvm from Python.

>>> import pykvm                                                      # doctest: +SKIP
>>> with pykvm.Machine(memory="64M", capture_serial=True) as vm:      # doctest: +SKIP
...     vm.load("guests/build/multiboot.elf", cmdline="hello")
...     result = vm.run(timeout=5)
>>> result.status, result.reason, result.serial                       # doctest: +SKIP
"""

from .config import MachineConfig
from .errors import PykvmError
from .machine import Machine
from .result import ExitReason, RunResult, RunStats

__all__ = ["Machine", "MachineConfig", "ExitReason", "RunResult", "RunStats", "PykvmError"]

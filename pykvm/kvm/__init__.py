"""The ``/dev/kvm`` binding: one class per file descriptor (Kvm -> Vm -> Vcpu), nothing else."""

from .system import Kvm
from .vcpu import Vcpu
from .vm import Vm

__all__ = ["Kvm", "Vm", "Vcpu"]

"""Host inputs placed in time by vCPU 0's exits: what the recorder and the replayer share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..host_inputs import HostInputs, Receive
from ..runner import RunObserver

if TYPE_CHECKING:
    from ..control import RunControl
    from ..kvm import Vcpu
    from ..result import RunResult


class ExitTimeline(HostInputs, RunObserver):
    """Host inputs stamped with the number of exits vCPU 0 made since the machine was restored.

    It watches every run (it is the machine's :class:`~pykvm.runner.RunObserver`) to know the
    run's control while one goes on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.observer: RunObserver | None = self
        self._vcpu: Vcpu | None = None
        self._base = 0
        self._control: RunControl | None = None

    def connect(self, vcpu: Vcpu, receivers: Mapping[str, Receive]) -> None:
        super().connect(vcpu, receivers)
        self._vcpu, self._base = vcpu, vcpu.exit_count

    def exit_index(self) -> int:
        """vCPU 0's exits since the restore (0 while the machine is built and restored)."""
        return 0 if self._vcpu is None else self._vcpu.exit_count - self._base

    def before_entry(self, vcpu: Vcpu, control: RunControl) -> None:
        raise NotImplementedError

    def finish(self, result: RunResult) -> RunResult:
        raise NotImplementedError

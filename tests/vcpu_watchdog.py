"""Running a bare vCPU (``Vcpu.run``) under a watchdog, as every KVM_RUN in the tests must be."""

from __future__ import annotations

import signal
import threading

from pykvm.control import KICK_SIGNAL
from pykvm.kvm import Vcpu
from pykvm.kvm.exits import Exit, StopRequested


def run_watched(vcpu: Vcpu, timeout: float = 30.0) -> Exit:
    """``vcpu.run()``; a vCPU that does not exit within ``timeout`` seconds is stopped and the test fails.

    The vCPU must belong to a ``Machine``, which installs the handler of the kick signal.
    """
    caller = threading.get_ident()

    def kick() -> None:
        vcpu.request_stop()
        signal.pthread_kill(caller, KICK_SIGNAL)

    watchdog = threading.Timer(timeout, kick)
    watchdog.start()
    try:
        exit = vcpu.run()
    finally:
        watchdog.cancel()
    assert not isinstance(exit, StopRequested), f"the vCPU did not exit within {timeout} s"
    return exit

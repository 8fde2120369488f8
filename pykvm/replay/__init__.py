"""Record and replay: a run from a snapshot, reproduced byte for byte from a log of its host inputs.

``Machine.restore(snapshot, record=LOG)`` restores a machine whose devices take their host
inputs from a :class:`Recorder`: every input the guest consumes is logged (:mod:`.log`) with
the *exit index* at which it came, the number of exits vCPU 0 made since the restore
(:attr:`~pykvm.kvm.Vcpu.exit_count`, counted in the C run loop, fast-path exits included).
``Machine.restore(snapshot, replay=LOG)`` restores the same snapshot (the log names it by its
state file's SHA-256; another is refused) with a :class:`Replayer`, which reads nothing from
the host and gives each logged input back at its exit.  What is logged:

- host input for the UART and the virtio console (``vm.host_inputs.serial_input(data)``,
  ``console_input``): held until vCPU 0 has answered an exit, then handed to the device, so
  that it arrives between the same two exits in every replay (the recorder makes the vCPU
  leave the guest for it, so a guest waiting in HLT gets it at once);
- the clocks devices read: the CMOS RTC's UTC time and the ACPI PM timer's monotonic clock;
- virtio-rng's random bytes;
- virtio-blk reads, as the SHA-256 of the data (the image must hold the same data);
- the end of every run: its reason, status, exit index and the SHA-256 of the serial and
  console output.

Both capture the serial output (the log keeps its digest) and process virtqueues on the vCPU
thread (``virtio_notify="sync"``): a notification handled on the I/O thread would be tied to
no exit.  A run the host ended (a timeout, a stop) is replayed up to the exit where it ended
and then ended alike.

**Where determinism ends.**  On KVM a vCPU's exits to pykvm (port I/O and MMIO to pykvm's
devices, HLT without an irqchip, a shutdown) follow its program order, so an exit index names
a point of a single vCPU's execution, and a guest whose course depends only on the inputs
above, delivered at the same exits, prints the same bytes and ends the same way on every
replay: polled or interrupt-driven UART input, virtio-rng, RTC and PM timer reads.  Not
reproduced, because KVM gives pykvm no hold on them:

- *interrupt timing*: the in-kernel PIT and LAPIC timer tick by the host's clock, and an
  interrupt lands between whatever instructions the vCPU was at; a guest whose exits depend on
  when a tick came takes another course.  ``counter.bin`` is one: it takes the UART's
  interrupts only while it waits for its next tick, and whether it waits at all after a line
  depends on how long printing the line took.  Input handed over after exit N is likewise
  taken at another instruction than in the recording by a guest that runs with interrupts
  enabled past exit N (the exits are the same if only the handler's depend on it);
- *the TSC* (on the nested kvm_pvm backend the guest reads the host's, which jumps across a
  restore), the PIT counter and kvmclock read back in the kernel, RDRAND/RDSEED: a guest that
  branches on them diverges;
- *SMP interleaving*: several vCPUs race; record and replay refuse a machine with more than one;
- *what the log does not see*: virtio-net traffic (refused), host I/O errors on a disk, the
  disk image's identity (virtio-blk's GET_ID answer derives from its inode unless a serial is
  configured), a balloon target set during the run, a snapshot or reset of the recording
  machine (each reads the PM timer), and input given to ``vm.serial.receive`` directly.

Divergence is reported, never silently followed: a clock, random or disk read at another exit
than logged (or of another kind, or size), a disk read whose data has another hash, logged
input whose exit the guest went past, or a run that ends at another exit, for another reason,
with another status or other output, stops the run as
:attr:`~pykvm.result.ExitReason.DIVERGED` (status 120), saying what differed at which exit.
"""

from __future__ import annotations

import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ReplayError
from ..snapshot import Manifest, read_info, restore
from .log import FORMAT_NAME, FORMAT_VERSION, LogHeader, LogReader, LogWriter, check_log
from .recorder import Recorder
from .replayer import Replayer
from .timeline import ExitTimeline

if TYPE_CHECKING:
    from ..machine import Machine

__all__ = ["Recorder", "Replayer", "restore_recording", "restore_replaying"]


def restore_recording(path: str | Path, log: str | Path, **options: Any) -> Machine:
    """A machine restored from the snapshot at ``path`` that logs its host inputs to ``log``
    (replaced if it exists).  ``options`` are :func:`pykvm.snapshot.restore`'s ``kvm``,
    ``serial`` and ``allow_changed_disks``."""
    manifest = read_info(path)
    _check_replayable(Path(path), manifest)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = LogHeader(FORMAT_NAME, FORMAT_VERSION, metadata.version("pykvm-hypervisor"), created, manifest.state_sha256)
    recorder = Recorder(LogWriter(log, header))
    try:
        return _restore(path, recorder, options)
    except BaseException:
        Path(log).unlink(missing_ok=True)  # a log of no run
        raise


def restore_replaying(path: str | Path, log: str | Path, **options: Any) -> Machine:
    """A machine restored from the snapshot at ``path`` that takes its host inputs from ``log``,
    checked whole first; ``options`` as for :func:`restore_recording`."""
    check_log(log)
    manifest = read_info(path)
    _check_replayable(Path(path), manifest)
    reader = LogReader(log)
    recorded_from = reader.header.snapshot_state_sha256
    if recorded_from != manifest.state_sha256:
        reader.close()
        raise ReplayError(
            f"{log}: recorded from another snapshot than {path} (its state SHA-256 is "
            f"{recorded_from[:16]}…, this snapshot's {manifest.state_sha256[:16]}…)"
        )
    return _restore(path, Replayer(reader), options)


def _check_replayable(path: Path, manifest: Manifest) -> None:
    if manifest.config.cpus != 1:
        raise ReplayError(f"{path}: a machine with {manifest.config.cpus} vCPUs cannot be recorded or replayed: "
                          "the interleaving of several vCPUs is not reproducible under KVM")  # fmt: skip
    if manifest.config.net is not None:
        raise ReplayError(f"{path}: a machine with a virtio-net cannot be recorded or replayed: its traffic is not logged")


def _restore(path: str | Path, inputs: ExitTimeline, options: dict[str, Any]) -> Machine:
    try:
        return restore(path, capture_serial=True, virtio_notify="sync", host_inputs=inputs, **options)
    except BaseException:
        inputs.close()
        raise

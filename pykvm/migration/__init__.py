"""Live migration: a running guest moves to another pykvm process, here or on another host.

The destination waits (:meth:`pykvm.Machine.incoming`, or :class:`Incoming` to learn the
port first); the source sends (:meth:`pykvm.Machine.migrate`)::

    dest = Machine.incoming("tcp:0.0.0.0:4444", disks=["/shared/disk.img"])   # host B
    result = vm.migrate("tcp:hostb:4444", downtime_ms=300)                    # host A
    dest.run()                                                                # the guest goes on

The source copies guest RAM while the guest runs, then in rounds what the guest wrote since,
read from KVM's dirty log (and the pages the host's devices wrote), until what is left can
be sent within the downtime limit at the measured bandwidth; a guest writing faster than the
link sends is throttled.  Then it pauses the guest, sends the rest and the machine's state
(the snapshot's records: vCPUs, the in-kernel PIC/IOAPIC/PIT and clock, virtio queues
mid-stream, the UART's pending input and output, the RTC, the balloon) and waits for the
destination to accept it.  Only then does the run on the source end, as
:attr:`~pykvm.result.ExitReason.MIGRATED` (status 0); until then any failure leaves the guest
running on the source and raises :class:`~pykvm.errors.MigrationError`.  Disk images are
shared: the destination opens the same image path, and refuses the guest if it cannot.
:mod:`.source` and :mod:`.destination` tell the details, :mod:`.wire` the stream's format.

Security: the stream is neither encrypted nor authenticated.  Anyone who can reach the
destination's socket can hand it a guest, and anyone on the path can read the guest's memory
or change it.  The destination checks every byte it reads (a hostile stream cannot write
outside guest RAM, crash it or make it allocate what it asks for), but cannot tell a forged
guest from a real one.  A pre-shared ``token`` (on both sides) makes each side prove that it
knows the token before anything of the guest is sent or built, which keeps strangers out; it
does not protect the data.  Between hosts, carry the stream over SSH through UNIX sockets,
which only their owner can open::

    host B: Machine.incoming("unix:/run/user/1000/mig.sock", ...)
    host A: ssh -N -L /tmp/mig.sock:/run/user/1000/mig.sock hostb &
    host A: vm.migrate("unix:/tmp/mig.sock")

(``ssh -R`` the other way round works as well).  A TCP URI with no host listens on the
loopback address only.
"""

from .destination import Incoming
from .source import Migration, MigrationProgress, MigrationResult

__all__ = ["Incoming", "Migration", "MigrationProgress", "MigrationResult"]

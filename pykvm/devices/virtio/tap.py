"""TAP devices for virtio-net: open ``/dev/net/tun`` as a TAP with a virtio-net header.

:func:`open_tap` returns a non-blocking descriptor on which every ``read`` is one
Ethernet frame and every ``write`` sends one, each preceded by the 12-byte virtio 1.x
``virtio_net_hdr`` (with ``num_buffers``): the interface is made with ``IFF_TAP |
IFF_NO_PI | IFF_VNET_HDR`` and ``TUNSETVNETHDRSZ 12``.  No offloads are enabled
(``TUNSETOFFLOAD`` is left at 0), so the kernel hands over complete, checksummed frames.

Creating a TAP needs CAP_NET_ADMIN; attaching to one that exists needs either that
or being its owner (``ip tuntap add NAME mode tap user $USER``).  Every failure is a
:class:`~pykvm.errors.ConfigError` that says which of these is missing.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct

from ioctl_opt import IOC, IOC_WRITE

from ...errors import ConfigError

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETIFF = IOC(IOC_WRITE, ord("T"), 202, 4)  # _IOW('T', 202, int)
TUNSETVNETHDRSZ = IOC(IOC_WRITE, ord("T"), 216, 4)  # _IOW('T', 216, int)
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1, with num_buffers (5.1.6)
IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 bytes

_NEEDS_PRIVILEGE = "needs CAP_NET_ADMIN or a pre-created tap owned by you (ip tuntap add NAME mode tap user $USER)"


def open_tap(name: str | None = None, *, path: str = TUN_PATH) -> tuple[int, str]:
    """Open (creating it if needed) the TAP ``name`` (None: the kernel picks ``tapN``).

    Returns the non-blocking, close-on-exec descriptor and the interface's name.
    """
    if name is not None:
        encoded = name.encode()
        if not encoded or len(encoded) >= IFNAMSIZ or b"/" in encoded or any(c <= 32 for c in encoded):
            raise ConfigError(f"{name!r} is not a valid interface name (1 to {IFNAMSIZ - 1} characters, no '/' or spaces)")
    shown = name or "a tap device"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as err:
        raise ConfigError(f"{path} does not exist: load the tun module (modprobe tun) to use {shown}") from err
    except PermissionError as err:
        raise ConfigError(f"{path}: permission denied: using {shown} {_NEEDS_PRIVILEGE}") from err
    except OSError as err:
        raise ConfigError(f"cannot open {path}: {err.strerror}") from err
    try:
        request = IFREQ.pack((name or "tap%d").encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            answer = fcntl.ioctl(fd, TUNSETIFF, request)
        except OSError as err:
            raise _tunsetiff_error(err, shown) from err
        actual = IFREQ.unpack(answer)[0].split(b"\0", 1)[0].decode()
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as err:
            raise ConfigError(f"TUNSETVNETHDRSZ on {actual} failed: {err.strerror}") from err
    except BaseException:
        os.close(fd)
        raise
    return fd, actual


def _tunsetiff_error(err: OSError, shown: str) -> ConfigError:
    if err.errno in (errno.EPERM, errno.EACCES):
        return ConfigError(f"cannot create or attach {shown}: permission denied: it {_NEEDS_PRIVILEGE}")
    if err.errno == errno.EBUSY:
        return ConfigError(f"{shown} is already in use by another process")
    if err.errno == errno.EINVAL:
        return ConfigError(f"{shown} exists but is not a TAP device usable with IFF_VNET_HDR")
    return ConfigError(f"TUNSETIFF for {shown} failed: {err.strerror}")


def mac_for_tap(name: str) -> bytes:
    """A stable, locally administered, unicast MAC address derived from the interface name."""
    digest = bytearray(hashlib.sha256(name.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02  # locally administered, not multicast
    return bytes(digest)

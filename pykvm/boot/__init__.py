"""Guest image loaders: each turns an image into a :class:`~pykvm.boot.plan.BootPlan`.

One ``load(path, image, request)`` per format (flat binary, ELF, multiboot v1,
Linux bzImage, PVH), and :func:`load_image`, which picks the loader, from the
image itself when the format is ``"auto"``.  Loaders are pure: the caller reads
the files.

Each format's loader is the module of this package named after it, imported when
an image of that format is loaded (a multiboot kernel never pays for the ELF,
Linux and PVH loaders: ``pykvm run``'s start-up).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, ImageError
from .detect import detect
from .flat import check_not_empty
from .plan import BootPlan, LoadRequest

AUTO = "auto"
# The loader formats: each is also the name of its module here, whose FORMAT it is.
FORMATS = (AUTO, "flat", "elf", "multiboot", "linux", "pvh")
# The formats that take an initrd (the Linux boot protocols).
INITRD_FORMATS = ("linux", "pvh")

Loader = Callable[[Path, bytes, LoadRequest], BootPlan]


def loader(kind: str) -> Loader:
    """The ``load`` function of format ``kind`` (one of :data:`FORMATS` other than ``"auto"``)."""
    return import_module(f".{kind}", __name__).load  # type: ignore[no-any-return]


def _check_initrd(path: Path, kind: str, request: LoadRequest) -> None:
    if request.initrd is None or kind in INITRD_FORMATS:
        return
    hint = (
        "; pass the file to a multiboot kernel as a module with --module"
        if kind == "multiboot"
        else ""
    )
    raise ImageError(
        str(path),
        f"an initrd (--initrd {request.initrd.path}) is for Linux kernels (a bzImage or a PVH vmlinux), "
        f"and this is a {kind} image{hint}",
    )


def load_image(path: Path, image: bytes, request: LoadRequest, format: str = AUTO) -> BootPlan:
    """Load ``image`` (read from ``path``) with the loader for ``format``, detected if ``"auto"``.

    A forced format is used as given and its loader still validates the image.
    Raises :class:`ConfigError` for an unknown format name and
    :class:`~pykvm.errors.ImageError` for an image that cannot be loaded
    (an initrd given for a format other than ``linux`` or ``pvh`` included).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown image format {format!r}; choose one of {', '.join(FORMATS)}")
    check_not_empty(path, image)
    kind = detect(path, image) if format == AUTO else format
    _check_initrd(path, kind, request)
    return loader(kind)(path, image, request)


__all__ = ["FORMATS", "INITRD_FORMATS", "detect", "load_image", "loader"]

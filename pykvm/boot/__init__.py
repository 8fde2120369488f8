"""Guest image loaders: each turns an image into a :class:`~pykvm.boot.plan.BootPlan`.

One ``load(path, image, request)`` per format (flat binary, ELF, multiboot v1),
and :func:`load_image`, which picks the loader, from the image itself when the
format is ``"auto"``.  Loaders are pure: the caller reads the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from . import elf, flat, multiboot
from .detect import detect
from .flat import check_not_empty
from .plan import BootPlan, LoadRequest

AUTO = "auto"
FORMATS = (AUTO, flat.FORMAT, elf.FORMAT, multiboot.FORMAT)

Loader = Callable[[Path, bytes, LoadRequest], BootPlan]
LOADERS: dict[str, Loader] = {
    flat.FORMAT: flat.load,
    elf.FORMAT: elf.load,
    multiboot.FORMAT: multiboot.load,
}


def load_image(path: Path, image: bytes, request: LoadRequest, format: str = AUTO) -> BootPlan:
    """Load ``image`` (read from ``path``) with the loader for ``format``, detected if ``"auto"``.

    A forced format is used as given and its loader still validates the image.
    Raises :class:`ConfigError` for an unknown format name and
    :class:`~pykvm.errors.ImageError` for an image that cannot be loaded.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown image format {format!r}; choose one of {', '.join(FORMATS)}")
    check_not_empty(path, image)
    kind = detect(path, image) if format == AUTO else format
    return LOADERS[kind](path, image, request)


__all__ = ["FORMATS", "LOADERS", "detect", "load_image"]

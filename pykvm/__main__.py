"""The ``pykvm`` command: ``python -m pykvm`` and the console script both start here."""

from __future__ import annotations

import gc


def main() -> None:
    """Run the command line (:mod:`pykvm.cli`).

    Everything import made lives until the process exits, so it is moved out of the garbage
    collector's sight (``gc.freeze``): no collection walks it again, and neither does the
    interpreter's finalisation, which would otherwise take longer than booting a small guest.
    """
    from .cli import main as command_line

    gc.freeze()
    command_line()


if __name__ == "__main__":
    main()

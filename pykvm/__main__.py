"""The ``pykvm`` command (and ``python -m pykvm``): take the stop signals first, then run the CLI.

The signals are taken before the rest of pykvm is imported, so that Ctrl-C at any moment of
start-up ends the process cleanly (:mod:`pykvm.signals`).  An exception pykvm did not expect
is a bug: it is said in one line (``-vv`` logs the traceback), not dumped on the user.
"""

from __future__ import annotations

import gc
import sys

from .signals import STOPPER


def main() -> None:
    """Run the command line (:mod:`pykvm.cli`).

    Everything import made lives until the process exits, so it is moved out of the garbage
    collector's sight (``gc.freeze``): no collection walks it again, and neither does the
    interpreter's finalisation, which would otherwise take longer than booting a small guest.
    """
    STOPPER.install()
    from .cli import main as cli

    gc.freeze()
    try:
        cli()
    except Exception as err:
        import logging

        from .result import ERROR_STATUS

        logging.getLogger("pykvm").debug("internal error", exc_info=True)
        print(f"pykvm: internal error (a bug in pykvm; -vv shows where): {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(ERROR_STATUS)


if __name__ == "__main__":
    main()

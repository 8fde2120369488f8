"""The ``pykvm`` command (and ``python -m pykvm``): take the stop signals first, then run the CLI.

The signals are taken before the rest of pykvm is imported, so that Ctrl-C at any moment of
start-up ends the process cleanly (:mod:`pykvm.signals`).  An exception pykvm did not expect
is a bug: it is said in one line (``-vv`` logs the traceback), not dumped on the user.
"""

from __future__ import annotations

import sys

from .signals import STOPPER


def main() -> None:
    STOPPER.install()
    from .cli import main as cli

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

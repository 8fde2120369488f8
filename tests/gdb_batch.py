"""A stock gdb in batch mode against a gdb server, as the gdb tests run it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

GDB = shutil.which("gdb")
GUARD = 120  # seconds: a hang guard for gdb and the guest, not a speed limit
needs_gdb = pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")


def gdb_argv(address: str, *commands: str, symbols: Path | None = None) -> list[str]:
    """gdb's command line: connect to ``address`` (with the symbols of ``symbols``), then run ``commands``."""
    argv = [GDB or "gdb", "-batch", "-nx", "-ex", "set confirm off", "-ex", "set pagination off"]
    if symbols is not None:
        argv += ["-ex", f"file {symbols}"]
    argv += ["-ex", f"target remote {address}"]
    for command in commands:
        argv += ["-ex", command]
    return argv


def run_gdb(address: str, *commands: str, symbols: Path | None = None) -> str:
    """gdb's output (stdout and stderr) after it ran ``commands`` against the target at ``address``."""
    done = subprocess.run(gdb_argv(address, *commands, symbols=symbols), capture_output=True, text=True,
                          timeout=GUARD)  # fmt: skip
    return done.stdout + done.stderr


def interrupt_gdb(address: str, running: Callable[[], bool], *commands: str) -> str:
    """gdb's output after it continued the target at ``address``, was sent Ctrl-C once ``running()``
    said the target runs, then ran ``commands``."""
    process = subprocess.Popen(gdb_argv(address, "continue", *commands), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        while not running():  # until gdb has continued the target
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGINT)
        return process.communicate(timeout=GUARD)[0]
    finally:
        process.kill()
        process.wait()

"""Running the ``pykvm`` command as a user would, in a subprocess, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys


def pykvm(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None, user_cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    command = (user_cmd or []) + [sys.executable, "-m", "pykvm", *args]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=120, env={**os.environ, **(env or {})})


def assert_one_line_error(process: subprocess.CompletedProcess, *fragments: str) -> None:
    stderr = process.stderr.decode()
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0]

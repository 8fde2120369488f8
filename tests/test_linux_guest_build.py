"""guests/linux/build.sh: apt's download progress on a terminal, and quiet in a CI log.

The script runs against stand-ins for apt-get, apt-cache and dpkg that record how they were
called and make the download fail, so nothing is fetched.
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "guests" / "linux" / "build.sh"
STAND_INS = {
    "apt-cache": 'case "$1" in\n  policy) echo "  Candidate: 1.0" ;;\n'
                 '  depends) echo "  Depends: linux-image-6.1.0-1-amd64" ;;\nesac\n',
    "apt-get": 'echo "$*" >> "$CALLS"\n[ "$1" = update ] && exit 0\nexit 1\n',  # every download fails
    "dpkg": "exit 0\n",
}  # fmt: skip


@pytest.fixture
def build_dir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    here = tmp_path / "linux"
    here.mkdir()
    shutil.copy(SCRIPT, here / "build.sh")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name, body in STAND_INS.items():
        (tools / name).write_text("#!/bin/sh\n" + body)
        (tools / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}
    return here, env


def downloads(env: dict[str, str]) -> list[str]:
    return [line for line in Path(env["CALLS"]).read_text().splitlines() if line.startswith("download ")]


def test_in_a_ci_log_apt_downloads_quietly(build_dir) -> None:
    here, env = build_dir
    done = subprocess.run(["bash", str(here / "build.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cannot download the packages" in done.stderr
    assert downloads(env) and all(call.startswith("download -q ") for call in downloads(env))


def test_on_a_terminal_apt_shows_its_progress(build_dir) -> None:
    here, env = build_dir
    pid, terminal = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execve("/bin/bash", ["bash", str(here / "build.sh")], env)
    output = b""
    while True:
        try:
            chunk = os.read(terminal, 4096)
        except OSError:  # the terminal closed: the script ended
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    assert os.waitstatus_to_exitcode(status) == 1 and b"cannot download the packages" in output
    assert downloads(env) and all(call.startswith("download ") and " -q " not in call for call in downloads(env))

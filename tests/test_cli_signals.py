"""``pykvm run`` under pressure: a stdout nobody reads, signals at any moment, a background job.

Each test runs the command in a subprocess and waits for a condition it can see (bytes in the
pipe, a library mapped, a process state), never for a length of time.
"""

from __future__ import annotations

import array
import fcntl
import os
import pty
import signal
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import pytest

from conftest import guest

pytestmark = pytest.mark.kvm

F_SETPIPE_SZ = 1031
MOV_DX_COM1 = b"\xba\xf8\x03"  # mov dx, 0x3f8
# Real-mode guests that print 'x' forever: a 1-byte OUT (answered by the C fast path) or a
# 2-byte OUT (THR and IER=0, answered by the Python UART model).
PRINT_FOREVER = {
    "c-path": MOV_DX_COM1 + b"\xb0\x78" + b"\xee\xeb\xfd",  # mov al, 'x'; out dx, al; jmp $-1
    "python-path": MOV_DX_COM1 + b"\xb8\x78\x00" + b"\xef\xeb\xfd",  # mov ax, 'x'; out dx, ax; jmp $-1
}
# Prints 20000 'x', then writes 0 to the debug-exit port: status 1.
PRINT_20000 = (
    MOV_DX_COM1 + b"\xb9\x20\x4e" + b"\xb0\x78" + b"\xee\xe2\xfd"  # mov cx, 20000; mov al, 'x'; out; loop
    + b"\xba\xf4\x00\xb0\x00\xee" + b"\xf4\xeb\xfe"  # mov dx, 0xf4; mov al, 0; out dx, al; hlt
)  # fmt: skip


def image(tmp_path: Path, code: bytes) -> str:
    path = tmp_path / "guest.bin"
    path.write_bytes(code)
    return str(path)


def start(*args: str, **options: object) -> subprocess.Popen:
    """``pykvm run ...`` with stdout a one-page pipe the test never reads."""
    process = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--mode", "real", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)  # fmt: skip
    fcntl.fcntl(process.stdout, F_SETPIPE_SZ, 4096)
    return process


def wait_for_output(process: subprocess.Popen) -> None:
    """Until the guest has printed (so it is running, and its next bytes find the pipe full)."""
    pending = array.array("i", [0])
    while not pending[0]:
        assert process.poll() is None, process.stderr.read()
        fcntl.ioctl(process.stdout, termios.FIONREAD, pending)
        time.sleep(0.01)


def finish(process: subprocess.Popen) -> str:
    """Wait for the process (a hang fails the test) and give its stderr."""
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("pykvm run did not end")
    return process.stderr.read().decode()


# --- a stdout nobody reads -------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PRINT_FOREVER))
def test_the_timeout_wins_over_a_stdout_pipe_nobody_reads(tmp_path: Path, path: str) -> None:
    process = start(image(tmp_path, PRINT_FOREVER[path]), "--timeout", "3")
    stderr = finish(process)
    assert process.returncode == 124, stderr
    assert "pykvm: timeout: still running after 3 s" in stderr and "bytes dropped" in stderr


def test_output_nobody_reads_is_dropped_after_a_stall_and_the_guest_goes_on(tmp_path: Path) -> None:
    process = start(image(tmp_path, PRINT_20000))
    stderr = finish(process)
    assert process.returncode == 1, stderr  # the guest finished: its debug exit
    dropped = [line for line in stderr.splitlines() if "bytes dropped" in line]
    assert len(dropped) == 1 and dropped[0].endswith("(stdout took nothing for 5 s)"), stderr
    written = len(process.stdout.read())
    assert dropped[0] == f"pykvm: WARNING: serial output: {20000 - written} bytes dropped (stdout took nothing for 5 s)"


# --- signals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_ends_the_run_like_a_timeout_even_with_a_full_pipe(tmp_path: Path, signum: signal.Signals) -> None:
    control = tmp_path / "vm.sock"
    process = start(image(tmp_path, PRINT_FOREVER["c-path"]), "--stats", "--control", str(control))
    wait_for_output(process)
    process.send_signal(signum)
    stderr = finish(process)
    assert process.returncode == 128 + signum, stderr
    assert f"pykvm: stopped: stopped by {signum.name} at rip 0x7c0" in stderr  # the registers, as for --timeout
    assert "rip=" in stderr and "exits: " in stderr and "pio 0x03f8 write (COM1 THR/RBR) in C" in stderr  # and --stats
    assert "Traceback" not in stderr and not control.exists()  # cleaned up


def test_a_second_signal_ends_the_process_at_once(tmp_path: Path) -> None:
    process = start(image(tmp_path, PRINT_FOREVER["c-path"]))
    wait_for_output(process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    stderr = finish(process)
    assert process.returncode == 130 and "Traceback" not in stderr


def mapped(pid: int, name: str) -> bool:
    try:
        return name in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_while_pykvm_imports_gives_no_traceback(tmp_path: Path, attempt: int) -> None:
    process = start(image(tmp_path, PRINT_FOREVER["c-path"]), "--control", str(tmp_path / "vm.sock"))
    while process.poll() is None and not mapped(process.pid, "_cffi_backend"):  # pykvm's imports are under way
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    stderr = finish(process)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "vm.sock").exists()


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_while_the_machine_is_built_stops_it_and_cleans_up(tmp_path: Path, attempt: int) -> None:
    control = tmp_path / "vm.sock"
    process = start(image(tmp_path, PRINT_FOREVER["c-path"]), "--control", str(control))
    while process.poll() is None and "/dev/kvm" not in open_files(process.pid):
        time.sleep(0.001)
    process.send_signal(signal.SIGINT)
    stderr = finish(process)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert not control.exists()


def open_files(pid: int) -> set[str]:
    files = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    except FileNotFoundError:  # the process, or that descriptor, is gone meanwhile
        pass
    return files


# --- job control -------------------------------------------------------------------------------
SHELL = textwrap.dedent("""\
    # A shell's job control in miniature: this process owns the terminal (stdin), its child runs
    # in a process group of its own, in the background.  Prints how the child ended.
    import os, sys
    os.setsid()
    import fcntl, termios
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    child = os.fork()
    if child == 0:
        os.setpgid(0, 0)
        os.execv(sys.executable, [sys.executable, "-m", "pykvm", "run", *sys.argv[1:]])
    try:
        os.setpgid(child, child)
    except PermissionError:  # the child did it already, and exec'd
        pass
    _, status = os.waitpid(child, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        print("stopped by", os.WSTOPSIG(status), flush=True)
        os.kill(child, 9)
        os.waitpid(child, 0)
    else:
        print("exited", os.waitstatus_to_exitcode(status), flush=True)
""")


def test_a_background_job_does_not_touch_the_terminal() -> None:
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    process = subprocess.run([sys.executable, "-c", SHELL, str(guest("hello_real.bin")), "--mode", "real"],
                             stdin=follower, capture_output=True, timeout=120)  # fmt: skip
    after = termios.tcgetattr(follower)
    os.close(follower)
    os.close(leader)
    assert process.stdout == b"Hello from real mode\nexited 1\n", process.stderr  # not "stopped by 22" (SIGTTOU)
    assert after == before


def test_in_the_foreground_the_terminal_is_given_back_as_it_was() -> None:
    leader, follower = pty.openpty()
    before = termios.tcgetattr(follower)
    process = subprocess.run([sys.executable, "-m", "pykvm", "run", str(guest("hello_real.bin")), "--mode", "real"],
                             stdin=follower, capture_output=True, timeout=120, start_new_session=True,
                             preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # fmt: skip
    after = termios.tcgetattr(follower)
    os.close(follower)
    os.close(leader)
    assert process.returncode == 1 and process.stdout == b"Hello from real mode\n"
    assert after == before

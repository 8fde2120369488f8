"""The serial output (one C writer for the fast path and Python's devices) and host input.

A reader that never reads, one that went away, one that takes nothing: the output is dropped
and counted, said once, and a stop request always ends a wait.  No KVM needed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pykvm.console import SerialOutput, StdinForwarder
from pykvm.errors import ConfigError
from pykvm.native import ffi

F_SETPIPE_SZ = 1031
A_LONG_TIME = 3600.0  # a stall limit no test waits for


@pytest.fixture
def full_pipe():  # type: ignore[no-untyped-def]
    """A one-page pipe that takes no more output: (read end, write end)."""
    reader, writer = os.pipe()
    fcntl.fcntl(writer, F_SETPIPE_SZ, 4096)
    os.set_blocking(writer, False)
    while True:
        try:
            os.write(writer, b"x" * 4096)
        except BlockingIOError:
            break
    os.set_blocking(writer, True)  # as a shell hands it over
    yield reader, writer
    os.close(reader)
    os.close(writer)


def output_to(fd: int, **options: object) -> SerialOutput:
    return SerialOutput(f"file:/proc/self/fd/{fd}", **options)  # type: ignore[arg-type]


def test_everything_reaches_a_file_and_the_capture(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    out = SerialOutput(str(log), capture=True)
    out.write(b"hello ")
    out.write(b"x" * 100_000)
    assert log.read_bytes() == b"hello " + b"x" * 100_000 and out.captured() == log.read_bytes()
    assert out.transmitted == 100_006 and out.dropped == 0 and out.problems() == []
    out.close()


def test_a_reader_that_never_reads_costs_one_stall_then_output_is_dropped_and_counted(full_pipe) -> None:
    reader, writer = full_pipe
    out = output_to(writer, capture=True, stall_limit=0.2)
    out.write(b"lost")  # waits 0.2 s, then gives up on this output
    out.write(b"also lost")  # stalled: dropped at once
    assert out.dropped == 13 and out.captured() == b"lostalso lost"  # the capture has everything
    assert out.problems() == [f"serial output: 13 bytes dropped (/proc/self/fd/{writer} took nothing for 0.2 s)"]
    assert out.problems() == []  # said once
    os.read(reader, 65536)  # the reader is back: output flows again
    out.write(b"seen")
    assert os.read(reader, 100) == b"seen" and out.dropped == 13
    out.close()


def test_a_stop_request_ends_the_wait_for_a_full_pipe(full_pipe) -> None:
    reader, writer = full_pipe
    out = output_to(writer, stall_limit=A_LONG_TIME)
    stop = ffi.new("uint32_t *")
    out.watch_stop(stop)
    writing = threading.Thread(target=out.write, args=(b"abc",))
    writing.start()
    stop[0] = 1  # as Machine.stop() or a timeout sets the vCPU's flag
    writing.join(timeout=60)
    assert not writing.is_alive() and out.dropped == 3
    assert out.problems() == [f"serial output: 3 bytes dropped (the run was stopped while /proc/self/fd/{writer} took nothing)"]
    out.close()


def test_a_stop_request_does_not_drop_what_can_be_written(tmp_path: Path) -> None:
    out = SerialOutput(str(tmp_path / "log"), capture=True)
    stop = ffi.new("uint32_t *", 1)
    out.watch_stop(stop)
    out.write(b"still written")
    assert out.captured() == b"still written" and (tmp_path / "log").read_bytes() == b"still written"
    out.close()


def test_a_reader_that_went_away_is_given_up_and_said_once() -> None:
    reader, writer = os.pipe()
    os.close(reader)
    out = output_to(writer, capture=True)
    out.write(b"a")
    out.write(b"b")
    os.close(writer)
    assert out.captured() == b"ab" and out.fds == [out.sink.fds[1]]
    assert out.problems() == ["serial output failed (Broken pipe); no longer writing there"]
    assert out.problems() == []
    out.close()


def test_a_fifo_nobody_reads_is_an_error_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="it is a FIFO nobody reads"):
        SerialOutput(str(fifo))


@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler to build the write() shim")
def test_a_write_that_takes_nothing_gives_the_descriptor_up_instead_of_spinning(tmp_path: Path) -> None:
    # A descriptor whose write() returns 0 (some devices and FUSE files do): an LD_PRELOAD shim makes one.
    shim = tmp_path / "zero_write.c"
    shim.write_text(textwrap.dedent("""\
        #define _GNU_SOURCE
        #include <dlfcn.h>
        #include <stdlib.h>
        #include <unistd.h>
        ssize_t write(int fd, const void *buf, size_t len)
        {
            static ssize_t (*real)(int, const void *, size_t);
            const char *target = getenv("ZERO_WRITE_FD");
            if (target && fd == atoi(target))
                return 0;
            if (!real)
                real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
            return real(fd, buf, len);
        }
    """))
    library = tmp_path / "zero_write.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(shim), "-ldl"], check=True)
    script = textwrap.dedent(f"""\
        import os
        from pykvm.console import SerialOutput
        out = SerialOutput({str(tmp_path / "out")!r}, capture=True)
        os.environ["ZERO_WRITE_FD"] = str(out.fds[0])
        out.write(b"abc")
        print(out.captured(), out.fds == [out.sink.fds[1]], out.problems())
    """)
    env = {**os.environ, "LD_PRELOAD": str(library)}
    env.pop("ZERO_WRITE_FD", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == (
        f"b'abc' True ['serial output failed ({os.strerror(errno.EIO)}); no longer writing there']"
    ), done.stderr


def test_stdin_forwarder_delivers_input() -> None:
    reader, writer = os.pipe()
    received: list[bytes] = []
    done = threading.Event()

    def receive(data: bytes) -> None:
        received.append(data)
        done.set()

    forwarder = StdinForwarder(receive, fd=reader)
    forwarder.start()
    os.write(writer, b"hi")
    assert done.wait(60) and b"".join(received) == b"hi"
    forwarder.stop()
    os.close(writer)
    os.close(reader)

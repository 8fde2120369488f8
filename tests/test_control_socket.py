"""The control socket: its JSON-lines protocol, hostile requests, the socket file's life, the client.

The server runs over a stand-in machine (real guest memory and a balloon driven by the test
harness) so that the protocol is tested without KVM; the last tests use a real machine.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from pykvm.config import MachineConfig
from pykvm.result import MachineStatus, VcpuStatus
from pykvm.control_socket import MAX_CONNECTIONS, MAX_LINE, ControlError, ControlServer, format_answer, request
from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.balloon import F_STATS_VQ, VirtioBalloon
from pykvm.memory import GuestMemory
from pykvm.x86.layout import MIB

from virtio_driver import connect


@pytest.fixture
def machine():  # type: ignore[no-untyped-def]
    memory = GuestMemory([(0, 64 * MIB)])
    balloon = VirtioBalloon()
    driver = connect(balloon, memory, 0x1000, buffer_area=(0x40000, 0x40000))
    driver.negotiate(mmio.VIRTIO_F_VERSION_1 | 1 << F_STATS_VQ)
    stand_in = SimpleNamespace(
        config=MachineConfig(memory=64 * MIB, balloon=True),
        memory=memory,
        balloon=balloon,
        devices=SimpleNamespace(virtio=[SimpleNamespace(device=balloon)]),
        status=lambda: MachineStatus("created", 0.0, {}, (VcpuStatus(0, 0x7C00, "real", 0),)),
        migration=None,
        driver=driver,
    )
    yield stand_in
    memory.close()


@pytest.fixture
def server(machine, tmp_path: Path):  # type: ignore[no-untyped-def]
    server = ControlServer(str(tmp_path / "vm.sock"), machine)
    yield server
    server.close()


def converse(path: str, *lines: bytes) -> list[dict]:
    """Send raw lines on one connection; the answers, one per non-empty line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"".join(lines))
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# --- commands ---------------------------------------------------------------------------------
def test_info_describes_the_machine(server, machine) -> None:
    answer = request(server.path, {"cmd": "info"})
    assert answer["ok"] and answer["protocol"] == 1 and answer["pid"] == os.getpid()
    assert answer["memory"] == 64 * MIB and answer["cpus"] == 1 and answer["devices"] == ["balloon"]
    assert answer["balloon"] == {"target": 0, "actual": 0, "features": {"stats": True, "deflate_on_oom": False,
                                                                         "free_page_reporting": False}}  # fmt: skip
    assert answer["rss"] > 0 and answer["guest_resident"] >= 0 and answer["share_pages"] is False


def test_balloon_sets_the_target_from_a_size_or_bytes(server, machine) -> None:
    assert request(server.path, {"cmd": "balloon", "target": "32M"}) == {"ok": True, "target": 32 * MIB, "actual": 0}
    assert machine.balloon.target == 32 * MIB
    assert request(server.path, {"cmd": "balloon", "target": 4096 * 3})["target"] == 3 * 4096
    assert machine.driver.interrupt_status() & mmio.INTERRUPT_CONFIG_CHANGE


def test_balloon_can_wait_for_the_driver(server, machine) -> None:
    answer = request(server.path, {"cmd": "balloon", "target": "8M", "wait": 0.1})
    assert answer["reached"] is False and answer["actual"] == 0
    machine.driver.write_config(4, 2048)  # the driver reports 8 MiB
    answer = request(server.path, {"cmd": "balloon", "target": "8M", "wait": 5})
    assert answer["reached"] is True and answer["actual"] == 8 * MIB


def test_stats_asks_the_guest_and_reports_what_it_said(server, machine) -> None:
    machine.driver.post(2, [struct.pack("<HQHQ", 5, 60 * MIB, 4, 20 * MIB)], [])
    machine.driver.notify(2)
    answer = request(server.path, {"cmd": "stats", "timeout": 0.1})
    assert answer["ok"] and answer["stats"] == {"memfree": 20 * MIB, "memtot": 60 * MIB}
    assert answer["fresh"] is False  # the harness does not post again by itself
    assert len(machine.driver.used(2)) == 1  # but the buffer went back: "fresh numbers, please"
    assert answer["stats_age"] >= 0 and answer["counters"]["bad_pfns"] == 0
    assert set(answer) >= {"target", "actual", "rss", "guest_resident"}


# --- hostile or wrong requests: an error answer, and the server goes on -------------------------------
@pytest.mark.parametrize(
    "line, fragment",
    [
        (b"this is not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'"info"\n', "JSON object"),
        (b"{}\n", "no 'cmd'"),
        (b'{"cmd": "reboot"}\n', "unknown command 'reboot'"),
        (b'{"cmd": 7}\n', "unknown command 7"),
        (b'{"cmd": "balloon"}\n', "needs a 'target'"),
        (b'{"cmd": "balloon", "target": [1]}\n', "size string or a number"),
        (b'{"cmd": "balloon", "target": true}\n', "size string or a number"),
        (b'{"cmd": "balloon", "target": "lots"}\n', "cannot read 'lots' as a size"),
        (b'{"cmd": "balloon", "target": "1G"}\n', "out of range"),
        (b'{"cmd": "balloon", "target": -4096}\n', "cannot be negative"),
        (b'{"cmd": "balloon", "target": "1M", "wait": "soon"}\n', "wait must be a number"),
        (b'{"cmd": "stats", "timeout": 1e9}\n', "timeout must be a number"),
        (b"\xff\xfe\n", "not JSON"),
        (b"[" * 30000 + b"]" * 30000 + b"\n", "nested too deeply"),
        (b'{"a":' * 10000 + b"1" + b"}" * 10000 + b"\n", "nested too deeply"),
    ],
    ids=lambda value: value[:40] if isinstance(value, bytes) else value,
)
def test_rule_a_malformed_request_gets_an_error_answer_and_the_server_goes_on(server, line: bytes, fragment: str) -> None:
    bad, good = converse(server.path, line, b'{"cmd": "info"}\n')
    assert bad["ok"] is False and fragment in bad["error"], bad
    assert good["ok"] is True


def test_rule_a_line_over_64k_is_refused_and_the_connection_closed(server) -> None:
    answers = converse(server.path, b"x" * (MAX_LINE + 10), b'\n{"cmd": "info"}\n')
    assert len(answers) == 1 and "longer than" in answers[0]["error"]
    assert request(server.path, {"cmd": "info"})["ok"]


def test_several_requests_on_one_connection_are_answered_in_order(server) -> None:
    answers = converse(server.path, b'{"cmd": "balloon", "target": "1M"}\n\n{"cmd": "info"}\n{"cmd": "nope"}\n')
    assert [a["ok"] for a in answers] == [True, True, False] and answers[1]["balloon"]["target"] == MIB


def test_rule_an_internal_failure_is_an_error_answer_not_a_dead_server(server, machine) -> None:
    machine.memory = None  # info will fail inside the handler
    answer = request(server.path, {"cmd": "info"})
    assert answer["ok"] is False and answer["error"].startswith("internal error")
    assert request(server.path, {"cmd": "balloon", "target": 0})["ok"]


def test_balloon_and_stats_need_a_balloon(machine, tmp_path: Path) -> None:
    machine.balloon = None
    server = ControlServer(str(tmp_path / "s"), machine)
    try:
        for cmd in ({"cmd": "balloon", "target": "1M"}, {"cmd": "stats"}):
            answer = request(server.path, cmd)
            assert answer["ok"] is False and "no balloon" in answer["error"]
        assert request(server.path, {"cmd": "info"})["balloon"] is None
    finally:
        server.close()


# --- the socket file ---------------------------------------------------------------------------
def test_the_socket_is_private_and_removed_on_close(machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    server = ControlServer(str(path), machine)
    assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == 0o600
    server.close()
    server.close()  # idempotent
    assert not path.exists()


def test_the_socket_is_private_from_the_moment_it_exists(machine, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "vm.sock"
    modes = []
    listen = socket.socket.listen

    def spy(sock: socket.socket, *args: object) -> None:
        modes.append(stat.S_IMODE(path.lstat().st_mode))
        listen(sock, *args)

    old_umask = os.umask(0)  # the most permissive umask a user could have
    try:
        monkeypatch.setattr(socket.socket, "listen", spy)
        server = ControlServer(str(path), machine)
    finally:
        os.umask(old_umask)
    server.close()
    assert modes == [0o600]


def test_close_leaves_a_file_that_replaced_the_socket(machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    server = ControlServer(str(path), machine)
    path.unlink()
    path.write_text("someone else's file")
    server.close()
    assert path.read_text() == "someone else's file"


def test_close_leaves_another_machines_live_socket(machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    first = ControlServer(str(path), machine)
    path.unlink()  # e.g. removed by hand, and a second machine started at the same path
    second = ControlServer(str(path), machine)
    try:
        first.close()
        assert request(str(path), {"cmd": "info"})["ok"]
    finally:
        second.close()
    assert not path.exists()


def test_parallel_clients_are_all_answered(server) -> None:
    answers: list[dict] = []
    clients = [threading.Thread(target=lambda: answers.append(request(server.path, {"cmd": "info"}, timeout=60)))
               for _ in range(200)]  # fmt: skip
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    assert len(answers) == 200 and all(answer["ok"] for answer in answers)


def serving_threads() -> int:
    return sum(thread.name == "pykvm-control-conn" for thread in threading.enumerate())


def test_connections_are_capped_and_the_rest_wait_their_turn(server) -> None:
    idle = []
    for _ in range(MAX_CONNECTIONS + 100):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.path)  # blocking: waits for room in the backlog
        idle.append(sock)
    probe = idle[MAX_CONNECTIONS - 1]  # the last one served: it answers
    probe.sendall(b'{"cmd": "info"}\n')
    assert json.loads(probe.makefile().readline())["ok"]
    assert serving_threads() == MAX_CONNECTIONS
    waiting = idle[-1]
    waiting.sendall(b'{"cmd": "info"}\n')
    for sock in idle[:-1]:
        sock.close()  # slots come free; the last connection is served in turn
    waiting.settimeout(60)
    assert json.loads(waiting.makefile().readline())["ok"]
    waiting.close()


def test_out_of_descriptors_the_server_waits_instead_of_spinning(tmp_path: Path) -> None:
    # A server process with few descriptors; the test opens connections until it runs out.
    path = tmp_path / "vm.sock"
    script = textwrap.dedent(f"""\
        import logging, os, resource, sys
        from types import SimpleNamespace
        from pykvm.control_socket import ControlServer
        logging.basicConfig(level=logging.WARNING)
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 12, used + 12))
        server = ControlServer({str(path)!r}, SimpleNamespace())
        print("ready", flush=True)
        sys.stdin.read()  # until the test is done
        server.close()
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # fmt: skip
    rest = b""
    try:
        assert process.stdout.readline() == b"ready\n"
        clients = []
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            clients.append(sock)
        clients[0].sendall(b'{"cmd": "nope"}\n')  # answered: the server got this far
        assert json.loads(clients[0].makefile().readline())["ok"] is False
        first_warning = process.stderr.readline()  # the server ran out while accepting the rest
        assert b"cannot accept (Too many open files)" in first_warning
        for sock in clients:
            sock.close()
        assert request(str(path), {"cmd": "nope"}, timeout=60)["ok"] is False  # it serves again
    finally:
        _, rest = process.communicate(b"", timeout=60)
    assert process.returncode == 0 and rest == b""  # said once, not once per attempt


def test_the_client_gives_up_on_a_server_that_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "stopped.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stopped:  # listens, never accepts: a stopped VM
        stopped.bind(str(path))
        stopped.listen(1)
        with pytest.raises(ControlError, match="no answer within 0.5 s"):
            request(str(path), {"cmd": "info"}, timeout=0.5)


def test_pykvm_ctl_has_a_timeout(tmp_path: Path) -> None:
    path = tmp_path / "stopped.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stopped:
        stopped.bind(str(path))
        stopped.listen(1)
        out = subprocess.run([sys.executable, "-m", "pykvm", "ctl", str(path), "info", "--timeout", "0.5"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == f"pykvm: error: control socket {path}: no answer within 0.5 s (is the machine stopped?)\n"


def test_a_stale_socket_is_replaced_and_a_live_one_refused(machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    server = ControlServer(str(path), machine)
    try:
        with pytest.raises(ControlError, match="another process listens there"):
            ControlServer(str(path), machine)
        assert request(str(path), {"cmd": "info"})["ok"]
    finally:
        server.close()


def test_a_file_that_is_not_a_socket_is_left_alone(machine, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(str(path), machine)
    assert path.read_text() == "keep me"


def test_the_client_says_when_nobody_listens(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is the machine running with --control"):
        request(str(tmp_path / "missing.sock"), {"cmd": "info"})


def test_close_ends_open_connections(server) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(server.path)
    sock.sendall(b'{"cmd": "info"}\n')
    assert json.loads(sock.makefile().readline())["ok"]
    server.close()
    assert sock.recv(10) == b""
    sock.close()


def test_the_control_path_must_fit_a_unix_socket_address(machine) -> None:
    with pytest.raises(ControlError, match="1 to 107 bytes"):
        ControlServer("/tmp/" + "x" * 200, machine)
    with pytest.raises(ControlError, match="1 to 107 bytes"):
        ControlServer("", machine)


# --- human output -------------------------------------------------------------------------------
def test_format_answer_is_one_line_per_command() -> None:
    assert format_answer("balloon", {"target": 32 * MIB, "actual": 16 * MIB}) == "balloon: target 32.0 MiB, actual 16.0 MiB"
    stats = format_answer("stats", {"target": 0, "actual": 0, "stats": {"memtot": 64 * MIB, "memfree": MIB},
                                    "fresh": True, "rss": 100 * MIB, "guest_resident": 60 * MIB})  # fmt: skip
    assert "\n" not in stats and "total 64.0 MiB, free 1.0 MiB" in stats and "RSS 100.0 MiB" in stats
    info = format_answer("info", {"pid": 7, "memory": 64 * MIB, "cpus": 1, "balloon": None, "rss": MIB,
                                  "guest_resident": 0, "share_pages": False})  # fmt: skip
    assert info.startswith("pid 7: 64.0 MiB RAM, 1 vCPU, no balloon") and info.endswith("page sharing off")


# --- with KVM: the machine serves it, `pykvm ctl` talks to it ----------------------------------------
@pytest.mark.kvm
def test_a_server_answers_for_a_real_machine_until_closed(machine_factory, tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    vm = machine_factory(memory="32M", balloon=True)
    server = ControlServer(str(path), vm)
    answer = request(str(path), {"cmd": "info"})
    assert answer["memory"] == 32 * MIB and answer["devices"] == ["balloon"]
    assert request(str(path), {"cmd": "balloon", "target": "4M"})["target"] == 4 * MIB and vm.balloon.target == 4 * MIB
    server.close()
    assert not path.exists()


@pytest.mark.kvm
def test_pykvm_ctl_prints_one_line_or_json_and_fails_in_one_line(machine_factory, tmp_path: Path) -> None:
    path = tmp_path / "m.sock"
    server = ControlServer(str(path), machine_factory(memory="32M", balloon=True))

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pykvm", "ctl", str(path), *args], capture_output=True, text=True, timeout=60)

    out = ctl("balloon", "2M")
    assert out.returncode == 0 and out.stdout == "balloon: target 2.0 MiB, actual 0.0 MiB\n"
    out = ctl("info", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["balloon"]["target"] == 2 * MIB
    out = ctl("stats")
    assert out.returncode == 0 and out.stdout.startswith("balloon: target 2.0 MiB") and out.stdout.count("\n") == 1
    out = ctl("balloon", "1G")
    assert out.returncode == 2 and out.stderr.startswith("pykvm: error: a balloon of") and out.stderr.count("\n") == 1
    out = subprocess.run([sys.executable, "-m", "pykvm", "ctl", str(tmp_path / "none"), "info"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    server.close()

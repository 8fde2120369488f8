"""The pytest plugin (loaded through its pytest11 entry point): fixtures boot guests; tests skip
cleanly without KVM, or fail when it is required; a guest's output is in the report."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import guest

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_DOC = ROOT / "docs" / "ci.md"
WORKFLOW = ROOT / "docs" / "github-actions-kvm.yml"

TEST_FILE = f"""
import pytest

@pytest.mark.kvm
def test_marked():
    pass

def test_runs_a_guest(run_guest):
    assert run_guest({str(guest("hello_real.bin"))!r}).serial == b"Hello from real mode\\n"
"""


@pytest.fixture(autouse=True)
def _default_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYKVM_DEVICE", raising=False)
    monkeypatch.delenv("PYKVM_REQUIRE_KVM", raising=False)


@pytest.mark.guest  # its inner tests boot guests
def test_fixtures_boot_a_guest_when_kvm_is_usable(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(TEST_FILE)
    pytester.runpytest().assert_outcomes(passed=2)


@pytest.mark.parametrize(
    "device, reason",
    [
        ("/nonexistent/kvm", "PYKVM_DEVICE=/nonexistent/kvm: no such device (unset PYKVM_DEVICE to use /dev/kvm)"),
        ("/dev/null", "PYKVM_DEVICE=/dev/null: is not a KVM device*"),
    ],
)
def test_tests_skip_with_the_reason_when_the_device_is_not_kvm(pytester: pytest.Pytester, monkeypatch, device: str,
                                                               reason: str) -> None:  # fmt: skip
    monkeypatch.setenv("PYKVM_DEVICE", device)
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines([f"*KVM is unusable: {reason}"])
    result.stdout.no_fnmatch_line("*firmware*")


def test_a_missing_kvm_fails_when_ci_requires_it(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYKVM_DEVICE", "/nonexistent/kvm")
    monkeypatch.setenv("PYKVM_REQUIRE_KVM", "1")
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*PYKVM_REQUIRE_KVM=1 but KVM is unusable*"])


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root (mknod) and setpriv (to drop capabilities)"
)
@pytest.mark.parametrize("required, outcome", [("0", "2 skipped"), ("1", "2 errors")])
def test_without_permission_on_the_device_tests_skip_or_fail_as_asked(pytester: pytest.Pytester, required: str,
                                                                      outcome: str) -> None:  # fmt: skip
    # A CI runner where /dev/kvm exists but the runner's user may not open it.
    device = pytester.path / "kvm"
    os.mknod(device, stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)  # the real device, mode 000
    pytester.makepyfile(TEST_FILE)
    without_capabilities = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"]
    process = subprocess.run([*without_capabilities, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs"],
                             cwd=pytester.path, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYKVM_DEVICE": str(device), "PYKVM_REQUIRE_KVM": required})  # fmt: skip
    assert outcome in process.stdout, process.stdout
    assert "permission denied" in process.stdout


@pytest.mark.guest  # its inner tests boot guests
def test_run_guest_takes_machine_and_load_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        def test_two_cpus_and_a_mode(run_guest):
            result = run_guest({str(guest("smp.elf"))!r}, cpus=2, memory="32M", timeout=120)
            assert b"cpus: 2\\n" in result.serial and result.status == 1

        def test_a_load_option(run_guest):
            result = run_guest({str(guest("hello_long.bin"))!r}, mode="long", user=True)
            assert result.serial == b"Hello from long mode\\n"
    """)
    pytester.runpytest().assert_outcomes(passed=2)


def test_run_guest_names_an_unknown_option_and_where_options_go(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        def test_typo(run_guest):
            run_guest({str(guest("hello_real.bin"))!r}, cpu=2)
    """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*TypeError: run_guest() got unknown option(s) cpu: machine options are *cpus*; "
                                 "load options are *mode*"])  # fmt: skip


@pytest.mark.guest  # its inner tests boot guests
def test_a_machine_factory_run_has_a_default_timeout(pytester: pytest.Pytester, tmp_path: Path) -> None:
    spin = tmp_path / "spin.bin"
    spin.write_bytes(b"\xeb\xfe")  # jmp $
    pytester.makeini("[pytest]\npykvm_timeout = 1\n")
    pytester.makepyfile(f"""
        from pykvm.result import ExitReason

        def test_spinning_guest(machine_factory):
            machine = machine_factory()
            machine.load({str(spin)!r}, mode="real")
            assert machine.run().reason is ExitReason.TIMEOUT
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_a_bad_default_timeout_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\npykvm_timeout = nan\n")
    pytester.makepyfile("def test_it(machine_factory):\n    machine_factory()\n")
    result = pytester.runpytest()
    result.stderr.fnmatch_lines(["*pykvm_timeout = 'nan': give a finite number of seconds above 0*"])


FAILING_TEST = f"""
def test_wrong_expectation(run_guest):
    result = run_guest({str(guest("hello_real.bin"))!r}, mode="real")
    assert result.status == 0
"""


@pytest.mark.guest  # its inner tests boot guests
def test_the_guest_output_is_in_the_failure_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FAILING_TEST)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Captured stdout call*", "--- pykvm: serial output of machine 1 ---", "Hello from real mode"])


@pytest.mark.guest  # its inner tests boot guests
def test_the_guest_output_is_in_junit_system_out(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(FAILING_TEST)
    report = pytester.path / "report.xml"
    pytester.runpytest(f"--junitxml={report}", "-o", "junit_logging=system-out").assert_outcomes(failed=1)
    system_out = ElementTree.parse(report).getroot().find(".//testcase/system-out")
    assert system_out is not None and "Hello from real mode" in system_out.text


@pytest.mark.guest  # its inner tests boot guests
def test_the_readme_snippet_works_from_any_directory(pytester: pytest.Pytester, monkeypatch) -> None:
    snippet = re.search(r"### In pytest.*?```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert snippet is not None, "the README has a pytest snippet"
    tests = pytester.mkpydir("tests")
    (tests / "test_readme.py").write_text(snippet.group(1))
    shutil.copy(guest("hello_real.bin"), tests / "hello_real.bin")
    (pytester.path / "elsewhere").mkdir()
    monkeypatch.chdir(pytester.path / "elsewhere")
    result = pytester.runpytest_subprocess(str(tests))
    result.assert_outcomes(passed=1)


# --- the CI recipe (docs/ci.md) ---------------------------------------------------------------
def yaml_as_json(path: Path) -> dict:
    """``path`` parsed by PyYAML, in whichever Python here has it (pykvm does not depend on it)."""
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if python is None:
            continue
        done = subprocess.run([python, "-c", "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
                               str(path)], capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0:
            return json.loads(done.stdout)
        if "No module named 'yaml'" not in done.stderr:
            pytest.fail(f"{path} does not parse: {done.stderr}")
    pytest.skip("no Python here has PyYAML to parse the workflow with")


def test_the_ci_workflow_parses_and_does_what_the_recipe_says() -> None:
    workflow = yaml_as_json(WORKFLOW)
    steps = workflow["jobs"]["kvm"]["steps"]
    scripts = "\n".join(step.get("run", "") for step in steps)
    udev_rule = re.search(r"echo '(KERNEL==\"kvm\".*?)'", CI_DOC.read_text())
    assert udev_rule is not None and udev_rule.group(1) in scripts  # the rule the recipe explains
    assert "udevadm trigger --name-match=kvm" in scripts
    tests = next(step for step in steps if "pytest" in step.get("run", ""))
    assert tests["env"]["PYKVM_REQUIRE_KVM"] == "1" and "junit_logging=system-out" in tests["run"]
    assert any(step.get("uses", "").startswith("actions/checkout@") for step in steps)


# --- booted_guest: boot once, a fresh machine per test ----------------------------------------
BOOTED_TESTS = f"""
import hashlib
import pytest

COUNTER, DIRTY_PAGES = {str(guest("counter.bin"))!r}, {str(guest("dirty_pages.bin"))!r}
outputs, digests = [], []


def ram_digest(machine):
    digest = hashlib.sha256()
    for region in machine.memory.regions:
        digest.update(region.view)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def counter(booted_guest):
    return booted_guest(COUNTER, until=b"count 20\\n", mode="long")


@pytest.fixture(scope="session")
def rounds(booted_guest):
    return booted_guest(DIRTY_PAGES, until=0x31, mode="long")


@pytest.mark.parametrize("n", range(3))
def test_each_test_continues_from_the_marker(counter, n):
    assert b"count 20\\n" in counter.boot_output
    result = counter.fresh().run()
    whole = b"".join(b"count %d\\n" % i for i in range(1, 401)) + b"input 0 sum 0000000000000000\\n"
    assert result.status == 1 and counter.boot_output + result.serial == whole
    outputs.append(result.serial)
    assert result.serial == outputs[0]


@pytest.mark.parametrize("n", range(3))
def test_what_a_test_wrote_is_put_back(rounds, n):
    machine = rounds.fresh()
    digests.append(ram_digest(machine))
    machine.memory.write_u64(0x200000, 2)
    machine.memory.write_u64(0x200008, 0x300000 + 4096 * n)
    machine.memory.write_u64(0x200010, 0x500000 + 4096 * n)
    result = machine.run()
    assert result.exit_value == 0x31
    assert machine.memory.read(0x300000 + 4096 * n, 1) == b"\\xa5"
    assert digests[-1] == digests[0]


def test_a_test_that_closes_the_machine_leaves_a_fresh_one_for_the_next(rounds):
    rounds.fresh().close()
    assert not rounds.fresh().closed
"""


@pytest.mark.guest  # its inner tests boot guests
def test_booted_guest_gives_each_test_the_machine_as_saved(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(BOOTED_TESTS)
    pytester.runpytest().assert_outcomes(passed=7)


@pytest.mark.guest  # its inner tests boot guests
def test_a_booted_guest_reports_only_what_the_failing_test_printed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(f"""
        import pytest

        @pytest.fixture(scope="session")
        def counter(booted_guest):
            return booted_guest({str(guest("counter.bin"))!r}, until=b"count 20\\n", mode="long")

        def test_wrong_expectation(counter):
            assert counter.fresh().run().status == 0
    """)
    report = pytester.path / "report.xml"
    pytester.runpytest(f"--junitxml={report}", "-o", "junit_logging=system-out").assert_outcomes(failed=1)
    system_out = ElementTree.parse(report).getroot().find(".//testcase/system-out")
    assert system_out is not None and "count 400\n" in system_out.text and "count 20\n" not in system_out.text


@pytest.mark.guest  # its inner tests boot guests
@pytest.mark.parametrize(
    "image, until, message",
    [
        ("hello_real.bin", "b'ready'", "*hello_real.bin never printed b'ready': *its last output: 'Hello from real mode\\n'*"),
        ("hello_real.bin", "0x31", "*hello_real.bin never wrote 0x31 to the debug-exit port: *"),
    ],
)
def test_a_guest_that_never_gets_ready_fails_its_tests_with_why(pytester: pytest.Pytester, image: str, until: str,
                                                                message: str) -> None:  # fmt: skip
    pytester.makepyfile(f"""
        def test_it(booted_guest):
            booted_guest({str(guest(image))!r}, until={until}, mode="real")
    """)
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([message])
    result.stdout.no_fnmatch_line("*Traceback*")

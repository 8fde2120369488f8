"""The pytest plugin (loaded through its pytest11 entry point): fixtures boot guests; tests skip
cleanly without KVM, or fail when it is required."""

from __future__ import annotations

import pytest

from conftest import guest

pytest_plugins = ["pytester"]

TEST_FILE = f"""
import pytest

@pytest.mark.kvm
def test_marked():
    pass

def test_runs_a_guest(run_guest):
    assert run_guest({str(guest("hello_real.bin"))!r}).serial == b"Hello from real mode\\n"
"""


def test_fixtures_boot_a_guest_when_kvm_is_usable(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("PYKVM_DEVICE", raising=False)
    pytester.makepyfile(TEST_FILE)
    pytester.runpytest().assert_outcomes(passed=2)


def test_tests_skip_with_the_reason_when_kvm_is_missing(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYKVM_DEVICE", "/nonexistent/kvm")
    monkeypatch.delenv("PYKVM_REQUIRE_KVM", raising=False)
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*KVM is unusable: /nonexistent/kvm: does not exist*"])


def test_a_missing_kvm_fails_when_ci_requires_it(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("PYKVM_DEVICE", "/nonexistent/kvm")
    monkeypatch.setenv("PYKVM_REQUIRE_KVM", "1")
    pytester.makepyfile(TEST_FILE)
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*PYKVM_REQUIRE_KVM=1 but KVM is unusable*"])

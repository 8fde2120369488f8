"""pykvm is typed: the whole package passes mypy with the project's configuration (strict), the
README's Python examples pass ``mypy --strict`` against it, and mistakes a type checker should
catch (a misspelt machine option) are caught."""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest

from pykvm.config import MachineConfig, MachineOptions

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# Names the README's fragments take from their surroundings.
PREAMBLE = """\
import pykvm
import pytest

vm: pykvm.Machine = pykvm.Machine()
"""

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed (pip install -e '.[test]')")


def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)


def check(tmp_path: Path, sources: dict[str, str], *options: str) -> list[str]:
    """mypy's error lines for the modules ``sources`` (name -> code), checked against pykvm's types."""
    for name, code in sources.items():
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / f"{name}.py").write_text(code)
    stdout, _, _ = mypy_api.run([
        "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path / ".cache"), "--python-executable", sys.executable,
        "--config-file", "", *options, *(str(tmp_path / f"{name}.py") for name in sources),
    ])  # fmt: skip
    return [line for line in stdout.splitlines() if ": error:" in line]


def test_the_package_passes_mypy_with_the_project_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the configuration's ``packages = ["pykvm"]``: this tree's
    stdout, stderr, status = mypy_api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / ".cache"),
        "--python-executable", sys.executable,
    ])  # fmt: skip
    assert [line for line in stdout.splitlines() if ": error:" in line] == []
    assert status == 0, stdout + stderr


def test_the_readme_examples_pass_mypy_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(ROOT))  # pykvm from this tree, whatever way it is installed
    examples = readme_examples()
    assert len(examples) >= 6
    plain = {f"example_{i}": PREAMBLE + code for i, code in enumerate(examples) if "def test_" not in code}
    tests = {f"test_example_{i}": PREAMBLE + code for i, code in enumerate(examples) if "def test_" in code}
    assert check(tmp_path / "plain", plain) == []
    # pytest tests take their fixtures untyped, as pytest users write them
    assert check(tmp_path / "tests", tests, "--allow-untyped-defs") == []


def test_a_misspelt_machine_option_is_a_type_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    errors = check(tmp_path, {"typo": "import pykvm\n\npykvm.Machine(memroy='64M')\npykvm.Machine(cpus='2')\n"})
    assert len(errors) == 2 and 'Unexpected keyword argument "memroy"' in errors[0] and '"cpus"' in errors[1]


def test_the_machine_options_are_the_configuration_fields() -> None:
    assert set(MachineOptions.__annotations__) == {field.name for field in dataclasses.fields(MachineConfig)}

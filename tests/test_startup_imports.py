"""What ``pykvm run`` imports to start: the loader of the image's format and no other, and
nothing that only other commands use.  Checked in a fresh interpreter, where no other test's
imports count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from images import aout_kernel, multiboot_elf

# Import what `pykvm run` imports, load the image given, list the modules then loaded.
IMPORTED_FOR = """
import sys
from pathlib import Path
before = set(sys.modules)
import pykvm.cli
from pykvm.boot import load_image
from pykvm.boot.plan import LoadRequest
from pykvm.x86.e820 import build_memory_map
path = Path(sys.argv[1])
load_image(path, path.read_bytes(), LoadRequest(memory_map=build_memory_map(64 << 20)))
loaded = sorted(set(sys.modules) - before)
import json
print(json.dumps(loaded))
"""
OTHER_LOADERS = {"pykvm.boot.elf", "pykvm.boot.linux", "pykvm.boot.pvh"}


def imported_for(image: Path) -> set[str]:
    out = subprocess.run([sys.executable, "-c", IMPORTED_FOR, str(image)], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return set(json.loads(out.stdout))


def test_an_aout_multiboot_kernel_loads_no_other_loader(tmp_path: Path) -> None:
    image = tmp_path / "kernel.bin"
    image.write_bytes(aout_kernel())
    modules = imported_for(image)
    assert "pykvm.boot.multiboot" in modules
    assert not modules & OTHER_LOADERS


def test_an_elf_multiboot_kernel_loads_the_elf_parser(tmp_path: Path) -> None:
    image = tmp_path / "kernel.elf"
    image.write_bytes(multiboot_elf())
    modules = imported_for(image)
    assert {"pykvm.boot.multiboot", "pykvm.boot.elf"} <= modules


def test_the_run_command_does_not_import_what_only_other_commands_and_snapshots_use(tmp_path: Path) -> None:
    image = tmp_path / "kernel.bin"
    image.write_bytes(aout_kernel())
    modules = imported_for(image)
    assert not modules & {"json", "hashlib", "psutil", "pykvm.info", "pykvm.control_socket", "pykvm.snapshot"}
    # what only debugging, dirty logging and a guest setting the RTC need
    assert not modules & {"pykvm.kvm.debug", "pykvm.kvm.dirty_bitmap", "calendar"}


def test_the_console_script_starts_as_python_m_pykvm_does() -> None:
    from importlib.metadata import entry_points

    import pykvm.__main__

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "pykvm"]
    assert script.load() is pykvm.__main__.main


PURE_MODULES = ["pykvm.config", "pykvm.x86.interrupts", "pykvm.x86.acpi", "pykvm.x86.mptable", "pykvm.devices.fw_cfg",
                "pykvm.kvm.state"]


def test_the_pure_layers_load_without_the_c_extension() -> None:
    code = ("import importlib, sys\n"
            "sys.modules['pykvm._native'] = sys.modules['_cffi_backend'] = None  # importing either fails\n"
            f"for name in {PURE_MODULES!r}:\n"
            "    importlib.import_module(name)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

"""cffi build glue for pykvm's C fast path (run at install time by setuptools).

``_native.h`` is the cdef and ``_native.c`` the source; kernel structures take their
layout from ``<linux/kvm.h>``.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent

ffibuilder = FFI()
ffibuilder.cdef((HERE / "_native.h").read_text())
ffibuilder.set_source(
    "pykvm._native",
    (HERE / "_native.c").read_text(),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parent / "build" / "cffi"), verbose=True)

# setuptools reads everything else from pyproject.toml; cffi_modules has no pyproject form.
# The C extension uses only the limited API (cffi builds it as _native.abi3.so), so the wheel is
# tagged abi3: one wheel serves every CPython from 3.10 on.
from setuptools import setup

setup(
    cffi_modules=["pykvm/_build_native.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

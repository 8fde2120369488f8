# setuptools reads everything else from pyproject.toml; cffi_modules has no pyproject form.
from setuptools import setup

setup(cffi_modules=["pykvm/_build_native.py:ffibuilder"])

# pykvm: set-up, guests, tests, benchmarks.  See README.md.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install guests demo test bench clean

install:
	scripts/install-deps
	$(PIP) install -e '.[test]'

guests:
	$(MAKE) -C guests

demo: install guests
	$(PYTHON) -m pykvm run guests/build/multiboot.elf --cmdline "hello from the pykvm demo" --stats

test: guests
	$(PYTHON) -m pytest

bench: guests
	$(MAKE) -C bench
	$(PYTHON) bench/run.py

clean:
	$(MAKE) -C guests clean
	-$(MAKE) -C bench clean
	rm -rf build *.egg-info pykvm/_native*.so

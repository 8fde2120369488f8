# pykvm: set-up, guests, tests, benchmarks.  See README.md.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install guests demo test bench clean

install:
	scripts/install-deps
	$(PIP) install -e '.[test]'

guests:
	$(MAKE) -C guests

# The guest ends by writing 0 to the debug-exit port: pykvm's status is then (0 << 1) | 1.
demo: install guests
	$(PYTHON) -m pykvm run guests/build/multiboot.elf --cmdline "hello from the pykvm demo" --stats; \
	    test $$? -eq 1

test: guests
	$(PYTHON) -m pytest

bench: guests
	$(MAKE) -C bench
	$(PYTHON) bench/run.py

clean:
	$(MAKE) -C guests clean
	-$(MAKE) -C bench clean
	rm -rf build *.egg-info pykvm/_native*.so

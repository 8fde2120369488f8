# pykvm: set-up, guests, tests, benchmarks.  See README.md.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install guests demo test bench clean linux-guest linux-smoke

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
	scripts/install-deps bench
	$(MAKE) -C bench
	$(PYTHON) bench/run.py

# The Linux test guest (Debian's kernel + a busybox initramfs) in guests/linux/build/: see guests/linux/build.sh.
linux-guest:
	PYTHON=$(PYTHON) guests/linux/build.sh

# Boot it to its initramfs marker and poweroff (hardware KVM hosts; skipped with the reason elsewhere).
linux-smoke: linux-guest
	PYTHON=$(PYTHON) guests/linux/smoke.sh

clean:
	$(MAKE) -C guests clean
	-$(MAKE) -C bench clean
	rm -rf build *.egg-info pykvm/_native*.so

# pykvm: set-up, guests, tests, benchmarks.  See README.md.
#
# Python: inside an active virtual environment ($VIRTUAL_ENV set) pykvm is installed there;
# otherwise into the project's own .venv, created with the system's python3 (Debian and Ubuntu
# refuse `pip install` into the system interpreter, PEP 668).  `. .venv/bin/activate` then puts
# `pykvm` on PATH.  PYTHON=... overrides the interpreter either way.
ifdef VIRTUAL_ENV
PYTHON ?= $(VIRTUAL_ENV)/bin/python
else
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
endif
# Reinstalled when the package's build inputs change (the C extension is built at install time).
INSTALLED := $(dir $(PYTHON)).pykvm-installed

.PHONY: install guests demo test bench clean linux-guest linux-smoke kvm-unit-tests

install: $(INSTALLED)

$(INSTALLED): pyproject.toml setup.py pykvm/_native.c pykvm/_native.h pykvm/_build_native.py
	scripts/install-deps
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@
	@test -n "$(VIRTUAL_ENV)" || echo "pykvm is installed in $(VENV): '. $(VENV)/bin/activate' puts 'pykvm' on PATH"

guests:
	$(MAKE) -C guests

# The guest ends by writing 0 to the debug-exit port: pykvm's status is then (0 << 1) | 1.
demo: install guests
	$(PYTHON) -m pykvm run guests/build/multiboot.elf --cmdline "hello from the pykvm demo" --stats; \
	    test $$? -eq 1

test: install guests
	$(PYTHON) -m pytest

bench: install guests
	scripts/install-deps bench
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(MAKE) -C bench
	$(PYTHON) bench/run.py

# KVM's own test suite through its run_tests.sh, under pykvm-qemu and under QEMU: one table
# (build/kvm-unit-tests; see scripts/kvm-unit-tests for the options, e.g. ARGS="--all").
kvm-unit-tests: install
	scripts/install-deps bench
	$(PYTHON) scripts/kvm-unit-tests $(ARGS)

# The Linux test guest (Debian's kernel + a busybox initramfs) in guests/linux/build/: see guests/linux/build.sh.
linux-guest: install
	PYTHON=$(PYTHON) guests/linux/build.sh

# Boot it to its initramfs marker and poweroff (hardware KVM hosts; skipped with the reason elsewhere).
linux-smoke: linux-guest
	PYTHON=$(PYTHON) guests/linux/smoke.sh

clean:
	$(MAKE) -C guests clean
	-$(MAKE) -C bench clean
	rm -rf build *.egg-info pykvm/_native*.so $(INSTALLED)

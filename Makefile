# kvmpy: set up, build the guests, test, benchmark.
#   make demo   venv + shim + guests, then run the default guest
#   make test   the same set-up, then ruff, mypy and pytest
#   make bench  the benchmarks in bench/
#   make test-linux  real kernels (tiny Linux, Debian's cloud kernel, memtest86+): slow
#   make fuzz   the property-based (hypothesis) tests with a long budget
#   make docs   the API reference from the docstrings, in build/api/ (make test builds it too)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AS ?= as
LD ?= ld

OUT := guests/out
REAL_GUESTS := real_hello pio_loop counter runner_pass runner_fail runner_skip vga_colors chatty \
	s3_resume
PROTECTED_GUESTS := protected_hello paged32_hello exit_cycles iret32 intn32 x87env32
LONG_GUESTS := long_hello triple_fault mmio_hello interrupts gdb_target stress_io cpl0_loop cpl3_loop \
	complete64 s3_wake64 x87env64
MULTIBOOT_GUESTS := multiboot_hello
PVH_GUESTS := pvh_hello
GUESTS := $(REAL_GUESTS:%=$(OUT)/%.bin) $(PROTECTED_GUESTS:%=$(OUT)/%.bin) \
	$(LONG_GUESTS:%=$(OUT)/%.bin) $(MULTIBOOT_GUESTS:%=$(OUT)/%.elf) $(PVH_GUESTS:%=$(OUT)/%.elf)

.PHONY: all setup guests demo test lint unit docs bench fuzz clean linux-guests test-linux bench-linux linux-cloud-init
.DELETE_ON_ERROR:

all: setup guests

# The freestanding C toy kernel (multiboot, long mode, LAPIC timer, SMP).
include guests/toykernel.mk

setup: $(VENV)/.installed

# Reinstall (and so rebuild the cffi shim) whenever the packaging or C changes.
$(VENV)/.installed: pyproject.toml setup.py kvmpy/backends/kvm/_build.py $(wildcard csrc/*.c csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

guests: $(GUESTS) $(TOYKERNEL_ELF) $(OUT)/gdb_target.elf

$(REAL_GUESTS:%=$(OUT)/%.bin): $(OUT)/%.bin: guests/%.S guests/real.ld guests/puts.inc guests/rtc_alarm.inc
	@mkdir -p $(OUT)
	$(AS) --32 -I guests -o $(OUT)/$*.o $<
	$(LD) -m elf_i386 -T guests/real.ld -o $@ $(OUT)/$*.o

$(PROTECTED_GUESTS:%=$(OUT)/%.bin): $(OUT)/%.bin: guests/%.S guests/protected.ld guests/puts.inc guests/rtc_alarm.inc guests/x87env.inc
	@mkdir -p $(OUT)
	$(AS) --32 -I guests -o $(OUT)/$*.o $<
	$(LD) -m elf_i386 -T guests/protected.ld -o $@ $(OUT)/$*.o

$(LONG_GUESTS:%=$(OUT)/%.bin): $(OUT)/%.bin: guests/%.S guests/long.ld guests/puts.inc guests/rtc_alarm.inc guests/x87env.inc
	@mkdir -p $(OUT)
	$(AS) --64 -I guests -o $(OUT)/$*.o $<
	$(LD) -m elf_x86_64 -T guests/long.ld -o $@ $(OUT)/$*.o

$(MULTIBOOT_GUESTS:%=$(OUT)/%.elf): $(OUT)/%.elf: guests/%.S guests/multiboot.ld guests/puts.inc guests/rtc_alarm.inc
	@mkdir -p $(OUT)
	$(AS) --32 -I guests -o $(OUT)/$*.o $<
	$(LD) -m elf_i386 --no-warn-rwx-segments -T guests/multiboot.ld -o $@ $(OUT)/$*.o

$(PVH_GUESTS:%=$(OUT)/%.elf): $(OUT)/%.elf: guests/%.S guests/pvh.ld guests/puts.inc guests/rtc_alarm.inc
	@mkdir -p $(OUT)
	$(AS) --32 -I guests -o $(OUT)/$*.o $<
	$(LD) -m elf_i386 --no-warn-rwx-segments -T guests/pvh.ld -o $@ $(OUT)/$*.o

# gdb_target linked once more as an ELF, only so gdb has its symbols.
$(OUT)/gdb_target.elf: $(OUT)/gdb_target.bin
	$(LD) -m elf_x86_64 -Ttext=0x100000 -e _start -o $@ $(OUT)/gdb_target.o

# The guest reports success with debug-exit code 0, which QEMU's convention
# turns into process status 1.
demo: all
	$(BIN)/kvmpy run $(OUT)/real_hello.bin; status=$$?; \
	echo "kvmpy exited with status $$status"; test $$status -eq 1

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

unit: all
	$(BIN)/pytest

# pdoc's warnings (an annotation it cannot resolve, say) fail the build.
docs: setup
	$(BIN)/python -W error::UserWarning -m pdoc --docformat markdown -o build/api kvmpy

test: lint unit docs

# Debian's packages fetched (never installed) and a tiny kernel built, cached in
# guests/linux/cache/; then the kernels booted, with the time to each marker.
linux-guests:
	guests/linux/build.sh

test-linux: all linux-guests
	$(BIN)/pytest tests/linux -v -s --durations=0

bench: all
	$(BIN)/python bench/exit_roundtrip.py
	$(BIN)/python bench/stats_overhead.py
	$(BIN)/python bench/lifecycle.py
	$(BIN)/python bench/snapshot_restore.py
	$(BIN)/python bench/qemu_compare.py
	$(BIN)/python bench/handler_path.py
	$(BIN)/python bench/guest_exit_cycles.py
	$(BIN)/python bench/rss_stress.py
	$(BIN)/python bench/hw_vs_sw.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/completion.py

bench-linux: all linux-guests
	$(BIN)/python bench/linux_boot.py

# Debian's stock cloud kernel to `Run /init` (about 25 minutes on a PVM host: not in CI).
linux-cloud-init: all linux-guests
	$(BIN)/python guests/linux/cloud_to_init.py
# The hypothesis tests (tests/test_*fuzz*.py) run a short budget in `make test`;
# this runs them long: FUZZ_EXAMPLES examples per test.
FUZZ_EXAMPLES ?= 20000
fuzz: all
	KVMPY_FUZZ=1 KVMPY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q $(wildcard tests/test_*fuzz*.py)

clean:
	rm -rf $(OUT) build *.egg-info kvmpy/backends/kvm/*.so kvmpy/backends/kvm/_kvm.c

# toykernel.mk: builds guests/out/toykernel.elf, a Multiboot v1 toy kernel.
#
# The top-level Makefile includes this file; it also works on its own:
#   make -f guests/toykernel.mk               build $(OUT)/toykernel.elf
#   make -f guests/toykernel.mk toykernel-qemu   boot it under QEMU
# Everything here is prefixed TOYKERNEL_ / toykernel so it clashes with nothing.
#
# How the image is made: the C code and the 64-bit half of boot.S are 64-bit,
# so everything is compiled and linked as x86-64; objcopy then rewrites the
# result as an ELF32 file.  Multiboot loaders (QEMU's -kernel included) only
# take ELF32, and the bytes are the same: the loader just copies segments to
# their physical addresses and jumps to the 32-bit entry point.

OUT ?= guests/out

# Including this file must not change the includer's default goal.
TOYKERNEL_SAVED_GOAL := $(.DEFAULT_GOAL)

TOYKERNEL_DIR := guests/toykernel
TOYKERNEL_OBJDIR := $(OUT)/toykernel
TOYKERNEL_ELF := $(OUT)/toykernel.elf
TOYKERNEL_ELF64 := $(TOYKERNEL_OBJDIR)/toykernel64.elf
TOYKERNEL_OBJS := $(addprefix $(TOYKERNEL_OBJDIR)/,boot.o kernel.o lapic.o smp.o)

TOYKERNEL_CC ?= gcc
TOYKERNEL_LD ?= ld
TOYKERNEL_OBJCOPY ?= objcopy
TOYKERNEL_OBJDUMP ?= objdump
TOYKERNEL_NM ?= nm
TOYKERNEL_QEMU ?= qemu-system-x86_64
# QEMU tries the accelerators in order: KVM where it works, else TCG.
TOYKERNEL_QEMU_ACCEL ?= -accel kvm -accel tcg
TOYKERNEL_SMP ?= 2
TOYKERNEL_APPEND ?= hello world

# Freestanding 64-bit kernel code:
#   -mno-red-zone           interrupts push onto the stack below RSP; the
#                           red zone would let them clobber live data
#   -mgeneral-regs-only     no SSE/x87: the interrupt stubs save only the
#                           general registers, and no FPU set-up is needed
#   -fno-pic -fno-pie       absolute addresses; the kernel runs where linked
#   -fcf-protection=none    no endbr64 (some distributions' gcc adds them)
#   -fno-tree-loop-distribute-patterns
#                           stop gcc turning memcpy()'s own loop into a call
#                           to memcpy
TOYKERNEL_CFLAGS := -m64 -std=gnu11 -O2 -Wall -Wextra -ffreestanding -nostdlib \
	-fno-pic -fno-pie -fno-stack-protector -mno-red-zone -mgeneral-regs-only \
	-fcf-protection=none -fno-asynchronous-unwind-tables \
	-fno-tree-loop-distribute-patterns
TOYKERNEL_LDFLAGS := -m elf_x86_64 -nostdlib -static -z max-page-size=0x1000

# Instructions that end the guest with KVM_EXIT_INTERNAL_ERROR on PVM hosts
# (kvm_pvm, where KVM emulates all kernel-mode code).  The build fails if any
# appears in the kernel.
TOYKERNEL_BANNED := int3|int|fwait|wait|popcnt|cmpxchg16b|xsave[a-z0-9]*|xrstor[a-z0-9]*|xgetbv|clac|stac|invpcid|clwb|movbe|rdpru|iret|iretl|iretw

.PHONY: toykernel toykernel-check toykernel-qemu

toykernel: $(TOYKERNEL_ELF)

$(TOYKERNEL_OBJDIR)/%.o: $(TOYKERNEL_DIR)/%.c $(TOYKERNEL_DIR)/toykernel.h guests/toykernel.mk
	@mkdir -p $(TOYKERNEL_OBJDIR)
	$(TOYKERNEL_CC) $(TOYKERNEL_CFLAGS) -c -o $@ $<

$(TOYKERNEL_OBJDIR)/boot.o: $(TOYKERNEL_DIR)/boot.S $(TOYKERNEL_DIR)/toykernel.h guests/toykernel.mk
	@mkdir -p $(TOYKERNEL_OBJDIR)
	$(TOYKERNEL_CC) -m64 -c -o $@ $<

$(TOYKERNEL_ELF64): $(TOYKERNEL_OBJS) $(TOYKERNEL_DIR)/linker.ld
	$(TOYKERNEL_LD) $(TOYKERNEL_LDFLAGS) -T $(TOYKERNEL_DIR)/linker.ld -o $@ $(TOYKERNEL_OBJS)

$(TOYKERNEL_ELF): $(TOYKERNEL_ELF64) $(TOYKERNEL_OBJDIR)/check.ok
	$(TOYKERNEL_OBJCOPY) -O elf32-i386 $< $@

# Disassemble each part in the mode it runs in (boot.S holds 32-bit, 64-bit
# and 16-bit code; the trampoline's data, from ap_gdt_ptr on, is skipped)
# and fail on a banned mnemonic.
toykernel-check: $(TOYKERNEL_OBJDIR)/check.ok

$(TOYKERNEL_OBJDIR)/check.ok: $(TOYKERNEL_OBJS)
	@{ $(TOYKERNEL_OBJDUMP) -d $(filter-out %/boot.o,$(TOYKERNEL_OBJS)); \
	   $(TOYKERNEL_OBJDUMP) -d -j .text $(TOYKERNEL_OBJDIR)/boot.o; \
	   $(TOYKERNEL_OBJDUMP) -d -M i386 -j .text.boot $(TOYKERNEL_OBJDIR)/boot.o; \
	   $(TOYKERNEL_OBJDUMP) -D -M i8086 -j .rodata.trampoline $(TOYKERNEL_OBJDIR)/boot.o \
	     --stop-address=0x$$($(TOYKERNEL_NM) $(TOYKERNEL_OBJDIR)/boot.o \
	                         | awk '$$3 == "ap_gdt_ptr" { print $$1 }'); \
	 } | awk -F'\t' 'NF >= 3 { split($$3, word, " "); print word[1] }' > $@.mnemonics
	@test -s $@.mnemonics || { echo "toykernel: objdump disassembled nothing"; exit 1; }
	@if grep -E -x '$(TOYKERNEL_BANNED)' $@.mnemonics > $@.found; then \
	   echo "toykernel: instructions that PVM hosts cannot run:"; \
	   sort $@.found | uniq -c; exit 1; fi
	@echo "toykernel: objdump check passed, no banned instructions"
	@touch $@

toykernel-qemu: $(TOYKERNEL_ELF)
	$(TOYKERNEL_QEMU) $(TOYKERNEL_QEMU_ACCEL) -kernel $< -append "$(TOYKERNEL_APPEND)" -smp $(TOYKERNEL_SMP) \
	  -m 128 -display none -serial stdio -no-reboot \
	  -device isa-debug-exit,iobase=0xf4,iosize=4; \
	status=$$?; echo "qemu exit status $$status (1 = all checks passed)"; \
	test $$status -eq 1

# Included: restore the includer's default goal (when this file comes before
# the includer's first target, the empty value lets that target become it).
# On its own (make -f guests/toykernel.mk): the default goal is `toykernel`.
ifneq ($(firstword $(MAKEFILE_LIST)),guests/toykernel.mk)
.DEFAULT_GOAL := $(TOYKERNEL_SAVED_GOAL)
endif

/*
 * The floor for bench/guest_exit_cycles.py: the smallest C run loop that
 * answers guests/out/exit_cycles.bin's exits.  It loads the flat Multiboot
 * image at 1 MiB, enters it in 32-bit flat protected mode at the header's
 * entry_addr, and per exit: IN 0xe0 reads 0, MMIO reads read 0, the UART's
 * line status says "ready", its data port goes to stdout, and port 0xf4
 * ends the run.
 *
 * Usage: guest_exit_cycles_ref IMAGE   -> the guest's own output
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM_SIZE (4 << 20)
#define LOAD_ADDR 0x100000
#define MB_MAGIC 0x1badb002u

static void die(const char *what)
{
	fprintf(stderr, "guest_exit_cycles_ref: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int ret = ioctl(fd, req, arg);

	if (ret < 0)
		die(what);
	return ret;
}

static void flat_segment(struct kvm_segment *seg, uint16_t selector, uint8_t type)
{
	memset(seg, 0, sizeof(*seg));
	seg->base = 0;
	seg->limit = 0xffffffff;
	seg->selector = selector;
	seg->type = type;
	seg->present = 1;
	seg->s = 1;
	seg->db = 1;
	seg->g = 1;
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	uint32_t entry = 0;
	uint8_t *mem;
	FILE *image;
	int kvm, vm, vcpu;
	long size, at;

	if (argc != 2) {
		fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
		return 2;
	}
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm, KVM_SET_TSS_ADDR, (void *)0xfffbd000UL, "KVM_SET_TSS_ADDR");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	image = fopen(argv[1], "rb");
	if (!image)
		die(argv[1]);
	size = (long)fread(mem + LOAD_ADDR, 1, MEM_SIZE - LOAD_ADDR, image);
	fclose(image);
	for (at = 0; at + 32 <= size && at < 8192; at += 4) {
		uint32_t *h = (uint32_t *)(mem + LOAD_ADDR + at);

		if (h[0] == MB_MAGIC && h[0] + h[1] + h[2] == 0 && (h[1] & (1u << 16))) {
			entry = h[7];
			break;
		}
	}
	if (!entry) {
		fprintf(stderr, "guest_exit_cycles_ref: %s: no multiboot header with addresses\n",
			argv[1]);
		return 2;
	}
	memset(&region, 0, sizeof(region));
	region.memory_size = MEM_SIZE;
	region.userspace_addr = (uintptr_t)mem;
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	run = mmap(NULL, xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"),
		   PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	flat_segment(&sregs.cs, 0x10, 0xb);
	flat_segment(&sregs.ds, 0x18, 0x3);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.cr0 |= 1; /* PE */
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = entry;
	regs.rflags = 2;
	regs.rax = 0x2badb002;
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	for (;;) {
		uint8_t *data = (uint8_t *)run + run->io.data_offset;

		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO:
			data = (uint8_t *)run + run->io.data_offset;
			if (run->io.direction == KVM_EXIT_IO_OUT) {
				if (run->io.port == 0xf4)
					return fflush(stdout) ? 2 : 0;
				if (run->io.port == 0x3f8)
					putchar(*data);
			} else {
				memset(data, 0, run->io.size);
				if (run->io.port == 0x3fd)
					*data = 0x20;
			}
			break;
		case KVM_EXIT_MMIO:
			if (!run->mmio.is_write)
				memset(run->mmio.data, 0, run->mmio.len);
			break;
		default:
			fprintf(stderr, "guest_exit_cycles_ref: unexpected exit %u\n", run->exit_reason);
			return 2;
		}
	}
}

/*
 * The reference for bench/exit_roundtrip.py: the smallest C run loop that can
 * run guests/out/pio_loop.bin.  Same VM set-up as kvmpy (real mode, image at
 * 0x7c00, ECX = exits), then KVM_RUN and a switch on the port per exit.
 *
 * Usage: exit_loop_ref IMAGE EXITS   -> prints "exits=N seconds=S"
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
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (1 << 20)
#define LOAD_ADDR 0x7c00

static void die(const char *what)
{
	fprintf(stderr, "exit_loop_ref: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int ret = ioctl(fd, req, arg);

	if (ret < 0)
		die(what);
	return ret;
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	struct timespec t0, t1;
	volatile uint8_t sink = 0;
	unsigned long exits = 0;
	uint8_t *mem;
	FILE *image;
	int kvm, vm, vcpu;
	long size;

	if (argc != 3) {
		fprintf(stderr, "usage: %s IMAGE EXITS\n", argv[0]);
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
	if (size <= 0)
		die("read image");
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
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = LOAD_ADDR;
	regs.rflags = 2;
	regs.rcx = strtoul(argv[2], NULL, 0);
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "exit_loop_ref: unexpected exit %u\n", run->exit_reason);
			return 2;
		}
		exits++;
		if (run->io.port == 0xf4)
			break;
		if (run->io.port == 0x80)
			sink = *((uint8_t *)run + run->io.data_offset);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	(void)sink;
	printf("exits=%lu seconds=%.9f\n", exits,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	return 0;
}

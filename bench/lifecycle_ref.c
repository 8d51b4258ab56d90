/*
 * The reference for bench/lifecycle.py: the smallest C program that does what
 * one kvmpy Machine lifecycle does: open /dev/kvm, create a VM with the
 * in-kernel irqchip and PIT, 16 MiB of RAM, one vCPU with KVM's supported
 * CPUID, load a real-mode guest at 0x7c00, run it to its debug-exit write,
 * and close everything.  Repeats it N times and prints the total time.
 *
 * Usage: lifecycle_ref IMAGE N   -> prints "runs=N seconds=S"
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

#define MEM_SIZE (16 << 20)
#define LOAD_ADDR 0x7c00
#define MAX_CPUID 256

static void die(const char *what)
{
	fprintf(stderr, "lifecycle_ref: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int xioctl(int fd, unsigned long req, unsigned long arg, const char *what)
{
	int ret = ioctl(fd, req, arg);

	if (ret < 0)
		die(what);
	return ret;
}

static void lifecycle(const uint8_t *image, size_t size)
{
	struct kvm_userspace_memory_region region;
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	struct kvm_cpuid2 *cpuid;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	uint64_t identity = 0xfffbc000;
	int kvm, vm, vcpu, run_size;
	uint8_t *mem;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000, "KVM_SET_TSS_ADDR");
	xioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, (unsigned long)&identity, "KVM_SET_IDENTITY_MAP_ADDR");
	xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
	xioctl(vm, KVM_CREATE_PIT2, (unsigned long)&pit, "KVM_CREATE_PIT2");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	memcpy(mem + LOAD_ADDR, image, size);
	memset(&region, 0, sizeof(region));
	region.memory_size = MEM_SIZE;
	region.userspace_addr = (uintptr_t)mem;
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, (unsigned long)&region, "KVM_SET_USER_MEMORY_REGION");
	vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	cpuid = calloc(1, sizeof(*cpuid) + MAX_CPUID * sizeof(cpuid->entries[0]));
	cpuid->nent = MAX_CPUID;
	xioctl(kvm, KVM_GET_SUPPORTED_CPUID, (unsigned long)cpuid, "KVM_GET_SUPPORTED_CPUID");
	xioctl(vcpu, KVM_SET_CPUID2, (unsigned long)cpuid, "KVM_SET_CPUID2");
	free(cpuid);
	run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	xioctl(vcpu, KVM_GET_SREGS, (unsigned long)&sregs, "KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	xioctl(vcpu, KVM_SET_SREGS, (unsigned long)&sregs, "KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = LOAD_ADDR;
	regs.rflags = 2;
	xioctl(vcpu, KVM_SET_REGS, (unsigned long)&regs, "KVM_SET_REGS");
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0xf4)
			break;
	}
	munmap(run, run_size);
	close(vcpu);
	close(vm);
	munmap(mem, MEM_SIZE);
	close(kvm);
}

int main(int argc, char **argv)
{
	static uint8_t image[4096];
	struct timespec t0, t1;
	size_t size;
	FILE *file;
	long i, n;

	if (argc != 3) {
		fprintf(stderr, "usage: %s IMAGE N\n", argv[0]);
		return 2;
	}
	file = fopen(argv[1], "rb");
	if (!file)
		die(argv[1]);
	size = fread(image, 1, sizeof(image), file);
	fclose(file);
	n = strtol(argv[2], NULL, 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < n; i++)
		lifecycle(image, size);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("runs=%ld seconds=%.9f\n", n,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	return 0;
}

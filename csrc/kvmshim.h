/*
 * kvmshim: the thin C layer under kvmpy.
 *
 * It makes ioctls (returning -errno instead of touching errno, so Python can
 * raise a precise KvmError) and decodes each KVM_RUN exit into one flat
 * struct, so the Python run loop reads plain integers instead of walking the
 * kvm_run union.  Everything else lives in Python.
 */
#ifndef KVMSHIM_H
#define KVMSHIM_H

#include <stdint.h>
#include <sys/mman.h>
#include <linux/kvm.h>

/* One vCPU exit, decoded.  Only the fields for `reason` are meaningful. */
struct kvmshim_exit {
	uint32_t reason;		/* KVM_EXIT_* */

	/* KVM_EXIT_IO */
	uint8_t io_direction;		/* KVM_EXIT_IO_IN or KVM_EXIT_IO_OUT */
	uint8_t io_size;		/* 1, 2 or 4 */
	uint16_t io_port;
	uint32_t io_count;		/* > 1 for string I/O (rep ins/outs) */

	/* KVM_EXIT_MMIO */
	uint8_t mmio_is_write;
	uint32_t mmio_len;		/* 1..8 */
	uint64_t mmio_addr;

	/* The first I/O item or the MMIO data, as a little-endian integer. */
	uint64_t value;
	/* Where in the kvm_run page that data lives (for reads and string I/O). */
	uint32_t data_offset;

	/* KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_SYSTEM_EVENT */
	uint32_t suberror;		/* internal.suberror or system_event.type */
	uint32_t ndata;
	uint64_t data[16];

	/* KVM_EXIT_FAIL_ENTRY, KVM_EXIT_UNKNOWN */
	uint64_t hardware_reason;
	uint32_t cpu;

	/* KVM_EXIT_DEBUG */
	uint32_t debug_exception;
	uint64_t debug_pc;
	uint64_t debug_dr6;
	uint64_t debug_dr7;
};

/* ioctl(fd, request, arg) for pointer arguments: result, or -errno. */
long kvmshim_ioctl(int fd, unsigned long request, void *arg);
/* ioctl(fd, request, value) for integer arguments: result, or -errno. */
long kvmshim_ioctl_value(int fd, unsigned long request, unsigned long value);

/*
 * What kvmshim_run returns: a generic exit kind, so the Python loop branches
 * on small integers and never needs KVM's numbers.  These values mirror
 * kvmpy.backends.exits.ExitKind (the KVM backend checks they agree at
 * import); exit.reason keeps KVM's own KVM_EXIT_* for names and the arch hook.
 */
#define KVMSHIM_EXIT_PORT_OUT 1
#define KVMSHIM_EXIT_PORT_IN 2
#define KVMSHIM_EXIT_PORT_STRING 3
#define KVMSHIM_EXIT_MMIO 4
#define KVMSHIM_EXIT_HLT 5
#define KVMSHIM_EXIT_SHUTDOWN 6
#define KVMSHIM_EXIT_INTERNAL_ERROR 7
#define KVMSHIM_EXIT_FAIL_ENTRY 8
#define KVMSHIM_EXIT_SYSTEM_EVENT 9
#define KVMSHIM_EXIT_DEBUG 10
#define KVMSHIM_EXIT_SPURIOUS 11
#define KVMSHIM_EXIT_OTHER 12

/*
 * Exit statistics, kept by the shim so that counting costs the Python loop
 * nothing: one row per exit kind, keyed by (reason << 40 | where), where is
 * the port for port I/O, the page for MMIO and 0 otherwise.  An open-address
 * table; when it is full, further kinds are counted in its last slot (key ~0).
 * The key's reason is the exit kind; for KVMSHIM_EXIT_OTHER, where is KVM's reason.
 */
#define KVMSHIM_STATS_SLOTS 4096
/* Set in the key of exits the shim answered itself (exit windows, below). */
#define KVMSHIM_STAT_ANSWERED ((uint64_t)1 << 48)
#define KVMSHIM_STATS_OVERFLOW (~(uint64_t)0)

struct kvmshim_stat {
	uint64_t key;		/* 0: unused */
	uint64_t count;
	uint64_t run_ns;	/* time in KVM_RUN that ended in this exit */
	uint64_t handler_ns;	/* time userspace spent on these exits */
};

/*
 * Exit windows: address ranges whose accesses the shim answers itself, going
 * straight back into KVM_RUN, as KVM answers its in-kernel devices.  Python
 * publishes them (kvmpy/backends/kvm/windows.py) from the buses' layout; each
 * is one of two things whose behaviour needs no device code:
 *   - plain memory (memory != NULL): a read returns the bytes at the offset, a
 *     write stores them; for a port, bytes past the end read 0 and writes to
 *     them are dropped; an MMIO access must lie wholly inside;
 *   - nothing (memory == NULL): no device there, so reads are all-ones and
 *     writes are dropped, and each access is counted in the misses table.
 * Anything else, or any doubt, goes to Python, which gives the same answer.
 */
struct kvmshim_window {
	uint64_t base;
	uint64_t length;
	uint8_t *memory;
};

/*
 * Unclaimed accesses answered here, counted per (bus, kind, address) for
 * kvmpy's "unhandled" report: an open-address table shared by the vCPUs.
 * key = KVMSHIM_MISS_TAG | address << 2 | is_mmio << 1 | is_write.  When it is
 * full, further new addresses go to Python, which counts them itself.
 */
#define KVMSHIM_MISS_SLOTS 1024
#define KVMSHIM_MISS_TAG ((uint64_t)1 << 63)

struct kvmshim_miss {
	uint64_t key;		/* 0: unused */
	uint64_t count;
};

/*
 * The windows of one machine, shared by its vCPUs.  Python rewrites them in
 * place while vCPUs run (a PCI BAR moving), under a sequence lock: sequence is
 * odd while it writes, and a vCPU that sees it odd or changed leaves the exit
 * to Python.  The arrays have fixed room (capacity) and are never freed while
 * a vCPU may use them; each is sorted by base, without overlaps.
 */
struct kvmshim_windows {
	uint32_t sequence;
	uint32_t capacity;
	uint32_t port_count;
	uint32_t mmio_count;
	struct kvmshim_window *ports;
	struct kvmshim_window *mmio;
	struct kvmshim_miss *misses;	/* KVMSHIM_MISS_SLOTS rows */
};

/* What kvmshim_run needs, in one struct so Python passes a single pointer. */
struct kvmshim_vcpu {
	int fd;			/* the vCPU file descriptor */
	void *run;		/* its mmap'ed struct kvm_run */
	struct kvmshim_exit exit;	/* the last exit, decoded */

	/* KVMSHIM_STATS_SLOTS rows to count exits in, or NULL (the default). */
	struct kvmshim_stat *stats;
	struct kvmshim_stat *last;	/* the row of the exit being handled */
	uint64_t returned_ns;		/* when KVM_RUN last returned */

	/* The windows to answer in the shim, or NULL: every exit goes to Python. */
	struct kvmshim_windows *windows;
};

/*
 * KVM_RUN on vcpu->fd, then decode vcpu->run into vcpu->exit; an exit that
 * vcpu->windows answers is answered here and KVM_RUN runs again.  Returns the
 * first exit kind (KVMSHIM_EXIT_*) left to Python, or -errno (-EINTR when
 * kicked).  Called without the GIL.
 */
int kvmshim_run(struct kvmshim_vcpu *vcpu);

/* Set kvm_run.immediate_exit; safe from any thread. */
void kvmshim_set_immediate_exit(void *run, int value);

/*
 * Install a do-nothing handler for signo (without SA_RESTART), so that
 * sending it to a vCPU thread makes a blocking KVM_RUN return -EINTR.
 * Returns 0 or -errno.
 */
int kvmshim_install_kick_handler(int signo);

/*
 * The CPU's own lock cmpxchg8b (size 8) or lock cmpxchg16b (size 16, at a
 * 16-byte aligned address) on guest RAM's host mapping, so an instruction
 * kvmpy completes is atomic against every vCPU.  value[0..1] holds the
 * expected value (low, high) and receives the value found; replacement[0..1]
 * the new one.  Returns 1 if exchanged, 0 if not, -EINVAL for a bad size or
 * alignment.
 */
int kvmshim_compare_exchange(void *address, int size, uint64_t *value,
			     const uint64_t *replacement);

#endif

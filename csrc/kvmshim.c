#include "kvmshim.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

long kvmshim_ioctl(int fd, unsigned long request, void *arg)
{
	long ret = ioctl(fd, request, arg);
	return ret < 0 ? -errno : ret;
}

long kvmshim_ioctl_value(int fd, unsigned long request, unsigned long value)
{
	long ret = ioctl(fd, request, value);
	return ret < 0 ? -errno : ret;
}

static uint64_t load_le(const uint8_t *p, unsigned int n)
{
	uint64_t v = 0;

	if (n > 8)
		n = 8;
	while (n--)
		v = (v << 8) | p[n];
	return v;
}

static int decode_exit(struct kvm_run *run, struct kvmshim_exit *out)
{
	uint32_t n;

	out->reason = run->exit_reason;
	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		out->io_direction = run->io.direction;
		out->io_size = run->io.size;
		out->io_port = run->io.port;
		out->io_count = run->io.count;
		out->data_offset = (uint32_t)run->io.data_offset;
		out->value = load_le((uint8_t *)run + run->io.data_offset, run->io.size);
		if (run->io.count != 1)
			return KVMSHIM_EXIT_PORT_STRING;
		return run->io.direction == KVM_EXIT_IO_OUT ? KVMSHIM_EXIT_PORT_OUT
							    : KVMSHIM_EXIT_PORT_IN;
	case KVM_EXIT_MMIO:
		out->mmio_addr = run->mmio.phys_addr;
		out->mmio_len = run->mmio.len;
		out->mmio_is_write = run->mmio.is_write;
		out->data_offset = (uint32_t)((uint8_t *)run->mmio.data - (uint8_t *)run);
		out->value = load_le(run->mmio.data, run->mmio.len);
		return KVMSHIM_EXIT_MMIO;
	case KVM_EXIT_INTERNAL_ERROR:
		out->suberror = run->internal.suberror;
		n = run->internal.ndata;
		out->ndata = n > 16 ? 16 : n;
		memcpy(out->data, run->internal.data, sizeof(out->data));
		return KVMSHIM_EXIT_INTERNAL_ERROR;
	case KVM_EXIT_SYSTEM_EVENT:
		out->suberror = run->system_event.type;
		n = run->system_event.ndata;
		out->ndata = n > 16 ? 16 : n;
		memcpy(out->data, run->system_event.data, sizeof(out->data));
		return KVMSHIM_EXIT_SYSTEM_EVENT;
	case KVM_EXIT_FAIL_ENTRY:
		out->hardware_reason = run->fail_entry.hardware_entry_failure_reason;
		out->cpu = run->fail_entry.cpu;
		return KVMSHIM_EXIT_FAIL_ENTRY;
	case KVM_EXIT_UNKNOWN:
		out->hardware_reason = run->hw.hardware_exit_reason;
		return KVMSHIM_EXIT_OTHER;
	case KVM_EXIT_DEBUG:
		out->debug_exception = run->debug.arch.exception;
		out->debug_pc = run->debug.arch.pc;
		out->debug_dr6 = run->debug.arch.dr6;
		out->debug_dr7 = run->debug.arch.dr7;
		return KVMSHIM_EXIT_DEBUG;
	case KVM_EXIT_HLT:
		return KVMSHIM_EXIT_HLT;
	case KVM_EXIT_SHUTDOWN:
		return KVMSHIM_EXIT_SHUTDOWN;
	case KVM_EXIT_INTR:
	case KVM_EXIT_IRQ_WINDOW_OPEN:
		return KVMSHIM_EXIT_SPURIOUS;
	}
	return KVMSHIM_EXIT_OTHER;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The row for key: found or claimed by linear probing; the last slot is the overflow. */
static struct kvmshim_stat *stat_row(struct kvmshim_stat *stats, uint64_t key)
{
	const uint32_t slots = KVMSHIM_STATS_SLOTS - 1;
	uint32_t slot = (uint32_t)((key * 0x9e3779b97f4a7c15ull) >> 32) % slots;
	uint32_t tries;

	for (tries = 0; tries < slots; tries++) {
		struct kvmshim_stat *row = &stats[slot];

		if (row->key == key)
			return row;
		if (row->key == 0) {
			row->key = key;
			return row;
		}
		slot = (slot + 1) % slots;
	}
	stats[slots].key = KVMSHIM_STATS_OVERFLOW;
	return &stats[slots];
}

static uint64_t stat_key(int reason, const struct kvmshim_exit *e)
{
	uint64_t where = 0;

	if (reason == KVMSHIM_EXIT_PORT_OUT || reason == KVMSHIM_EXIT_PORT_IN)
		where = e->io_port;
	else if (reason == KVMSHIM_EXIT_MMIO)
		where = e->mmio_addr >> 12;
	else if (reason == KVMSHIM_EXIT_OTHER)
		where = e->reason;
	return (uint64_t)reason << 40 | where;
}

/* The window holding address in a sorted array of count, or NULL. */
static const struct kvmshim_window *find_window(const struct kvmshim_window *window,
						uint32_t count, uint64_t address)
{
	uint32_t low = 0, high = count;

	while (low < high) {
		uint32_t middle = low + (high - low) / 2;

		if (address < window[middle].base)
			high = middle;
		else if (address - window[middle].base >= window[middle].length)
			low = middle + 1;
		else
			return &window[middle];
	}
	return NULL;
}

/* Count one unclaimed access; 0 when the table has no room for a new address. */
static int count_miss(struct kvmshim_miss *misses, uint64_t key)
{
	const uint32_t slots = KVMSHIM_MISS_SLOTS;
	uint32_t slot = (uint32_t)((key * 0x9e3779b97f4a7c15ull) >> 32) % slots;
	uint32_t tries;

	for (tries = 0; tries < slots; tries++) {
		struct kvmshim_miss *row = &misses[slot];
		uint64_t found = __atomic_load_n(&row->key, __ATOMIC_ACQUIRE);

		if (found == 0) {
			/* Claim the free row; another vCPU may claim it first. */
			__atomic_compare_exchange_n(&row->key, &found, key, 0, __ATOMIC_ACQ_REL,
						    __ATOMIC_ACQUIRE);
			if (found == 0)
				found = key;
		}
		if (found == key) {
			__atomic_fetch_add(&row->count, 1, __ATOMIC_RELAXED);
			return 1;
		}
		slot = (slot + 1) % slots;
	}
	return 0;
}

/* Answer a port or MMIO exit from vcpu->windows: 1 if answered, 0 to leave it to Python. */
static int answer(struct kvmshim_vcpu *vcpu, int reason)
{
	struct kvmshim_windows *tables = vcpu->windows;
	const struct kvmshim_exit *e = &vcpu->exit;
	const struct kvmshim_window *found;
	uint64_t address, base, length, offset, i;
	uint32_t sequence, count;
	uint8_t *data, *memory;
	int is_mmio, is_write;
	unsigned int size;

	if (reason == KVMSHIM_EXIT_PORT_IN || reason == KVMSHIM_EXIT_PORT_OUT) {
		is_mmio = 0;
		is_write = reason == KVMSHIM_EXIT_PORT_OUT;
		address = e->io_port;
		size = e->io_size;
	} else if (reason == KVMSHIM_EXIT_MMIO) {
		is_mmio = 1;
		is_write = e->mmio_is_write;
		address = e->mmio_addr;
		size = e->mmio_len;
	} else {
		return 0;
	}
	if (size < 1 || size > 8)
		return 0;
	data = (uint8_t *)vcpu->run + e->data_offset;

	sequence = __atomic_load_n(&tables->sequence, __ATOMIC_ACQUIRE);
	if (sequence & 1)
		return 0;	/* Python is rewriting the windows */
	count = is_mmio ? tables->mmio_count : tables->port_count;
	if (count > tables->capacity)
		return 0;
	found = find_window(is_mmio ? tables->mmio : tables->ports, count, address);
	if (!found)
		return 0;
	base = found->base;
	length = found->length;
	memory = found->memory;
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (__atomic_load_n(&tables->sequence, __ATOMIC_RELAXED) != sequence)
		return 0;	/* rewritten while we looked */

	offset = address - base;
	if (is_mmio && size > length - offset)
		return 0;	/* runs past the window: the bus decides */
	if (!memory) {
		if (!count_miss(tables->misses,
				KVMSHIM_MISS_TAG | address << 2 | (uint64_t)is_mmio << 1 | is_write))
			return 0;
		if (!is_write)
			memset(data, 0xff, size);
		return 1;
	}
	for (i = 0; i < size; i++) {
		if (is_write) {
			if (offset + i < length)
				memory[offset + i] = data[i];
		} else {
			data[i] = offset + i < length ? memory[offset + i] : 0;
		}
	}
	return 1;
}

int kvmshim_run(struct kvmshim_vcpu *vcpu)
{
	for (;;) {
		uint64_t entered = 0;
		int reason, answered;

		if (vcpu->stats) {
			entered = now_ns();
			if (vcpu->last)
				vcpu->last->handler_ns += entered - vcpu->returned_ns;
			vcpu->last = NULL;
		}
		reason = ioctl(vcpu->fd, KVM_RUN, 0) < 0 ? -errno : 0;
		if (reason == 0)
			reason = decode_exit(vcpu->run, &vcpu->exit);
		if (vcpu->stats)
			vcpu->returned_ns = now_ns();
		answered = reason > 0 && vcpu->windows && answer(vcpu, reason);
		if (vcpu->stats && reason > 0) {
			uint64_t key = stat_key(reason, &vcpu->exit);

			vcpu->last = stat_row(vcpu->stats, answered ? key | KVMSHIM_STAT_ANSWERED : key);
			vcpu->last->count++;
			vcpu->last->run_ns += vcpu->returned_ns - entered;
		}
		if (!answered)
			return reason;
	}
}

void kvmshim_set_immediate_exit(void *run, int value)
{
	__atomic_store_n(&((struct kvm_run *)run)->immediate_exit, (uint8_t)value,
			 __ATOMIC_SEQ_CST);
}

static void kick_handler(int signo)
{
	(void)signo;
}

int kvmshim_install_kick_handler(int signo)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

/*
 * rdpru on the host CPU, for completing a guest's (the caller has checked the
 * CPU has it): returns EDX:EAX and stores RFLAGS.  The stack pointer steps
 * over the red zone before pushfq, which the compiler may be using, with lea,
 * which leaves the flags as rdpru set them.
 */
uint64_t kvmshim_rdpru(uint32_t ecx, uint64_t *rflags)
{
	uint32_t low, high;
	uint64_t flags;

	__asm__ __volatile__(".byte 0x0f, 0x01, 0xfd\n\t" /* rdpru */
			     "lea -128(%%rsp), %%rsp\n\tpushfq\n\tpopq %2\n\tlea 128(%%rsp), %%rsp"
			     : "=a"(low), "=d"(high), "=r"(flags)
			     : "c"(ecx)
			     : "cc");
	*rflags = flags;
	return (uint64_t)high << 32 | low;
}

int kvmshim_compare_exchange(void *address, int size, uint64_t *value,
			     const uint64_t *replacement)
{
	unsigned char exchanged;

	if (size == 8) {
		uint64_t old = value[0];

		exchanged = __atomic_compare_exchange_n((uint64_t *)address, &old, replacement[0],
							0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
		value[0] = old;
		return exchanged;
	}
	if (size != 16 || (uintptr_t)address % 16)
		return -EINVAL;
	/* Inline, not through libatomic (which may take a lock instead). */
	__asm__ __volatile__("lock cmpxchg16b %1"
			     : "=@ccz"(exchanged), "+m"(*(volatile uint64_t(*)[2])address),
			       "+a"(value[0]), "+d"(value[1])
			     : "b"(replacement[0]), "c"(replacement[1])
			     : "memory");
	return exchanged;
}

"""cffi API-mode build of the C shim (run by setuptools through ``cffi_modules``).

Struct layouts and every constant, ioctl numbers included, come from
``<linux/kvm.h>`` through the C compiler: the ``...`` placeholders below ask
cffi to take sizes, offsets and values from the real header.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[3]
CSRC = ROOT / "csrc"

IOCTLS = """
    KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
    KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
    KVM_SET_USER_MEMORY_REGION KVM_CREATE_VCPU KVM_SET_TSS_ADDR
    KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_IRQ_LINE KVM_CREATE_PIT2
    KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
    KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_TRANSLATE
    KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_SET_GUEST_DEBUG KVM_GET_DIRTY_LOG
    KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_LAPIC KVM_SET_LAPIC
    KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
    KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK
    KVM_SET_GSI_ROUTING
""".split()

EXIT_REASONS = """
    UNKNOWN EXCEPTION IO HYPERCALL DEBUG HLT MMIO IRQ_WINDOW_OPEN SHUTDOWN
    FAIL_ENTRY INTR SET_TPR TPR_ACCESS NMI INTERNAL_ERROR WATCHDOG SYSTEM_EVENT
    IOAPIC_EOI HYPERV X86_RDMSR X86_WRMSR DIRTY_RING_FULL AP_RESET_HOLD
    X86_BUS_LOCK XEN NOTIFY
""".split()

OTHER_CONSTANTS = """
    KVM_API_VERSION KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
    KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX
    KVM_INTERNAL_ERROR_DELIVERY_EV KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
    KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
    KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
    KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP KVM_GUESTDBG_USE_SW_BP
    KVM_GUESTDBG_USE_HW_BP
    KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
    KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY KVM_PIT_SPEAKER_DUMMY KVM_IRQ_ROUTING_IRQCHIP
    MAP_NORESERVE
""".split()

CAPABILITIES = """
    IRQCHIP HLT USER_MEMORY SET_TSS_ADDR EXT_CPUID NR_VCPUS MAX_VCPUS
    NR_MEMSLOTS PIT2 IMMEDIATE_EXIT SET_GUEST_DEBUG SET_IDENTITY_MAP_ADDR
    MP_STATE XSAVE XCRS DEBUGREGS TSC_DEADLINE_TIMER INTERNAL_ERROR_DATA
    ADJUST_CLOCK SYNC_MMU X86_ROBUST_SINGLESTEP IRQ_ROUTING KVMCLOCK_CTRL
    READONLY_MEM
""".split()

TYPES = """
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;
typedef int... __s32;

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
    ...;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable;
    ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr;
    ...;
};
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; ...; };
struct kvm_msr_list { __u32 nmsrs; ...; };
struct kvm_cpuid_entry2 {
    __u32 function, index, flags, eax, ebx, ecx, edx;
    ...;
};
struct kvm_cpuid2 { __u32 nent; ...; };
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr;
    ...;
};
/* dirty_bitmap sits in an anonymous union in <linux/kvm.h>; C still names it directly. */
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address;
    __u8 valid; __u8 writeable; __u8 usermode;
    ...;
};
struct kvm_mp_state { __u32 mp_state; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; ...; };
/* State saved and restored whole, as opaque bytes (kvmpy/snapshot.py). */
struct kvm_xsave { ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_lapic_state { ...; };
/* The fields kvmpy changes to inject an event (kvmpy/x86/complete.py). */
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; }
        exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    __u32 flags;
    ...;
};
struct kvm_debugregs { ...; };
struct kvm_irqchip { __u32 chip_id; ...; };
struct kvm_pit_state2 { ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; ...; };
/* GSI routing: only the irqchip kind of entry is used.  The union's other
   members are never touched, and pad[8] gives it its full size. */
struct kvm_irq_routing_irqchip { uint32_t irqchip; uint32_t pin; };
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags;
    union { struct kvm_irq_routing_irqchip irqchip; uint32_t pad[8]; } u;
    ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; ...; };
struct kvm_guest_debug {
    __u32 control; struct kvm_guest_debug_arch arch;
    ...;
};
"""

SHIM_API = """
struct kvmshim_exit {
    uint32_t reason;
    uint8_t io_direction; uint8_t io_size; uint16_t io_port; uint32_t io_count;
    uint8_t mmio_is_write; uint32_t mmio_len; uint64_t mmio_addr;
    uint64_t value; uint32_t data_offset;
    uint32_t suberror; uint32_t ndata; uint64_t data[16];
    uint64_t hardware_reason; uint32_t cpu;
    uint32_t debug_exception; uint64_t debug_pc; uint64_t debug_dr6;
    uint64_t debug_dr7;
};
long kvmshim_ioctl(int fd, unsigned long request, void *arg);
long kvmshim_ioctl_value(int fd, unsigned long request, unsigned long value);
#define KVMSHIM_EXIT_PORT_OUT ...
#define KVMSHIM_EXIT_PORT_IN ...
#define KVMSHIM_EXIT_PORT_STRING ...
#define KVMSHIM_EXIT_MMIO ...
#define KVMSHIM_EXIT_HLT ...
#define KVMSHIM_EXIT_SHUTDOWN ...
#define KVMSHIM_EXIT_INTERNAL_ERROR ...
#define KVMSHIM_EXIT_FAIL_ENTRY ...
#define KVMSHIM_EXIT_SYSTEM_EVENT ...
#define KVMSHIM_EXIT_DEBUG ...
#define KVMSHIM_EXIT_SPURIOUS ...
#define KVMSHIM_EXIT_OTHER ...
#define KVMSHIM_STATS_SLOTS ...
#define KVMSHIM_STAT_ANSWERED ...
struct kvmshim_stat { uint64_t key; uint64_t count; uint64_t run_ns; uint64_t handler_ns; };
struct kvmshim_window { uint64_t base; uint64_t length; uint8_t *memory; };
#define KVMSHIM_MISS_SLOTS ...
#define KVMSHIM_MISS_TAG ...
struct kvmshim_miss { uint64_t key; uint64_t count; };
struct kvmshim_windows {
    uint32_t sequence; uint32_t capacity; uint32_t port_count; uint32_t mmio_count;
    struct kvmshim_window *ports; struct kvmshim_window *mmio; struct kvmshim_miss *misses;
};
struct kvmshim_vcpu {
    int fd; void *run; struct kvmshim_exit exit;
    struct kvmshim_stat *stats; struct kvmshim_stat *last; uint64_t returned_ns;
    struct kvmshim_windows *windows;
};
int kvmshim_run(struct kvmshim_vcpu *vcpu);
void kvmshim_set_immediate_exit(void *run, int value);
int kvmshim_install_kick_handler(int signo);
uint64_t kvmshim_rdpru(uint32_t ecx, uint64_t *rflags);
int kvmshim_compare_exchange(void *address, int size, uint64_t *value,
                             const uint64_t *replacement);
"""


def _defines(names: list[str]) -> str:
    return "".join(f"#define {name} ...\n" for name in names)


ffibuilder = FFI()
ffibuilder.cdef(
    TYPES
    + SHIM_API
    + _defines(IOCTLS)
    + _defines([f"KVM_EXIT_{reason}" for reason in EXIT_REASONS])
    + _defines(OTHER_CONSTANTS)
    + _defines([f"KVM_CAP_{cap}" for cap in CAPABILITIES])
)
ffibuilder.set_source(
    "kvmpy.backends.kvm._kvm",
    '#include "kvmshim.h"',
    sources=[str((CSRC / "kvmshim.c").relative_to(ROOT))],
    include_dirs=[str(CSRC.relative_to(ROOT))],
    extra_compile_args=["-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

/*
 * toykernel.h: constants shared by boot.S and the C files, and the C
 * declarations that tie the files together.
 */
#ifndef TOYKERNEL_H
#define TOYKERNEL_H

/* Page-table entry bits (Intel SDM vol. 3, 4.5). */
#define PTE_PRESENT     0x001
#define PTE_WRITE       0x002
#define PTE_HUGE        0x080   /* in a page directory: a 2 MiB page */

#define CR0_PE          0x00000001  /* protected mode */
#define CR0_PG          0x80000000  /* paging */
#define CR4_PAE         0x00000020
#define MSR_EFER        0xC0000080
#define EFER_LME        0x00000100  /* long mode enable */

/* GDT selectors (the GDT itself is in boot.S). */
#define GDT_CODE64      0x08
#define GDT_DATA        0x10

/* The AP starts in real mode at physical (SIPI vector << 12). */
#define AP_TRAMPOLINE   0x8000
#define AP_SIPI_VECTOR  (AP_TRAMPOLINE >> 12)

/* QEMU's isa-debug-exit (kvmpy has the same device): the VM ends with
   process status (code << 1) | 1. */
#define DEBUG_EXIT_PORT 0xf4

/* Exit codes: 0 means every check passed. */
#define EXIT_OK             0
#define EXIT_BAD_MAGIC      1
#define EXIT_NO_LONG_MODE   2
#define EXIT_EXCEPTION      3
#define EXIT_TESTDEV        4

#ifndef __ASSEMBLER__

#include <stdarg.h>     /* freestanding headers: no libc needed */
#include <stdint.h>

/* Port I/O.  Each of these is one VM exit under a hypervisor. */
static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}
static inline void outw(uint16_t port, uint16_t value)
{
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}
static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}
static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

/* MMIO: `volatile` so the compiler emits exactly one access per call. */
static inline uint32_t mmio_read32(uintptr_t address)
{
    return *(volatile uint32_t *)address;
}
static inline void mmio_write32(uintptr_t address, uint32_t value)
{
    *(volatile uint32_t *)address = value;
}

/* kernel.c */
void kprintf(const char *format, ...);
void exit_vm(uint32_t code) __attribute__((noreturn));
void load_idt(void);
void *memcpy(void *dest, const void *src, unsigned long n);
void *memset(void *dest, int c, unsigned long n);

/* lapic.c */
#define LAPIC_BASE          0xFEE00000
#define TIMER_VECTOR        0x20
#define SPURIOUS_VECTOR     0xFF
void lapic_init(void);
void lapic_eoi(void);
uint32_t lapic_id(void);
void lapic_delay_us(uint32_t microseconds);
void lapic_timer_start(uint32_t initial_count);
void lapic_timer_stop(void);
void lapic_send_ipi(uint32_t apic_id, uint32_t command);

/* smp.c */
void smp_start_ap(void);
void ap_main(void);
extern volatile uint64_t ap_stack_top;

#endif /* __ASSEMBLER__ */
#endif /* TOYKERNEL_H */

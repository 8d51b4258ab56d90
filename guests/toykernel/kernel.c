/*
 * kernel.c: toykernel's main line, plus the small services everything
 * else uses: the serial console, kprintf, the IDT and interrupt dispatch.
 *
 * boot.S has switched to 64-bit long mode with the first 4 GiB identity
 * mapped (virtual address == physical address), so C can touch any
 * physical address, MMIO included, through a plain pointer.
 *
 * A note on speed: under a hypervisor every port access and every MMIO
 * access is a VM exit, and on some hosts (kvmpy's PVM host) all kernel-mode
 * code is emulated.  So the kernel does each check once and moves on.
 */

#include "toykernel.h"

/* ------------------------------------------------------------------------ */
/* Serial console: COM1, a 16550 UART, polled (no interrupts).              */
/* ------------------------------------------------------------------------ */

#define COM1        0x3f8
#define UART_THR    0       /* transmit holding register (write) */
#define UART_IER    1       /* interrupt enable */
#define UART_FCR    2       /* FIFO control */
#define UART_LCR    3       /* line control */
#define UART_LSR    5       /* line status */
#define UART_DLL    0       /* divisor latch, low byte (when LCR.DLAB = 1) */
#define UART_DLM    1       /* divisor latch, high byte */
#define LCR_DLAB    0x80
#define LCR_8N1     0x03
#define LSR_THRE    0x20    /* "transmit holding register empty" */

static void serial_init(void)
{
    outb(COM1 + UART_IER, 0);           /* we poll: no UART interrupts */
    outb(COM1 + UART_LCR, LCR_DLAB);    /* expose the divisor latch */
    outb(COM1 + UART_DLL, 1);           /* divisor 1 = 115200 baud */
    outb(COM1 + UART_DLM, 0);
    outb(COM1 + UART_LCR, LCR_8N1);     /* 8 data bits, no parity, 1 stop */
    outb(COM1 + UART_FCR, 0x07);        /* enable and clear the FIFOs */
}

static void serial_putc(char c)
{
    /* Wait until the UART can take a byte; a virtual UART is always ready,
       real hardware is not. */
    while (!(inb(COM1 + UART_LSR) & LSR_THRE))
        ;
    outb(COM1 + UART_THR, (uint8_t)c);
}

/* ------------------------------------------------------------------------ */
/* kprintf: %s %c %u %d %x and %%, nothing else.  Enough for a boot log.    */
/* ------------------------------------------------------------------------ */

/* Two CPUs print, so one lock keeps their lines from interleaving.
   __atomic_test_and_set compiles to an `xchg`, which is atomic on x86. */
static volatile char console_lock;

static void put_number(uint64_t value, unsigned base)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[value % base];
        value /= base;
    } while (value);
    while (n)
        serial_putc(digits[--n]);
}

void kprintf(const char *format, ...)
{
    va_list args;
    va_start(args, format);
    while (__atomic_test_and_set(&console_lock, __ATOMIC_ACQUIRE))
        ;   /* the other CPU is printing: spin */
    for (const char *p = format; *p; p++) {
        if (*p != '%') {
            if (*p == '\n')
                serial_putc('\r');      /* terminals want CR LF */
            serial_putc(*p);
            continue;
        }
        switch (*++p) {
        case 's': {
            const char *s = va_arg(args, const char *);
            while (*s)
                serial_putc(*s++);
            break;
        }
        case 'c':
            serial_putc((char)va_arg(args, int));
            break;
        case 'u':
            put_number(va_arg(args, unsigned), 10);
            break;
        case 'd': {
            int v = va_arg(args, int);
            if (v < 0) {
                serial_putc('-');
                put_number(-(int64_t)v, 10);
            } else {
                put_number((uint64_t)v, 10);
            }
            break;
        }
        case 'x':
            put_number(va_arg(args, unsigned), 16);
            break;
        case '\0':
            p--;    /* a lone '%' at the end: stop */
            break;
        default:
            serial_putc(*p);    /* "%%" and anything unknown */
            break;
        }
    }
    __atomic_clear(&console_lock, __ATOMIC_RELEASE);
    va_end(args);
}

/* ------------------------------------------------------------------------ */
/* Leaving: QEMU's isa-debug-exit device (and kvmpy's) ends the VM.         */
/* ------------------------------------------------------------------------ */

void exit_vm(uint32_t code)
{
    outl(DEBUG_EXIT_PORT, code);
    /* Still here: no debug-exit device.  Stop this CPU for good. */
    kprintf("toykernel: no debug-exit device at port 0x%x, halting\n", DEBUG_EXIT_PORT);
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* The compiler may call these even in a freestanding program (struct
   copies, the trampoline copy in smp.c). */
void *memcpy(void *dest, const void *src, unsigned long n)
{
    unsigned char *d = dest;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dest;
}

void *memset(void *dest, int c, unsigned long n)
{
    unsigned char *d = dest;
    while (n--)
        *d++ = (unsigned char)c;
    return dest;
}

/* ------------------------------------------------------------------------ */
/* IDT: 256 interrupt gates, all pointing at the stubs in boot.S.           */
/* ------------------------------------------------------------------------ */

struct idt_gate {               /* a 64-bit IDT entry (SDM vol. 3, 6.14.1) */
    uint16_t offset_low;
    uint16_t selector;          /* code segment to run the handler in */
    uint8_t ist;                /* 0: stay on the current stack */
    uint8_t type_attr;          /* 0x8E: present, DPL 0, interrupt gate */
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

struct idt_pointer {            /* the operand of lidt */
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

/* What isr_common in boot.S leaves on the stack, lowest address first. */
struct interrupt_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rdi, rsi, rbp, rbx, rdx, rcx, rax;
    uint64_t vector, error_code;            /* pushed by the stub */
    uint64_t rip, cs, rflags, rsp, ss;      /* pushed by the CPU */
};

extern char isr_stubs[];                    /* boot.S: 256 stubs, 16 bytes each */
static struct idt_gate idt[256];

/* Fill the IDT once (BSP); load_idt() points a CPU's IDTR at it. */
static void idt_init(void)
{
    for (int vector = 0; vector < 256; vector++) {
        uint64_t handler = (uint64_t)(isr_stubs + 16 * vector);
        idt[vector] = (struct idt_gate){
            .offset_low = (uint16_t)handler,
            .selector = GDT_CODE64,
            .ist = 0,
            /* An interrupt gate (not a trap gate) clears IF on entry, so
               handlers never nest. */
            .type_attr = 0x8E,
            .offset_mid = (uint16_t)(handler >> 16),
            .offset_high = (uint32_t)(handler >> 32),
        };
    }
}

void load_idt(void)
{
    struct idt_pointer pointer = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(pointer));
}

static volatile uint32_t timer_ticks;

/* Called by isr_common for every interrupt and exception. */
void interrupt_handler(struct interrupt_frame *frame)
{
    if (frame->vector == TIMER_VECTOR) {
        timer_ticks++;
        lapic_eoi();        /* tell the LAPIC we are done, or no more ticks */
        return;
    }
    if (frame->vector == SPURIOUS_VECTOR)
        return;             /* spurious interrupts must NOT be EOI'd */
    if (frame->vector < 32) {
        /* A CPU exception: a bug in the kernel.  Report and stop.  The
           console lock may be held by the code that faulted; drop it. */
        __atomic_clear(&console_lock, __ATOMIC_RELEASE);
        kprintf("toykernel: exception %u, error code 0x%x, at rip 0x%x\n",
                (unsigned)frame->vector, (unsigned)frame->error_code, (unsigned)frame->rip);
        exit_vm(EXIT_EXCEPTION);
    }
    kprintf("toykernel: unexpected interrupt, vector 0x%x\n", (unsigned)frame->vector);
    lapic_eoi();
}

/* ------------------------------------------------------------------------ */
/* The legacy 8259 PICs.  The firmware (SeaBIOS under QEMU) leaves the      */
/* timer IRQ unmasked and mapped onto vector 8, which would look like a     */
/* double fault once we `sti`.  We use the LAPIC instead, so mask them all. */
/* ------------------------------------------------------------------------ */

static void pic_disable(void)
{
    outb(0x21, 0xFF);   /* master PIC: mask IRQ 0-7 */
    outb(0xA1, 0xFF);   /* slave PIC: mask IRQ 8-15 */
}

/* ------------------------------------------------------------------------ */
/* Multiboot v1 information (only the fields we read).                      */
/* ------------------------------------------------------------------------ */

#define MULTIBOOT_BOOTLOADER_MAGIC  0x2BADB002
#define MBI_FLAG_MEMORY             (1 << 0)   /* mem_lower, mem_upper valid */
#define MBI_FLAG_CMDLINE            (1 << 2)   /* cmdline valid */

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower;         /* KiB of memory below 1 MiB */
    uint32_t mem_upper;         /* KiB of memory from 1 MiB up to the first hole */
    uint32_t boot_device;
    uint32_t cmdline;           /* physical address of a NUL-terminated string */
};

static void show_multiboot(uint32_t magic, uint32_t info_address)
{
    if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
        /* Not loaded by a Multiboot loader: EBX means nothing, stop here. */
        kprintf("multiboot: bad magic 0x%x (want 0x%x)\n", magic, MULTIBOOT_BOOTLOADER_MAGIC);
        exit_vm(EXIT_BAD_MAGIC);
    }
    const struct multiboot_info *info = (const void *)(uintptr_t)info_address;
    kprintf("multiboot: magic ok, info at 0x%x, flags 0x%x\n", info_address, info->flags);
    if (info->flags & MBI_FLAG_CMDLINE)
        kprintf("multiboot: cmdline \"%s\"\n",
                (const char *)(uintptr_t)info->cmdline);
    else
        kprintf("multiboot: no cmdline\n");
    if (info->flags & MBI_FLAG_MEMORY)
        kprintf("multiboot: mem_lower %u KiB, mem_upper %u KiB\n",
                info->mem_lower, info->mem_upper);
    else
        kprintf("multiboot: no memory info\n");
}

/* ------------------------------------------------------------------------ */
/* kvmpy's MMIO test device (kvmpy/devices/testdev.py).                     */
/* ------------------------------------------------------------------------ */

#define TESTDEV_BASE        0xFEB00000
#define TESTDEV_ID          0x00    /* reads 0x504D564B, "KVMP" */
#define TESTDEV_SCRATCH     0x04    /* read/write */
#define TESTDEV_COUNTER     0x08    /* 0, 1, 2, ... one per read */
#define TESTDEV_DOORBELL    0x0C    /* the host records every write */
#define TESTDEV_ID_VALUE    0x504D564B

/* Returns 0 on success or when the device is absent, EXIT_TESTDEV on a
   device that answers wrongly. */
static uint32_t check_testdev(void)
{
    uint32_t id = mmio_read32(TESTDEV_BASE + TESTDEV_ID);
    if (id != TESTDEV_ID_VALUE) {
        /* Nothing there: QEMU reads unassigned MMIO as 0 or all-ones. */
        kprintf("testdev: no testdev (id reads 0x%x)\n", id);
        return 0;
    }
    const uint32_t pattern = 0xC0FFEE42;
    mmio_write32(TESTDEV_BASE + TESTDEV_SCRATCH, pattern);
    uint32_t scratch = mmio_read32(TESTDEV_BASE + TESTDEV_SCRATCH);
    uint32_t first = mmio_read32(TESTDEV_BASE + TESTDEV_COUNTER);
    uint32_t second = mmio_read32(TESTDEV_BASE + TESTDEV_COUNTER);
    int ok = scratch == pattern && second == first + 1;
    kprintf("testdev: id \"%c%c%c%c\", scratch wrote 0x%x read 0x%x, counter %u then %u: %s\n",
            id & 0xFF, (id >> 8) & 0xFF, (id >> 16) & 0xFF, id >> 24,
            pattern, scratch, first, second, ok ? "ok" : "MISMATCH");
    /* Ring the doorbell so the host side can see we got this far. */
    mmio_write32(TESTDEV_BASE + TESTDEV_DOORBELL, ok ? 1 : 0);
    return ok ? 0 : EXIT_TESTDEV;
}

/* ------------------------------------------------------------------------ */
/* kmain: called by boot.S on the bootstrap processor (BSP).                */
/* ------------------------------------------------------------------------ */

#define TIMER_TICKS         3
#define TIMER_COUNT         1000000     /* 1 ms per tick at QEMU/KVM's 1 GHz */

void kmain(uint32_t magic, uint32_t info_address)
{
    serial_init();
    kprintf("toykernel: hello from 64-bit long mode\n");
    show_multiboot(magic, info_address);

    idt_init();
    load_idt();
    pic_disable();
    lapic_init();
    kprintf("idt: 256 gates loaded; lapic: enabled, id %u\n", lapic_id());

    /* Take TIMER_TICKS timer interrupts.  Interrupts stay off except inside
       "sti; hlt": sti takes effect only after the next instruction, so the
       tick cannot slip in between the check and the hlt and be missed. */
    lapic_timer_start(TIMER_COUNT);
    while (timer_ticks < TIMER_TICKS)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    lapic_timer_stop();
    kprintf("lapic: timer ticked %u times\n", timer_ticks);

    smp_start_ap();

    uint32_t status = check_testdev();
    if (status != EXIT_OK) {
        kprintf("toykernel: a check failed (exit code %u)\n", status);
        exit_vm(status);
    }
    kprintf("toykernel: all checks passed\n");
    exit_vm(EXIT_OK);
}

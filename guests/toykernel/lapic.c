/*
 * lapic.c: the local APIC, each CPU's own interrupt controller.  We use it
 * for three things: the timer interrupt, a busy-wait delay (its counter is
 * the only clock we need), and inter-processor interrupts to start the AP.
 *
 * The LAPIC is memory-mapped at 0xFEE00000 (the reset value of the
 * IA32_APIC_BASE MSR); its registers are 32 bits wide, 16 bytes apart.
 */

#include "toykernel.h"

#define LAPIC_ID            0x020   /* bits 31-24: this CPU's APIC ID */
#define LAPIC_TPR           0x080   /* task priority: 0 accepts every vector */
#define LAPIC_EOI           0x0B0
#define LAPIC_SVR           0x0F0   /* spurious vector + software enable */
#define LAPIC_ICR_LOW       0x300   /* interrupt command: writing it sends */
#define LAPIC_ICR_HIGH      0x310   /* bits 31-24: destination APIC ID */
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_TIMER_INIT    0x380   /* initial count: writing starts the timer */
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE  0x3E0

#define SVR_ENABLE          0x100
#define LVT_MASKED          (1 << 16)
#define LVT_PERIODIC        (1 << 17)
#define ICR_DELIVERY_PENDING (1 << 12)
#define DIVIDE_BY_1         0xB

/*
 * How fast the timer counts is up to the platform.  QEMU and KVM both tick
 * the virtual LAPIC timer at 1 GHz (with divide-by-1), so 1000 counts are
 * one microsecond.  A kernel for real hardware would calibrate against the
 * PIT or the TSC instead.
 */
#define COUNTS_PER_US       1000

static uint32_t lapic_read(uint32_t reg)
{
    return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(LAPIC_BASE + reg, value);
}

void lapic_init(void)
{
    /* The firmware leaves the LAPIC enabled globally (IA32_APIC_BASE bit 11)
       but maybe software-disabled: setting SVR bit 8 turns it on.  Spurious
       interrupts (raised when an interrupt vanishes before delivery) go to
       SPURIOUS_VECTOR. */
    lapic_write(LAPIC_SVR, SVR_ENABLE | SPURIOUS_VECTOR);
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_TIMER_DIVIDE, DIVIDE_BY_1);
}

void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

uint32_t lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> 24;
}

/* Periodic timer: an interrupt on TIMER_VECTOR every `initial_count` counts. */
void lapic_timer_start(uint32_t initial_count)
{
    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INIT, initial_count);
}

void lapic_timer_stop(void)
{
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    lapic_write(LAPIC_TIMER_INIT, 0);   /* a zero count stops it */
}

/*
 * Busy-wait: run the timer once with its interrupt masked and watch the
 * current count fall to 0.  (Counting loop iterations would be no clock
 * at all: the speed of guest code varies ~1000x between hosts.)
 * Uses the timer, so not while lapic_timer_start() is running.
 */
void lapic_delay_us(uint32_t microseconds)
{
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);   /* one-shot, no interrupt */
    lapic_write(LAPIC_TIMER_INIT, microseconds * COUNTS_PER_US);
    while (lapic_read(LAPIC_TIMER_CURRENT) != 0)
        ;
}

/* Send an inter-processor interrupt.  `command` is the ICR low word:
   delivery mode, level, vector. */
void lapic_send_ipi(uint32_t apic_id, uint32_t command)
{
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, command);    /* this write sends it */
    while (lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING)
        ;
}

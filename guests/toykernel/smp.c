/*
 * smp.c: start a second CPU (an "application processor", AP).
 *
 * After reset only the bootstrap processor (BSP) runs; the others wait for
 * an INIT IPI followed by a STARTUP IPI (SIPI), which starts them in
 * 16-bit real mode at physical address (SIPI vector << 12).  The classic
 * sequence, from the Intel MultiProcessor spec, is
 * INIT, wait 10 ms, SIPI, wait 200 us, SIPI.
 *
 * The AP runs the trampoline from boot.S (copied to AP_TRAMPOLINE), which
 * switches it to long mode and calls ap_main() below.
 */

#include "toykernel.h"

/* ------------------------------------------------------------------------ */
/* How many CPUs?  QEMU tells us through fw_cfg, its firmware config        */
/* interface: write a 16-bit item number to the selector port, then read    */
/* the item's bytes one at a time from the data port.  (A kernel for real   */
/* hardware would read the ACPI MADT instead.)                               */
/* ------------------------------------------------------------------------ */

#define FW_CFG_PORT_SELECTOR    0x510
#define FW_CFG_PORT_DATA        0x511
#define FW_CFG_SIGNATURE        0x0000  /* the 4 bytes "QEMU" */
#define FW_CFG_NB_CPUS          0x0005  /* 16-bit little-endian CPU count */

/* Returns the CPU count, or 0 if there is no fw_cfg device. */
static unsigned fw_cfg_cpu_count(void)
{
    outw(FW_CFG_PORT_SELECTOR, FW_CFG_SIGNATURE);
    for (const char *s = "QEMU"; *s; s++)
        if (inb(FW_CFG_PORT_DATA) != (uint8_t)*s)
            return 0;       /* absent ports read as 0xFF: no fw_cfg */
    outw(FW_CFG_PORT_SELECTOR, FW_CFG_NB_CPUS);
    unsigned low = inb(FW_CFG_PORT_DATA);
    unsigned high = inb(FW_CFG_PORT_DATA);
    return low | high << 8;
}

/* ------------------------------------------------------------------------ */
/* The BSP side.                                                             */
/* ------------------------------------------------------------------------ */

#define ICR_INIT            0x00004500  /* delivery mode INIT, level assert */
#define ICR_STARTUP         0x00004600  /* delivery mode STARTUP; | vector */
/* The one AP we start, however many CPUs there are: QEMU and kvmpy number
   the CPUs' APIC IDs 0, 1, ...  (A real kernel takes the IDs from the MADT.) */
#define AP_APIC_ID          1
#define AP_WAIT_MS          2000        /* give up on the AP after this long */

extern char ap_trampoline_start[], ap_trampoline_end[];   /* boot.S */

static uint8_t ap_stack[16384] __attribute__((aligned(16)));
volatile uint64_t ap_stack_top;             /* boot.S loads the AP's RSP from here */
static volatile int ap_online;              /* the AP sets it; the BSP waits for it */

void smp_start_ap(void)
{
    unsigned cpus = fw_cfg_cpu_count();
    if (cpus == 0) {
        kprintf("smp: no fw_cfg, assuming 1 cpu: no AP\n");
        return;
    }
    kprintf("smp: fw_cfg says %u cpu(s)\n", cpus);
    if (cpus < 2) {
        kprintf("smp: no AP to start\n");
        return;
    }

    /* The AP will run the trampoline from low memory, where real mode can
       reach it.  0x8000 is free once the multiboot info has been read. */
    memcpy((void *)AP_TRAMPOLINE, ap_trampoline_start,
           (unsigned long)(ap_trampoline_end - ap_trampoline_start));
    ap_stack_top = (uint64_t)(ap_stack + sizeof(ap_stack));

    kprintf("smp: starting cpu %u (INIT, SIPI, SIPI to vector 0x%x)\n",
            AP_APIC_ID, AP_SIPI_VECTOR);
    lapic_send_ipi(AP_APIC_ID, ICR_INIT);
    lapic_delay_us(10000);
    lapic_send_ipi(AP_APIC_ID, ICR_STARTUP | AP_SIPI_VECTOR);
    lapic_delay_us(200);
    /* A second SIPI, as the spec recommends; a CPU already running ignores it. */
    lapic_send_ipi(AP_APIC_ID, ICR_STARTUP | AP_SIPI_VECTOR);

    /* Bounded wait: with a missing or broken AP we report it and go on. */
    for (unsigned ms = 0; ms < AP_WAIT_MS && !ap_online; ms++)
        lapic_delay_us(1000);
    if (ap_online)
        kprintf("smp: cpu %u is up\n", AP_APIC_ID);
    else
        kprintf("smp: no AP (cpu %u did not answer within %u ms)\n", AP_APIC_ID, AP_WAIT_MS);
}

/* ------------------------------------------------------------------------ */
/* The AP side: boot.S's ap_long_mode_entry calls this on the AP's stack.   */
/* ------------------------------------------------------------------------ */

void ap_main(void)
{
    load_idt();     /* share the BSP's IDT, so an exception here is reported */
    kprintf("cpu %u: online\n", lapic_id());
    ap_online = 1;
    /* Returning halts this CPU (cli; hlt) for good. */
}

/*
 * boot.S: everything toykernel cannot write in C.
 *
 *   1. the Multiboot v1 header, so QEMU (-kernel), GRUB or kvmpy can load us;
 *   2. the 32-bit entry point: build page tables and switch to 64-bit long mode;
 *   3. the 64-bit entry that calls kmain();
 *   4. the interrupt stubs that the IDT points at;
 *   5. the AP trampoline: 16-bit real-mode code that a second CPU starts in.
 *
 * This file is run through the C preprocessor (hence the .S) and assembled
 * as a 64-bit object; the .code32 / .code16 directives tell the assembler
 * which instruction encoding each part needs.
 */

#include "toykernel.h"

/* ------------------------------------------------------------------------ */
/* 1. Multiboot v1 header: must sit, 4-byte aligned, in the first 8 KiB of   */
/*    the file.  The linker script puts .multiboot first.                    */
/* ------------------------------------------------------------------------ */

#define MB_MAGIC        0x1BADB002
#define MB_PAGE_ALIGN   (1 << 0)   /* load modules on 4 KiB boundaries */
#define MB_MEMORY_INFO  (1 << 1)   /* fill in mem_lower / mem_upper */
#define MB_FLAGS        (MB_PAGE_ALIGN | MB_MEMORY_INFO)

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)    /* checksum: the three fields sum to 0 */
    /* No flag 16 ("a.out kludge"): the loader reads the ELF program headers. */

/* ------------------------------------------------------------------------ */
/* 2. 32-bit entry.  The loader leaves us in protected mode, paging off,    */
/*    interrupts off, EAX = 0x2BADB002, EBX = physical address of the       */
/*    multiboot info.  There is no stack and GDTR may be garbage.           */
/* ------------------------------------------------------------------------ */

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    mov     $boot_stack_top, %esp
    /* Keep what the loader handed us; kmain() checks it later. */
    mov     %eax, multiboot_magic
    mov     %ebx, multiboot_info

    /* Does this CPU have long mode?  CPUID 0x80000001, EDX bit 29. */
    mov     $0x80000000, %eax
    cpuid
    cmp     $0x80000001, %eax
    jb      no_long_mode
    mov     $0x80000001, %eax
    cpuid
    bt      $29, %edx
    jnc     no_long_mode

    /*
     * Page tables: identity-map the first 4 GiB with 2 MiB pages, so that
     * virtual == physical everywhere, including the LAPIC (0xFEE00000) and
     * the test device (0xFEB00000).  One PML4 entry -> one PDPT with four
     * entries -> four page directories of 512 entries each = 2048 x 2 MiB.
     * The tables live in .bss, which the loader has zeroed.
     */
    movl    $(pdpt + PTE_PRESENT + PTE_WRITE), pml4
    mov     $pdpt, %edi
    mov     $(page_dirs + PTE_PRESENT + PTE_WRITE), %eax
    mov     $4, %ecx
1:  mov     %eax, (%edi)            /* PDPT[i] = page_dirs + i * 4 KiB */
    add     $8, %edi
    add     $4096, %eax
    loop    1b

    mov     $page_dirs, %edi
    mov     $(PTE_PRESENT + PTE_WRITE + PTE_HUGE), %eax
    mov     $2048, %ecx
1:  mov     %eax, (%edi)            /* PD entry i maps physical i * 2 MiB */
    add     $8, %edi
    add     $0x200000, %eax
    loop    1b

    /* The standard long-mode switch (Intel SDM vol. 3, "Initializing
       IA-32e Mode").  Until the far jump, DS and SS keep the loader's flat
       segments: a segment register only reads the GDT when loaded. */
    lgdt    gdt_ptr                 /* our GDT: the 64-bit code segment */
    mov     $pml4, %eax
    mov     %eax, %cr3
    mov     %cr4, %eax
    or      $CR4_PAE, %eax          /* long mode needs PAE-format tables */
    mov     %eax, %cr4
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax         /* ask for long mode ... */
    wrmsr
    mov     %cr0, %eax
    or      $(CR0_PG | CR0_PE), %eax /* ... which turns on with paging */
    mov     %eax, %cr0
    /* Now in compatibility mode; a far jump loads a 64-bit CS. */
    ljmp    $GDT_CODE64, $long_mode_entry

no_long_mode:
    /* Nothing to print with yet: just leave through debug-exit. */
    mov     $EXIT_NO_LONG_MODE, %eax
    mov     $DEBUG_EXIT_PORT, %dx
    out     %eax, %dx
1:  hlt
    jmp     1b

/* ------------------------------------------------------------------------ */
/* 3. 64-bit entries, one for the BSP and one for the AP: load the data     */
/*    segments and a stack, then call C.  The upper halves of registers are */
/*    undefined after the mode switch, so nothing is carried over in them.  */
/* ------------------------------------------------------------------------ */

    .code64
    .text
long_mode_entry:
    mov     $GDT_DATA, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %eax, %eax
    mov     %ax, %fs
    mov     %ax, %gs
    mov     $boot_stack_top, %rsp
    mov     multiboot_magic(%rip), %edi /* kmain(magic, info): SysV ABI args */
    mov     multiboot_info(%rip), %esi
    call    kmain
halt_forever:
    cli
    hlt
    jmp     halt_forever

/* The AP arrives here from the trampoline, already in 64-bit mode. */
    .globl ap_long_mode_entry
ap_long_mode_entry:
    mov     $GDT_DATA, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %eax, %eax
    mov     %ax, %fs
    mov     %ax, %gs
    mov     ap_stack_top(%rip), %rsp    /* set by the BSP before the SIPI */
    call    ap_main
    jmp     halt_forever

/* ------------------------------------------------------------------------ */
/* 4. Interrupt stubs.  One 16-byte slot per vector (256 of them), so C     */
/*    finds stub n at isr_stubs + 16 * n.  Each pushes a dummy error code   */
/*    (unless the CPU pushed a real one) and its vector number, so that all */
/*    vectors share one stack layout: struct interrupt_frame in C.  A stub  */
/*    is at most 12 bytes (push 2 + push 5 + jmp 5); nops pad the rest.     */
/*    isr_common comes first so the stubs' jumps go backwards: that lets    */
/*    the assembler size each jump at once, and the padding is clean nops.  */
/* ------------------------------------------------------------------------ */

isr_common:
    cld                             /* the C ABI expects DF = 0 */
    push    %rax
    push    %rcx
    push    %rdx
    push    %rbx
    push    %rbp
    push    %rsi
    push    %rdi
    push    %r8
    push    %r9
    push    %r10
    push    %r11
    push    %r12
    push    %r13
    push    %r14
    push    %r15
    /* 15 registers + vector + error code + the CPU's 5-word frame keep RSP
       16-byte aligned here, as the ABI wants at a call. */
    mov     %rsp, %rdi
    call    interrupt_handler
    pop     %r15
    pop     %r14
    pop     %r13
    pop     %r12
    pop     %r11
    pop     %r10
    pop     %r9
    pop     %r8
    pop     %rdi
    pop     %rsi
    pop     %rbp
    pop     %rbx
    pop     %rdx
    pop     %rcx
    pop     %rax
    add     $16, %rsp               /* drop vector and error code */
    iretq                           /* 64-bit iret: the only kind PVM runs */

    .align 16
    .globl isr_stubs
isr_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    /* Exceptions 8, 10-14, 17, 21, 29 and 30 push an error code themselves. */
    .if !(vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || \
          vector == 21 || vector == 29 || vector == 30)
    pushq   $0
    .endif
    pushq   $vector
    jmp     isr_common
    .set vector, vector + 1
    .endr

/* ------------------------------------------------------------------------ */
/* 5. AP trampoline.  A CPU woken by INIT/SIPI/SIPI starts in real mode at  */
/*    CS:IP = (vector << 8):0000, so this code is copied to AP_TRAMPOLINE    */
/*    (0x8000, SIPI vector 0x08) by smp.c before the SIPI.  It is linked     */
/*    here, in the kernel image, so data addresses are computed by hand:     */
/*    TRAMP(x) is where label x ends up after the copy.                      */
/* ------------------------------------------------------------------------ */

#define TRAMP(x) (AP_TRAMPOLINE + (x) - ap_trampoline_start)

    .section .rodata.trampoline, "a"
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    xor     %ax, %ax
    mov     %ax, %ds                /* DS = 0: TRAMP() addresses are absolute */
    lgdtl   TRAMP(ap_gdt_ptr)       /* lgdtl: take all 32 bits of the base */

    /* Same steps as the BSP, using the BSP's page tables ... */
    mov     %cr4, %eax
    or      $CR4_PAE, %eax
    mov     %eax, %cr4
    mov     $pml4, %eax
    mov     %eax, %cr3
    mov     $MSR_EFER, %ecx
    rdmsr
    or      $EFER_LME, %eax
    wrmsr
    /* ... but straight from real mode: PE and PG together enter long mode
       (compatibility mode) in one step, and the far jump makes it 64-bit. */
    mov     %cr0, %eax
    or      $(CR0_PG | CR0_PE), %eax
    mov     %eax, %cr0
    ljmpl   $GDT_CODE64, $ap_long_mode_entry

    .align 4
ap_gdt_ptr:                         /* a copy of gdt_ptr reachable from real mode */
    .word   gdt_end - gdt - 1
    .long   gdt
ap_trampoline_end:

    /* Back to 64-bit for the rest of the file: this assembler (GNU as 2.40)
       picks the nop padding of every .align by the mode in force at the
       END of the file, and 16-bit nops in 64-bit code would disassemble
       (objdump, gdb) as garbage. */
    .code64

/* ------------------------------------------------------------------------ */
/* Data: the GDT, the saved multiboot registers, page tables, boot stack.   */
/* ------------------------------------------------------------------------ */

    .section .rodata
    .align 8
gdt:
    .quad   0                       /* 0x00: the required null descriptor */
    .quad   0x00AF9A000000FFFF      /* 0x08: 64-bit code: P, DPL 0, exec/read, L */
    .quad   0x00CF92000000FFFF      /* 0x10: data: P, DPL 0, read/write */
gdt_end:
gdt_ptr:
    .word   gdt_end - gdt - 1
    .long   gdt

    .section .bss
    .align 4
multiboot_magic:    .skip 4
multiboot_info:     .skip 4

    .align 4096
pml4:               .skip 4096
pdpt:               .skip 4096
page_dirs:          .skip 4 * 4096
boot_stack:         .skip 16384
boot_stack_top:

/* Tell the linker this code needs no executable stack. */
    .section .note.GNU-stack, "", @progbits

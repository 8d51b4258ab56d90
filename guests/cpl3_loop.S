/*
 * cpl3_loop: cpl0_loop's loop at CPL 3 (user mode), for bench/hw_vs_sw.py.
 *
 * From kvmpy's long-mode entry (CPL 0, 2 MiB identity pages at 0x1000) it
 * marks the first 2 MiB user-accessible, loads a GDT with ring-3 code and
 * data, and IRETQs to ring 3 with IOPL 3, so the loop's end can OUT to the
 * debug-exit port from user mode without a way back to ring 0.  RCX (set
 * by the VMM) is the number of iterations.
 */
	.code64
	.set DEBUG_EXIT, 0xf4
	.set PAGE_USER, 1 << 2
	.set PML4, 0x1000
	.set PDPT, 0x2000
	.set PD, 0x3000
	.set USER_CODE, 0x18 | 3
	.set USER_DATA, 0x20 | 3
	.set RFLAGS_IOPL3, 3 << 12 | 1 << 1
	.set USER_STACK, 0x70000

	.text
	.globl _start
_start:
	orq	$PAGE_USER, PML4
	orq	$PAGE_USER, PDPT
	orq	$PAGE_USER, PD
	mov	%cr3, %rax		/* drop the old, supervisor-only translations */
	mov	%rax, %cr3
	lgdt	gdtr(%rip)
	pushq	$USER_DATA		/* SS */
	pushq	$USER_STACK		/* RSP */
	pushq	$RFLAGS_IOPL3		/* RFLAGS */
	pushq	$USER_CODE		/* CS */
	lea	user(%rip), %rax
	push	%rax			/* RIP */
	iretq

user:	test	%rcx, %rcx
	jz	2f
1:	dec	%rcx
	jnz	1b
2:	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt				/* not reached: the OUT ends the run */

	.balign 8
gdt:	.quad	0, 0
	.quad	0x00af9b000000ffff	/* 0x10: ring-0 code, 64-bit (what kvmpy loaded) */
	.quad	0x00affb000000ffff	/* 0x18: ring-3 code, 64-bit */
	.quad	0x00cff3000000ffff	/* 0x20: ring-3 data */
gdtr:	.word	gdtr - gdt - 1
	.quad	gdt

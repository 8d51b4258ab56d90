/*
 * intn32: exception tests written as kvm-unit-tests writes them, with int $n.
 *
 * A 32-bit protected-mode kernel at CPL0 raises its test vectors with
 * int $n, int3 and into, which this host's KVM cannot emulate at CPL0
 * (kvmpy completes them: kvmpy/x86/complete.py), and checks each delivery:
 * the handler ran, saw the address after the instruction, and found no
 * error code on its stack, also for the vectors whose exceptions push one
 * (8, 13, 14, 17).  into raises #OF only with OF set.  Then at CPL1 an
 * int $n through a DPL 0 gate must give #GP(vector * 8 + 2) with the
 * return address at the int, and one through a DPL 3 gate must run its
 * handler on the TSS's ring-0 stack.  (CPL1, not CPL3: this host runs CPL3
 * natively but cannot deliver an event from 32-bit CPL3 to CPL0, a double
 * fault; CPL1 runs through KVM's emulator, so through completion, as CPL0.)
 * Report on COM1; exit code 0: passed.
 */
	.code32
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set STACK0, 0x80000
	.set STACK1, 0x7f000

	.macro	check cond, message
	j\cond	1f
	mov	$\message, %esi
	jmp	fail
1:
	.endm

	/* A 32-bit interrupt gate for \vector to \handler, at \dpl. */
	.macro	gate vector, handler, dpl=0
	mov	$\handler, %eax
	mov	%ax, idt + \vector * 8
	movw	$0x08, idt + \vector * 8 + 2
	movw	$(0x8e00 | \dpl << 13), idt + \vector * 8 + 4
	shr	$16, %eax
	mov	%ax, idt + \vector * 8 + 6
	.endm

	/* int $\vector at CPL0: the handler must see EIP after it and no error code. */
	.macro	soft vector
	gate	\vector, record
	mov	%esp, esp_before
	int	$\vector
1:	cmpl	$1b, seen_eip
	check	e, msg_eip
	mov	esp_before, %eax
	sub	$12, %eax		/* EIP, CS, EFLAGS: nothing more */
	cmp	%eax, seen_esp
	check	e, msg_error_code
	incl	passed
	.endm

	.text
	.globl _start
_start:
	lgdt	gdtr
	ljmp	$0x08, $reload
reload:	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$STACK0, %esp
	lidt	idtr
	/* The TSS gives the ring-0 stack for events from CPL1. */
	movl	$STACK0, tss + 4	/* ESP0 */
	movl	$0x10, tss + 8		/* SS0 */
	mov	$tss, %eax
	mov	%ax, gdt_tss + 2
	shr	$16, %eax
	mov	%al, gdt_tss + 4
	mov	%ah, gdt_tss + 7
	mov	$0x28, %ax
	ltr	%ax

	/* int3 (0xcc), then int $n for a plain vector and for those that push an error code. */
	gate	3, record
	mov	%esp, esp_before
	int3
1:	cmpl	$1b, seen_eip
	check	e, msg_eip
	mov	esp_before, %eax
	sub	$12, %eax
	cmp	%eax, seen_esp
	check	e, msg_error_code
	soft	0x80
	soft	14
	soft	13
	soft	8
	soft	17
	soft	3

	/* into: no event with OF clear, #OF (vector 4) after it with OF set. */
	gate	4, record
	movl	$0, seen_eip
	xor	%eax, %eax		/* OF clear */
	into
	cmpl	$0, seen_eip
	check	e, msg_into_clear
	mov	$0x7fffffff, %eax
	add	$1, %eax		/* OF set */
	into
1:	cmpl	$1b, seen_eip
	check	e, msg_into_set

	/* To CPL1 (iret to an outer level), with IOPL 3 for the report. */
	gate	13, on_gp
	gate	8, on_double_fault
	gate	14, on_page_fault
	gate	0x81, record		/* DPL 0: int $0x81 from CPL1 is #GP */
	gate	0x82, record, 3		/* DPL 3: allowed */
	pushl	$0x39
	pushl	$STACK1
	pushl	$0x3002
	pushl	$0x31
	pushl	$user
	iret

user:	mov	$0x39, %ax
	mov	%ax, %ds
	mov	%ax, %es
	int	$0x82
1:	cmpl	$1b, seen_eip
	check	e, msg_dpl3
	cmpl	$STACK0 - 20, seen_esp	/* EIP CS EFLAGS ESP SS, on the TSS's stack */
	check	e, msg_dpl3
at_int81:
	int	$0x81
	cmpl	$1, gp_count
	check	e, msg_dpl
	cmpl	$0x81 * 8 + 2, gp_error
	check	e, msg_dpl_error
	cmpl	$at_int81, gp_eip
	check	e, msg_dpl_eip

	mov	$ok, %esi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
1:	jmp	1b

fail:	mov	$0x39, %ax		/* readable from CPL0 and CPL1 alike */
	mov	%ax, %ds
	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
1:	jmp	1b

/* Every test vector: where the event came from, and where the stack was.
   DS is saved: from CPL1 it holds a user selector that iret must find again. */
record:	push	%ds
	push	%eax
	mov	$0x10, %ax
	mov	%ax, %ds
	mov	8(%esp), %eax
	mov	%eax, seen_eip
	lea	8(%esp), %eax
	mov	%eax, seen_esp
	pop	%eax
	pop	%ds
	iret

on_double_fault:
	mov	$msg_double_fault, %esi
	jmp	fail
on_page_fault:
	mov	$msg_page_fault, %esi
	jmp	fail

/* #GP from CPL1: record the error code and the return address; skip the 2-byte int. */
on_gp:	push	%ds
	push	%eax
	mov	$0x10, %ax
	mov	%ax, %ds
	incl	gp_count
	mov	8(%esp), %eax
	mov	%eax, gp_error
	mov	12(%esp), %eax
	mov	%eax, gp_eip
	addl	$2, 12(%esp)
	pop	%eax
	pop	%ds
	add	$4, %esp		/* the error code */
	iret

	.include "puts.inc"

ok:		.asciz	"intn32 OK: int3, int $n, into and the gate DPL check\n"
msg_eip:	.asciz	"FAIL: a handler saw the wrong return address\n"
msg_error_code:	.asciz	"FAIL: int $n pushed an error code\n"
msg_into_clear:	.asciz	"FAIL: into with OF clear raised #OF\n"
msg_into_set:	.asciz	"FAIL: into with OF set did not raise #OF after it\n"
msg_dpl:	.asciz	"FAIL: int $0x81 at CPL1 through a DPL 0 gate gave no #GP\n"
msg_dpl_error:	.asciz	"FAIL: the DPL #GP's error code is not 0x40a\n"
msg_dpl_eip:	.asciz	"FAIL: the DPL #GP's return address is not the int\n"
msg_double_fault: .asciz "FAIL: double fault\n"
msg_page_fault:	.asciz	"FAIL: page fault\n"
msg_dpl3:	.asciz	"FAIL: int $0x82 at CPL1 through a DPL 3 gate\n"

	.data
	.align 8
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
idtr:	.word	256 * 8 - 1
	.long	idt
gdt:	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08 kernel code 32 */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0x00cffa000000ffff	/* 0x18 user code 32 */
	.quad	0x00cff2000000ffff	/* 0x20 user data */
gdt_tss:
	.quad	0x0000890000000067	/* 0x28 32-bit TSS, base filled in */
	.quad	0x00cfba000000ffff	/* 0x30 ring-1 code 32 */
	.quad	0x00cfb2000000ffff	/* 0x38 ring-1 data */
gdt_end:
passed:		.long	0
esp_before:	.long	0
seen_eip:	.long	0
seen_esp:	.long	0
gp_count:	.long	0
gp_error:	.long	0
gp_eip:		.long	0
	.align 8
tss:		.space	0x68
	.align 8
idt:		.space	256 * 8

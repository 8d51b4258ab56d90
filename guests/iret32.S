/*
 * iret32: a 32-bit protected-mode iret, which this host's KVM cannot emulate.
 *
 * kvmpy completes it (kvmpy/x86/complete.py).  The guest loads its own GDT,
 * returns to itself at the same level (the flags it pushed must come back,
 * IF aside), then returns to CPL3 (an outer level: SS:ESP come off the
 * stack too, and DS/ES, at DPL 0, become null), where it reports over COM1
 * with IOPL 3.  Exit code 0: all passed.
 */
	.code32
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.text
	.globl _start
_start:
	lgdt	gdtr
	ljmp	$0x08, $reload
reload:	mov	$0x10, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss

	/* Same level: push EFLAGS (CF, ZF, DF set), CS, EIP; iret. */
	pushl	$0x0443			/* DF ZF CF + reserved bit 1 */
	pushl	$0x08
	pushl	$same_level
	iret
same_level:
	pushf
	pop	%eax
	cld
	cmp	$0x0443, %eax		/* the flags iret loaded */
	jne	fail_same
	cmp	$0x80000, %esp		/* the 12 bytes were popped */
	jne	fail_same

	/* To CPL3: SS, ESP, EFLAGS with IOPL 3, CS, EIP. */
	pushl	$0x23			/* user data, RPL 3 */
	pushl	$0x7f000
	pushl	$0x3002
	pushl	$0x1b			/* user code, RPL 3 */
	pushl	$user
	iret

user:	mov	%cs, %eax
	cmp	$0x1b, %eax
	jne	fail_user
	mov	%ss, %eax
	cmp	$0x23, %eax
	jne	fail_user
	cmp	$0x7f000, %esp
	jne	fail_user
	mov	%ds, %eax		/* DPL 0 data: nulled on the way out */
	test	%eax, %eax
	jnz	fail_user
	mov	$0x23, %ax
	mov	%ax, %ds
	mov	$ok, %esi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
1:	jmp	1b

fail_same:
	mov	$msg_same, %esi
	jmp	fail
fail_user:
	mov	$0x23, %ax
	mov	%ax, %ds
	mov	$msg_user, %esi
fail:	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
1:	jmp	1b

	.include "puts.inc"

ok:		.asciz	"iret32 OK: same-level and outer-level returns\n"
msg_same:	.asciz	"FAIL: same-level iret: wrong flags or stack\n"
msg_user:	.asciz	"FAIL: iret to CPL3: wrong CS, SS, ESP or DS\n"

	.data
	.align 8
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
gdt:	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08 kernel code 32 */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0x00cffa000000ffff	/* 0x18 user code 32 */
	.quad	0x00cff2000000ffff	/* 0x20 user data */
gdt_end:

/*
 * x87env64: fnstenv, fldenv, fnsave, frstor and their wait forms, checked.
 *
 * On a PVM host each of them ends in a KVM internal error at CPL0 and kvmpy
 * completes it (kvmpy/x86/complete.py); on hardware KVM the CPU runs them.
 * Part 1, at CPL0, checks exact images against the SDM: the 28-byte and the
 * 14-byte (0x66 prefix) environments, the 108- and 94-byte save images
 * (registers in ST(i) order with TOP = 3), the full tag word computed from the
 * registers (valid, zero, NaN, infinity, denormal, unnormal, pseudo-denormal,
 * empty), FCW/FSW as the FPU keeps them, exceptions masked after fnstenv, the
 * FPU initialised after fnsave, #MF from the wait of fstenv for a pending
 * unmasked exception, #NM with CR0.TS, and #PF with nothing written or loaded.
 * Part 2 runs a differential block at CPL0 into table_a, then at CPL3 (where
 * this host runs code natively) into table_b, and compares them byte for byte.
 * Exit code 0: all passed.
 */
	.code64
	.set DEBUG_EXIT, 0xf4
	.set HOLE, 0x400000		/* the 2 MiB page part 1 unmaps */

	.macro	check cond, message
	j\cond	1f
	lea	\message(%rip), %rsi
	jmp	fail
1:
	.endm

	.macro	gate vector, handler
	lea	\handler(%rip), %rax
	lea	idt + \vector * 16(%rip), %rdi
	mov	%ax, (%rdi)
	movw	$0x10, 2(%rdi)
	movw	$0x8e00, 4(%rdi)
	shr	$16, %rax
	mov	%ax, 6(%rdi)
	shr	$16, %rax
	mov	%eax, 8(%rdi)
	.endm

	/* Compare \count bytes at \got and \want; fail with \message if they differ. */
	.macro	same got, want, count, message
	lea	\got(%rip), %rdi
	lea	\want(%rip), %rsi
	mov	$\count, %ecx
	cld
	repe cmpsb
	check	e, \message
	.endm

	/*
	 * FCS and FDS of an environment at \at + (%rdi): the CPU keeps what fldenv
	 * loaded, but KVM keeps the x87 state in the 64-bit XSAVE format, which has
	 * no place for them, so they are lost (0) on every KVM state switch, and
	 * kvmpy, which works on KVM's state, stores 0.  Not compared.
	 */
	.macro	mask_selectors at
	movw	$0, \at + 16(%rdi)
	movw	$0, \at + 24(%rdi)
	.endm
	.macro	mask_selectors16 at
	movw	$0, \at + 8(%rdi)
	movw	$0, \at + 12(%rdi)
	.endm

	.text
	.globl _start
_start:
	gate	7, on_nm
	gate	14, on_pf
	gate	16, on_mf
	lidt	idtr(%rip)
	mov	%cr0, %rax
	or	$0x22, %eax		/* NE: x87 errors as #MF; MP: wait sees TS */
	and	$~0xc, %eax		/* EM, TS clear */
	mov	%rax, %cr0

	/* 1. frstor, then fnstenv: the 28-byte environment, tags from the registers. */
	fninit
	frstor	save_in(%rip)
	fnstenv	env_out(%rip)
	lea	env_out(%rip), %rdi
	mask_selectors 0
	same	env_out, env_want, 28, msg_fnstenv
	fnstcw	word(%rip)
	cmpw	$0x37f, word(%rip)	/* every exception masked now */
	check	e, msg_fnstenv_mask
	fnstsw	%ax
	cmp	$0x1804, %ax		/* ZE kept; ES and B clear: nothing unmasked */
	check	e, msg_fnstenv_mask

	/* 2. fnsave: environment and ST0-ST7, then the FPU as after fninit. */
	frstor	save_in(%rip)
	fnsave	save_out(%rip)
	lea	save_out(%rip), %rdi
	mask_selectors 0
	same	save_out, env_want, 28, msg_fnsave
	same	save_out + 28, save_in + 28, 80, msg_fnsave_regs
	fnstsw	%ax
	test	%ax, %ax
	check	z, msg_fnsave_init
	fnstcw	word(%rip)
	cmpw	$0x37f, word(%rip)
	check	e, msg_fnsave_init
	fnstenv	env_out(%rip)
	cmpw	$0xffff, env_out + 8(%rip)	/* all empty */
	check	e, msg_fnsave_init

	/* 3. The 16-bit operand size (0x66): 14 and 94 bytes; no opcode, 16-bit offsets. */
	fninit
	data16 frstor save16_in(%rip)
	data16 fnsave save16_out(%rip)
	lea	save16_out(%rip), %rdi
	mask_selectors16 0
	same	save16_out, env16_want, 14, msg_fnsave16
	same	save16_out + 14, save_in + 28, 80, msg_fnsave_regs
	frstor	save_in(%rip)
	data16 fnstenv env_out(%rip)
	lea	env_out(%rip), %rdi
	mask_selectors16 0
	same	env_out, env16_want, 14, msg_fnstenv16

	/* 4. fldenv alone: FCW bit 6 set, reserved bits dropped, ES and B recomputed. */
	fninit
	fldenv	env_odd(%rip)
	fnstcw	word(%rip)
	cmpw	$0x1f7f, word(%rip)
	check	e, msg_fldenv
	fnstsw	%ax
	cmp	$0x7f7f, %ax
	check	e, msg_fldenv

	/* 5. The wait of fstenv/fsave raises #MF for the pending unmasked ZE; the handler
	 * clears it (fnclex) and the wait, run again, lets the store through. */
	fninit
	frstor	save_in(%rip)
at_fstenv:
	fstenv	env_out(%rip)
	cmpl	$1, mf_count(%rip)
	check	e, msg_mf
	lea	at_fstenv(%rip), %rax
	cmp	%rax, mf_rip(%rip)
	check	e, msg_mf
	testw	$0x80bf, env_out + 4(%rip)	/* stored after fnclex: no flags, ES, B */
	check	z, msg_mf
	frstor	save_in(%rip)
at_fsave:
	fsave	save_out(%rip)
	cmpl	$2, mf_count(%rip)
	check	e, msg_mf
	lea	at_fsave(%rip), %rax
	cmp	%rax, mf_rip(%rip)
	check	e, msg_mf

	/* 6. CR0.TS: #NM at the instruction; the handler clears TS and it runs again. */
	frstor	save_in(%rip)
	clts
	mov	%cr0, %rax
	or	$8, %eax
	mov	%rax, %cr0
at_nm:	fnstenv	env_out(%rip)
	cmpl	$1, nm_count(%rip)
	check	e, msg_nm
	lea	at_nm(%rip), %rax
	cmp	%rax, nm_rip(%rip)
	check	e, msg_nm
	lea	env_out(%rip), %rdi
	mask_selectors 0
	same	env_out, env_want, 28, msg_nm

	/* 7. Across into a not-present page: #PF with CR2 there, nothing written or loaded. */
	mov	%cr3, %rax
	mov	(%rax), %rbx			/* PML4[0] */
	and	$~0xfff, %rbx
	mov	(%rbx), %rbx			/* PDPT[0] */
	and	$~0xfff, %rbx
	lea	HOLE / 0x200000 * 8(%rbx), %rbx	/* the PD entry of HOLE */
	mov	%rbx, pd_entry(%rip)
	andq	$~1, (%rbx)
	mov	%rax, %cr3
	fninit
	frstor	save_in(%rip)
	mov	$HOLE - 64, %rdi
at_pf_save:
	fnsave	(%rdi)				/* 108 bytes: 64 before the hole */
	cmpq	$HOLE, pf_cr2(%rip)
	check	e, msg_pf
	cmpq	$2, pf_error(%rip)		/* a write to a not-present page */
	check	e, msg_pf
	cmpq	$0, HOLE - 64			/* nothing written */
	check	e, msg_pf
	fnstcw	word(%rip)
	cmpw	$0x37b, word(%rip)		/* not initialised */
	check	e, msg_pf
	fninit
	movq	$-1, pf_error(%rip)
	lea	at_pf_load(%rip), %rax
	mov	%rax, pf_skip_from(%rip)
	mov	$HOLE - 64, %rdi
at_pf_load:
	frstor	(%rdi)
	cmpq	$0, pf_error(%rip)		/* a read */
	check	e, msg_pf
	fnstcw	word(%rip)
	cmpw	$0x37f, word(%rip)		/* nothing loaded */
	check	e, msg_pf
	mov	pd_entry(%rip), %rbx
	orq	$1, (%rbx)
	mov	%cr3, %rax
	mov	%rax, %cr3

	/* Part 2: the differential block at CPL0, then at CPL3. */
	lea	table_a(%rip), %rdi
	call	differential

	/* To CPL3: user pages (U in PML4[0], PDPT[0], PD[0]), user segments, IOPL 3. */
	mov	%cr3, %rax
	orq	$4, (%rax)
	mov	(%rax), %rbx
	and	$~0xfff, %rbx
	orq	$4, (%rbx)
	mov	(%rbx), %rcx
	and	$~0xfff, %rcx
	orq	$4, (%rcx)
	mov	%rax, %cr3
	lgdt	gdtr(%rip)
	pushq	$0x23			/* SS: user data, RPL 3 */
	pushq	$0x90000		/* user stack */
	pushq	$0x3002			/* RFLAGS: IOPL 3, IF clear */
	pushq	$0x2b			/* CS: user 64-bit code, RPL 3 */
	lea	user(%rip), %rax
	push	%rax
	iretq

user:
	lea	table_b(%rip), %rdi
	call	differential
	same	table_a, table_b, TABLE_SIZE, msg_differential
	lea	msg_ok(%rip), %rsi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
1:	jmp	1b

fail:	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
	hlt

/*
 * The same instructions at CPL0 (completed by kvmpy on PVM) and at CPL3 (the CPU),
 * images and the status and control words after them, at (%rdi).  Masked in every
 * environment: FCS and FDS (see mask_selectors), and FIP, FOP, FDP, the last x87
 * instruction's address, opcode and operand: at CPL0 on PVM the instructions before
 * ran through KVM's emulator, kvmpy or the CPU emulator, which do not keep them as
 * the CPU does, and this AMD CPU's XSAVE drops them while no exception is pending
 * (part 1 checks that fldenv/frstor and fnstenv/fnsave carry them exactly).
 */
	.macro	mask_pointers at
	movl	$0, \at + 12(%rdi)
	movl	$0, \at + 16(%rdi)
	movl	$0, \at + 20(%rdi)
	movw	$0, \at + 24(%rdi)
	.endm
	.macro	mask_pointers16 at
	movl	$0, \at + 6(%rdi)
	movl	$0, \at + 10(%rdi)
	.endm
	.macro	words
	fnstsw	(%rdi)
	fnstcw	2(%rdi)
	add	$4, %rdi
	.endm

differential:
	/* Pending unmasked exception, TOP = 3, every kind of tag. */
	fninit
	frstor	save_in(%rip)
	fnstenv	(%rdi)
	mask_pointers 0
	add	$28, %rdi
	words
	frstor	save_in(%rip)
	fnsave	(%rdi)
	mask_pointers 0
	add	$108, %rdi
	words
	fnstenv	(%rdi)			/* after fnsave: initialised */
	mask_pointers 0
	add	$28, %rdi
	/* 16-bit operand size, both ways. */
	data16 frstor save16_in(%rip)
	data16 fnstenv (%rdi)
	mask_pointers16 0
	add	$14, %rdi
	data16 fnsave (%rdi)
	mask_pointers16 0
	add	$94, %rdi
	words
	/* REX.W changes nothing. */
	frstor	save_in(%rip)
	rex.w fnstenv (%rdi)
	mask_pointers 0
	add	$28, %rdi
	/* A stack built by pushes (TOP = 5), stored by the wait forms: nothing pending. */
	fninit
	fld1
	fldz
	fldpi
	fstenv	(%rdi)
	mask_pointers 0
	add	$28, %rdi
	fsave	(%rdi)
	mask_pointers 0
	add	$108, %rdi
	/* fldenv: odd control and status words; tags loaded as valid over the registers
	 * as they are (what the last frstor left), then computed again when stored. */
	fldenv	env_odd(%rip)
	words
	fnstenv	(%rdi)
	mask_pointers 0
	add	$28, %rdi
	data16 fldenv env16_odd(%rip)
	words
	fnstenv	(%rdi)
	mask_pointers 0
	add	$28, %rdi
	/* frstor of an image whose tag word says all empty, whatever the registers. */
	frstor	save_empty(%rip)
	fnsave	(%rdi)
	mask_pointers 0
	add	$108, %rdi
	fninit
	ret

on_mf:	incl	mf_count(%rip)
	push	%rax
	mov	8(%rsp), %rax
	mov	%rax, mf_rip(%rip)
	pop	%rax
	fnclex
	iretq
on_nm:	incl	nm_count(%rip)
	push	%rax
	mov	8(%rsp), %rax
	mov	%rax, nm_rip(%rip)
	pop	%rax
	clts
	iretq
/* #PF: record the error code and CR2, resume after the instruction (2 bytes + 0 disp). */
on_pf:	pop	pf_error(%rip)
	push	%rax
	mov	%cr2, %rax
	mov	%rax, pf_cr2(%rip)
	mov	8(%rsp), %rax
	cmp	pf_skip_from(%rip), %rax
	jne	1f
	addq	$2, 8(%rsp)		/* fnsave/frstor (%rdi): 2 bytes */
	pop	%rax
	iretq
1:	lea	msg_fault_rip(%rip), %rsi
	jmp	fail

	.include "puts.inc"

msg_ok:		.asciz	"x87env64 OK: all checks passed\n"
msg_fnstenv:	.asciz	"FAIL: fnstenv: the 28-byte environment differs\n"
msg_fnstenv_mask: .asciz "FAIL: fnstenv did not mask exceptions (FCW 0x37f, ES clear)\n"
msg_fnsave:	.asciz	"FAIL: fnsave: the environment differs\n"
msg_fnsave_regs: .asciz	"FAIL: fnsave: ST0-ST7 differ\n"
msg_fnsave_init: .asciz	"FAIL: fnsave did not initialise the FPU\n"
msg_fnsave16:	.asciz	"FAIL: 16-bit fnsave: the 14-byte environment differs\n"
msg_fnstenv16:	.asciz	"FAIL: 16-bit fnstenv differs\n"
msg_fldenv:	.asciz	"FAIL: fldenv: FCW/FSW not as the FPU keeps them\n"
msg_mf:		.asciz	"FAIL: fstenv/fsave with a pending exception: no #MF at the wait\n"
msg_nm:		.asciz	"FAIL: fnstenv with CR0.TS: no #NM, or a wrong image after it\n"
msg_pf:		.asciz	"FAIL: fnsave/frstor across a hole: no #PF, or state changed\n"
msg_fault_rip:	.asciz	"FAIL: a fault came from an unexpected RIP\n"
msg_differential: .asciz "FAIL: CPL0 (completed) and CPL3 (native) images differ\n"

	.data
	.align 16
idtr:	.word	256 * 16 - 1
	.quad	idt
gdtr:	.word	gdt_end - gdt - 1
	.quad	gdt
	.align 8
gdt:	.quad	0
	.quad	0x00af9a000000ffff	/* 0x08 kernel code 64 */
	.quad	0x00af9a000000ffff	/* 0x10 kernel code 64 (kvmpy's selector) */
	.quad	0x00cf92000000ffff	/* 0x18 kernel data */
	.quad	0x00cff2000000ffff	/* 0x20 user data */
	.quad	0x00affa000000ffff	/* 0x28 user code 64 */
gdt_end:
mf_count:	.long	0
nm_count:	.long	0
mf_rip:		.quad	0
nm_rip:		.quad	0
pf_error:	.quad	-1
pf_cr2:		.quad	0
pf_skip_from:	.quad	at_pf_save
pd_entry:	.quad	0
word:		.word	0

	.include "x87env.inc"
env_out:	.space	28
	.align 8
save_out:	.space	108
	.align 8
save16_out:	.space	94
	.set TABLE_SIZE, 28 + 4 + 108 + 4 + 28 + 14 + 94 + 4 + 28 + 28 + 108 + 4 + 28 + 4 + 28 + 108
	.align 16
table_a:	.space	TABLE_SIZE
table_b:	.space	TABLE_SIZE
	.align 16
idt:	.space	256 * 16

/*
 * complete64: instructions this host's KVM cannot emulate at CPL0, checked.
 *
 * On a PVM host each instruction below ends in a KVM internal error, and
 * kvmpy completes it (kvmpy/x86/complete.py); on hardware KVM the CPU runs
 * them.  Either way the results must be the SDM's.  Part 1 runs at CPL0
 * and checks software interrupts, faults raised into the guest, clac/stac,
 * cmpxchg8b/16b, movbe, xgetbv/xsetbv, x87 and cache/TLB instructions.
 * The differential block (popcnt, cmpxchg16b, x87
 * constants) runs once at CPL0 into table_a, then the guest drops to CPL3,
 * where this host runs code natively, runs the same block into table_b and
 * compares the two, results and flags.  Exit code 0: all passed.
 * A second differential block does the same for SSE and x87 arithmetic, which
 * kvmpy runs one instruction at a time on the CPU emulator (kvmpy/x86/fallback.py):
 * results, RFLAGS, MXCSR's exception flags and the x87 status word with C1.
 * (lzcnt/tzcnt and movbe are left out: at CPL0 PVM's emulator runs lzcnt and
 * tzcnt as bsr/bsf and answers movbe from memory with #UD, without an exit,
 * so there is nothing to complete; see docs/completion.md.)
 */
	.code64
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set FLAGS_MASK, 0x8d5		/* OF SF ZF AF PF CF */

	.macro	check cond, message
	j\cond	1f
	lea	\message(%rip), %rsi
	jmp	fail
1:
	.endm

	.macro	gate vector, handler, access=0x8e
	lea	\handler(%rip), %rax
	lea	idt + \vector * 16(%rip), %rdi
	mov	%ax, (%rdi)
	movw	$0x10, 2(%rdi)
	movb	$0, 4(%rdi)
	movb	$\access, 5(%rdi)
	shr	$16, %rax
	mov	%ax, 6(%rdi)
	shr	$16, %rax
	mov	%eax, 8(%rdi)
	.endm

	.text
	.globl _start
_start:
	gate	3, on_vector3
	gate	0x80, on_vector80
	gate	13, on_vector13_soft
	gate	6, on_ud
	gate	0x90, on_vector80, 0x0e	/* not present: int $0x90 raises #NP */
	gate	11, on_np
	lidt	idtr(%rip)

	/* int3: the handler sees the address after it, and no error code. */
	int3
after_int3:
	cmpl	$1, count3(%rip)
	check	e, msg_int3
	lea	after_int3(%rip), %rax
	cmp	%rax, frame_rip(%rip)
	check	e, msg_int3_rip

	/* int $0x80 and int $13: through the IDT, int $13 without an error code. */
	int	$0x80
after_int80:
	lea	after_int80(%rip), %rax
	cmp	%rax, frame_rip(%rip)
	check	e, msg_int80
	int	$13
after_int13:
	lea	after_int13(%rip), %rax
	cmp	%rax, frame_rip(%rip)
	check	e, msg_int13

	/* A not-present gate: #NP with error code 0x90*8+2, RIP at the int. */
	lea	at_int90(%rip), %rax
	mov	%rax, fault_skip_from(%rip)
	movb	$2, skip_length(%rip)
at_int90:
	int	$0x90
	cmpq	$0x90 * 8 + 2, np_error(%rip)
	check	e, msg_np

	/* popcnt from an unmapped page (8 GiB: past kvmpy's page tables): #PF, CR2, error 0. */
	gate	14, on_pf
	lea	at_pf(%rip), %rax
	mov	%rax, fault_skip_from(%rip)
	movb	$5, skip_length(%rip)
	movabs	$0x200000010, %rsi
at_pf:	popcnt	(%rsi), %rax
	movabs	$0x200000010, %rax
	cmp	%rax, pf_cr2(%rip)
	check	e, msg_pf
	cmpq	$0, pf_error(%rip)
	check	e, msg_pf

	/* A non-canonical address is a #GP(0), not a #PF. */
	gate	13, on_gp
	lea	at_noncanonical(%rip), %rax
	mov	%rax, fault_skip_from(%rip)
	movabs	$0x0000800000000000, %rsi
at_noncanonical:
	popcnt	(%rsi), %rax
	cmpl	$1, gp_count(%rip)
	check	e, msg_noncanonical
	movl	$0, gp_count(%rip)

	/* Register-form movbe is #UD. */
	movl	$0, ud_count(%rip)
	.byte	0x0f, 0x38, 0xf0, 0xc0
	cmpl	$1, ud_count(%rip)
	check	e, msg_movbe_ud

	/* stac / clac set and clear RFLAGS.AC. */
	stac
	pushf
	pop	%rax
	bt	$18, %rax
	check	c, msg_stac
	clac
	pushf
	pop	%rax
	bt	$18, %rax
	check	nc, msg_clac

	/* cmpxchg8b: equal and not equal. */
	movabs	$0x1111111122222222, %rax
	mov	%rax, m8(%rip)
	mov	$0x22222222, %eax
	mov	$0x11111111, %edx
	mov	$0x44444444, %ebx
	mov	$0x33333333, %ecx
	lock cmpxchg8b m8(%rip)
	check	z, msg_cx8_eq
	movabs	$0x3333333344444444, %rax
	cmp	%rax, m8(%rip)
	check	e, msg_cx8_eq
	xor	%eax, %eax
	xor	%edx, %edx
	cmpxchg8b m8(%rip)
	check	nz, msg_cx8_ne
	cmp	$0x44444444, %eax
	check	e, msg_cx8_ne
	cmp	$0x33333333, %edx
	check	e, msg_cx8_ne

	/* cmpxchg16b on a misaligned operand: #GP(0). */
	lea	at_cx16(%rip), %rax
	mov	%rax, fault_skip_from(%rip)
	movb	$5, skip_length(%rip)
	gate	13, on_gp
	lea	m16 + 8(%rip), %rdi
at_cx16:
	lock cmpxchg16b (%rdi)
	cmpq	$0, gp_error(%rip)
	check	e, msg_cx16_gp
	cmpl	$1, gp_count(%rip)
	check	e, msg_cx16_gp

	/* xgetbv / xsetbv, with CR4.OSXSAVE set. */
	mov	%cr4, %rax
	bts	$18, %rax
	mov	%rax, %cr4
	xor	%ecx, %ecx
	xgetbv
	test	$1, %eax
	check	nz, msg_xgetbv
	mov	%eax, %r12d		/* XCR0 as it was */
	mov	$3, %eax
	xor	%edx, %edx
	xsetbv
	xor	%eax, %eax
	xgetbv
	cmp	$3, %eax
	check	e, msg_xsetbv
	/* XCR0 with bit 0 clear is refused: #GP(0). */
	lea	at_xsetbv(%rip), %rax
	mov	%rax, fault_skip_from(%rip)
	movb	$3, skip_length(%rip)
	movl	$0, gp_count(%rip)
	mov	$2, %eax
	xor	%edx, %edx
at_xsetbv:
	xsetbv
	cmpl	$1, gp_count(%rip)
	check	e, msg_xsetbv_gp
	/* xsave64 / xrstor64, standard form, XCR0 = 3 (x87 and SSE). */
	movdqu	pattern(%rip), %xmm0
	fninit
	fld1
	lea	xarea(%rip), %rdi
	mov	$3, %eax
	xor	%edx, %edx
	xsave64	(%rdi)
	fninit
	mov	pattern(%rip), %rax
	cmp	%rax, xarea + 160(%rip)		/* XMM0's low half */
	check	e, msg_xsave
	mov	xarea + 512(%rip), %rax
	and	$3, %eax
	cmp	$3, %eax			/* XSTATE_BV: x87 and SSE in use */
	check	e, msg_xsave
	cmpw	$0x3fff, xarea + 32 + 8(%rip)	/* ST0 = 1.0: exponent 0x3fff */
	check	e, msg_xsave
	notq	xarea + 160(%rip)
	mov	$3, %eax
	xrstor64 (%rdi)
	movdqu	%xmm0, xout(%rip)
	mov	xarea + 160(%rip), %rax
	cmp	%rax, xout(%rip)
	check	e, msg_xrstor
	fnstsw	%ax
	and	$0x3800, %ax
	cmp	$0x3800, %ax			/* one value on the x87 stack again: TOP 7 */
	check	e, msg_xrstor
	movq	$1, xarea + 512(%rip)		/* SSE not in use: XMM0 back to zero */
	mov	$3, %eax
	xrstor64 (%rdi)
	movdqu	%xmm0, xout(%rip)
	cmpq	$0, xout(%rip)
	check	e, msg_xrstor_init
	cmpq	$0, xout + 8(%rip)
	check	e, msg_xrstor_init
	fninit

	mov	%r12d, %eax
	xor	%edx, %edx
	xor	%ecx, %ecx
	xsetbv

	/* x87: fninit, fwait, constants. */
	fninit
	fwait
	fnstsw	%ax
	test	%ax, %ax
	check	z, msg_fninit
	fnstcw	fcw_word(%rip)
	cmpw	$0x37f, fcw_word(%rip)
	check	e, msg_fninit

	/* Cache and TLB instructions: no-ops that must not fault here. */
	clflushopt m8(%rip)
	clwb	m8(%rip)
	lea	invpcid_desc(%rip), %rdi
	mov	$2, %eax
	invpcid	(%rdi), %rax

	/* The differential blocks at CPL0, into table_a and simd_a. */
	lea	table_a(%rip), %rdi
	call	differential
	lea	simd_a(%rip), %rdi
	call	simd_differential

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
	lea	table_a(%rip), %rsi
	lea	table_b(%rip), %rdi
	mov	$TABLE_SIZE, %ecx
	cld
	repe cmpsb
	check	e, msg_differential
	lea	simd_b(%rip), %rdi
	call	simd_differential
	lea	simd_a(%rip), %rsi
	lea	simd_b(%rip), %rdi
	mov	$SIMD_SIZE, %ecx
	repe cmpsb
	check	e, msg_simd_differential
	lea	msg_ok(%rip), %rsi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
1:	jmp	1b

fail:	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
	hlt

/* Results and flags of the instructions this host cannot run at CPL0, at (%rdi). */
	.macro	diff insn, input
	movabs	$\input, %rbx
	push	$0x8d7
	popf
	\insn
	pushf
	pop	%rdx
	and	$FLAGS_MASK, %edx
	mov	%rax, (%rdi)
	mov	%rdx, 8(%rdi)
	add	$16, %rdi
	.endm

differential:
	.irp input, 0, 1, 0x8000000000000000, 0xffff, 0xf000000000000100, 0x7fffffff
	diff	"popcnt %rbx, %rax", \input
	diff	"popcnt %ebx, %eax", \input
	.endr
	/* cmpxchg16b, equal then not equal. */
	lea	m16(%rip), %rsi
	movq	$1, (%rsi)
	movq	$2, 8(%rsi)
	mov	$1, %eax
	mov	$2, %edx
	mov	$3, %ebx
	mov	$4, %ecx
	lock cmpxchg16b (%rsi)
	setz	%al
	mov	%rax, (%rdi)
	mov	(%rsi), %rax
	mov	%rax, 8(%rdi)
	mov	8(%rsi), %rax
	mov	%rax, 16(%rdi)
	xor	%eax, %eax
	xor	%edx, %edx
	cmpxchg16b (%rsi)
	pushf
	pop	%rbx
	and	$FLAGS_MASK, %ebx
	mov	%rbx, 24(%rdi)
	mov	%rax, 32(%rdi)
	mov	%rdx, 40(%rdi)
	add	$48, %rdi
	/* x87 constants, stored as 80-bit values, and the status word. */
	fninit
	fldz
	fld1
	fldpi
	fldl2e
	fldl2t
	fldlg2
	fldln2
	fnstsw	(%rdi)
	add	$2, %rdi
	.rept 7
	fstpt	(%rdi)
	add	$10, %rdi
	.endr
	/* Rounding toward zero changes the last bit of some. */
	fninit
	movw	$0xf7f, fcw_word(%rip)
	fldcw	fcw_word(%rip)
	fldpi
	fldl2e
	fldl2t
	fldlg2
	fldln2
	.rept 5
	fstpt	(%rdi)
	add	$10, %rdi
	.endr
	fninit
	ret

/*
 * SSE and x87 arithmetic, which this host's KVM gives up on at CPL0: kvmpy runs
 * each such instruction on the CPU emulator (kvmpy/x86/fallback.py).  Results,
 * flags, MXCSR and the x87 status word go to (%rdi), 8 bytes a slot.
 */
	.macro	keep_rax
	mov	%rax, (%rdi)
	add	$8, %rdi
	.endm
	.macro	keep_flags
	pushf
	pop	%rax
	and	$FLAGS_MASK, %eax
	keep_rax
	.endm
	.macro	keep_xmm reg
	movq	\reg, %rax
	keep_rax
	pextrq	$1, \reg, %rax
	keep_rax
	.endm
	.macro	keep_mxcsr
	stmxcsr	(%rdi)
	movl	$0, 4(%rdi)
	add	$8, %rdi
	.endm

simd_differential:
	mov	$0x1f80, %eax
	mov	%eax, simd_scratch(%rip)
	ldmxcsr	simd_scratch(%rip)
	/* movd xmm15, ecx: the instruction that stopped Debian's cloud kernel. */
	mov	$0x89abcdef, %ecx
	pcmpeqd	%xmm15, %xmm15
	movd	%ecx, %xmm15
	keep_xmm %xmm15
	/* Packed and scalar floating point, conversions, rounding exceptions in MXCSR. */
	movdqa	simd_in(%rip), %xmm0
	movdqa	simd_in + 16(%rip), %xmm1
	movaps	%xmm0, %xmm2
	addps	%xmm1, %xmm2
	keep_xmm %xmm2
	movaps	%xmm0, %xmm3
	mulps	%xmm1, %xmm3
	keep_xmm %xmm3
	movaps	%xmm0, %xmm4
	divps	%xmm1, %xmm4
	keep_xmm %xmm4
	keep_mxcsr
	sqrtsd	simd_in + 32(%rip), %xmm5
	keep_xmm %xmm5
	mov	$-7, %rax
	cvtsi2sd %rax, %xmm6
	keep_xmm %xmm6
	cvttsd2si simd_in + 40(%rip), %rax
	keep_rax
	cvtsd2si simd_in + 40(%rip), %rax
	keep_rax
	keep_mxcsr
	/* Compares that set RFLAGS. */
	comisd	simd_in + 32(%rip), %xmm5
	keep_flags
	ucomiss	%xmm1, %xmm0
	keep_flags
	ptest	%xmm0, %xmm1
	keep_flags
	/* Integer SSE. */
	movdqa	%xmm0, %xmm7
	pshufb	simd_in + 48(%rip), %xmm7
	keep_xmm %xmm7
	movdqa	%xmm0, %xmm8
	pmulld	%xmm1, %xmm8
	keep_xmm %xmm8
	movdqa	%xmm0, %xmm9
	psadbw	%xmm1, %xmm9
	keep_xmm %xmm9
	movq	%xmm9, simd_scratch(%rip)	/* a store to memory */
	mov	simd_scratch(%rip), %rax
	keep_rax
	/* x87: loads of each size, arithmetic, a rounded store, compares. */
	fninit
	flds	simd_x87(%rip)			/* 2.5 */
	fldl	simd_x87 + 8(%rip)		/* 1/3 */
	fmulp
	fildl	simd_x87 + 16(%rip)		/* 7 */
	faddp
	fsqrt
	fld1
	fdivr	%st(1), %st
	fstpt	(%rdi)
	add	$10, %rdi
	fstl	(%rdi)
	add	$8, %rdi
	fistpl	(%rdi)
	add	$4, %rdi
	fnstsw	(%rdi)
	add	$2, %rdi
	fldl	simd_x87 + 8(%rip)
	fldpi
	fcomi	%st(1), %st
	keep_flags
	fscale
	fchs
	fistps	(%rdi)		/* -pi: -3, rounded down in magnitude, C1 clear */
	fnstsw	2(%rdi)
	fchs
	fistpl	4(%rdi)
	add	$8, %rdi
	fninit
	flds	simd_x87(%rip)
	fchs
	fistpl	(%rdi)		/* -2.5 to even: -2, C1 clear */
	fnstsw	4(%rdi)
	add	$6, %rdi
	fldl	simd_x87 + 24(%rip)
	fistpl	(%rdi)		/* -2.75: -3, magnitude rounded up */
	fnstsw	4(%rdi)
	add	$6, %rdi
	fninit
	ret

on_vector3:
	incl	count3(%rip)
	mov	(%rsp), %rax
	mov	%rax, frame_rip(%rip)
	iretq
on_vector80:
on_vector13_soft:
	push	%rax
	mov	8(%rsp), %rax
	mov	%rax, frame_rip(%rip)
	pop	%rax
	iretq
on_ud:	incl	ud_count(%rip)
	addq	$4, (%rsp)		/* past the 4-byte instruction */
	iretq
/* #NP and #GP with an error code: record it, resume at the instruction after. */
on_np:	pop	np_error(%rip)
	jmp	skip
on_pf:	pop	pf_error(%rip)
	push	%rax
	mov	%cr2, %rax
	mov	%rax, pf_cr2(%rip)
	pop	%rax
	jmp	skip
on_gp:	pop	gp_error(%rip)
	incl	gp_count(%rip)
skip:	push	%rax
	mov	fault_skip_from(%rip), %rax
	cmp	%rax, 8(%rsp)
	jne	1f			/* the fault is not where it was expected: stay */
	mov	skip_length(%rip), %al
	movzbq	%al, %rax
	add	%rax, 8(%rsp)
	pop	%rax
	iretq
1:	lea	msg_fault_rip(%rip), %rsi
	jmp	fail

	.include "puts.inc"

msg_ok:		.asciz	"complete64 OK: all checks passed\n"
msg_int3:	.asciz	"FAIL: int3 handler not run once\n"
msg_int3_rip:	.asciz	"FAIL: int3 pushed the wrong RIP\n"
msg_int80:	.asciz	"FAIL: int $0x80 pushed the wrong RIP\n"
msg_int13:	.asciz	"FAIL: int $13 pushed an error code or the wrong RIP\n"
msg_np:		.asciz	"FAIL: not-present gate gave no #NP(0x482)\n"
msg_movbe_ud:	.asciz	"FAIL: register movbe did not raise #UD\n"
msg_stac:	.asciz	"FAIL: stac left AC clear\n"
msg_clac:	.asciz	"FAIL: clac left AC set\n"
msg_cx8_eq:	.asciz	"FAIL: cmpxchg8b (equal)\n"
msg_cx8_ne:	.asciz	"FAIL: cmpxchg8b (not equal)\n"
msg_cx16_gp:	.asciz	"FAIL: misaligned cmpxchg16b did not raise #GP(0)\n"
msg_xgetbv:	.asciz	"FAIL: xgetbv: XCR0 lacks x87\n"
msg_xsetbv:	.asciz	"FAIL: xsetbv 3 did not stick\n"
msg_xsetbv_gp:	.asciz	"FAIL: xsetbv 2 did not raise #GP\n"
msg_fninit:	.asciz	"FAIL: fninit did not reset FSW/FCW\n"
msg_pf:		.asciz	"FAIL: popcnt from an unmapped page: no #PF with CR2 and error 0\n"
msg_noncanonical: .asciz "FAIL: popcnt from a non-canonical address: no #GP\n"
msg_xsave:	.asciz	"FAIL: xsave64 did not store XMM0, ST0 and XSTATE_BV\n"
msg_xrstor:	.asciz	"FAIL: xrstor64 did not load XMM0 and the x87 stack\n"
msg_xrstor_init: .asciz	"FAIL: xrstor64 with SSE not in use left XMM0 as it was\n"
msg_fault_rip:	.asciz	"FAIL: a fault came from an unexpected RIP\n"
msg_differential: .asciz "FAIL: CPL0 (completed) and CPL3 (native) results differ\n"
msg_simd_differential: .asciz "FAIL: SSE/x87 at CPL0 (the fallback) and CPL3 (native) differ\n"

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
count3:		.long	0
ud_count:	.long	0
gp_count:	.long	0
frame_rip:	.quad	0
np_error:	.quad	0
pf_error:	.quad	-1
pf_cr2:		.quad	0
gp_error:	.quad	-1
fault_skip_from: .quad	0
skip_length:	.byte	2
fcw_word:	.word	0
	.align 64
xarea:		.space	576
	.align 16
pattern:	.quad	0x0123456789abcdef, 0xfedcba9876543210
xout:		.quad	0, 0
	.align 16
invpcid_desc:	.quad	0, 0
m8:		.quad	0
	.align 16
m16:		.quad	0, 0, 0, 0
scratch:	.quad	0
	.set TABLE_SIZE, 6 * 2 * 16 + 48 + 2 + 12 * 10
	.align 16
table_a:	.space	TABLE_SIZE
table_b:	.space	TABLE_SIZE
	/* 26 slots of 8 bytes, then the x87 part: 10 + 8 + 4 + 2 + 8 + 8 + 6 + 6 bytes. */
	.set SIMD_SIZE, 26 * 8 + 52
	.align 16
simd_a:		.space	SIMD_SIZE
simd_b:		.space	SIMD_SIZE
	.align 16
simd_in:	.float	1.5, -2.25, 3.0e38, 0.1
	.float	3.0, 0.5, 10.0, 7.0
	.double	2.0, -2.5
	.byte	15, 14, 13, 12, 0x80, 10, 9, 8, 7, 6, 5, 4, 3, 0x82, 1, 0
simd_x87:	.float	2.5
	.long	0
	.double	0.3333333333333333
	.long	7
	.long	0
	.double	-2.75
simd_scratch:	.quad	0
	.align 16
idt:	.space	256 * 16

/*
 * x87env32: fnstenv, fldenv, fnsave, frstor in 32-bit protected mode, checked.
 *
 * The 32-bit counterpart of guests/x87env64.S (which has the fault checks and
 * the differential against the CPU): at CPL0, completed by kvmpy on a PVM
 * host, with every operand through FS, whose base is 0x1000, it checks the
 * 28-, 14-, 108- and 94-byte images of a known state exactly (FCS and FDS
 * aside) and what fldenv keeps of odd control and status words.  No CPL3
 * differential here: on this host x87 instructions other than fninit at
 * 32-bit CPL3 (unpaged protected mode) end in a triple fault (measured:
 * fld1 does), while SSE ones run.  Exit code 0: all passed.
 */
	.code32
	.set DEBUG_EXIT, 0xf4
	.set FS_BASE, 0x1000

	.macro	check cond, message
	j\cond	1f
	mov	$\message, %esi
	jmp	fail
1:
	.endm

	.macro	same got, want, count, message
	mov	$\got, %edi
	mov	$\want, %esi
	mov	$\count, %ecx
	cld
	repe cmpsb
	check	e, \message
	.endm

	/* FCS and FDS of an environment at \at: not compared (see guests/x87env64.S). */
	.macro	mask_selectors at
	movw	$0, \at + 16
	movw	$0, \at + 24
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
	mov	$0x28, %ax		/* data, base FS_BASE */
	mov	%ax, %fs

	fninit
	frstor	%fs:(save_in - FS_BASE)
	fnstenv	%fs:(env_out - FS_BASE)
	mask_selectors env_out
	same	env_out, env_want, 28, msg_fnstenv
	fnstcw	word
	cmpw	$0x37f, word
	check	e, msg_fnstenv

	frstor	%fs:(save_in - FS_BASE)
	fnsave	%fs:(save_out - FS_BASE)
	mask_selectors save_out
	same	save_out, env_want, 28, msg_fnsave
	same	save_out + 28, save_in + 28, 80, msg_fnsave
	fnstsw	%ax
	test	%ax, %ax
	check	z, msg_fnsave

	data16 frstor %fs:(save16_in - FS_BASE)
	data16 fnsave %fs:(save_out - FS_BASE)
	movw	$0, save_out + 8
	movw	$0, save_out + 12
	same	save_out, env16_want, 14, msg_fnsave16
	same	save_out + 14, save_in + 28, 80, msg_fnsave16

	fldenv	%fs:(env_odd - FS_BASE)
	fnstcw	word
	cmpw	$0x1f7f, word
	check	e, msg_fldenv
	fnstsw	%ax
	cmp	$0x7f7f, %ax
	check	e, msg_fldenv
	fninit

	mov	$msg_ok, %esi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
1:	jmp	1b

fail:	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
1:	jmp	1b

	.include "puts.inc"

msg_ok:		.asciz	"x87env32 OK: all checks passed\n"
msg_fnstenv:	.asciz	"FAIL: fnstenv: the 28-byte environment differs, or exceptions unmasked\n"
msg_fnsave:	.asciz	"FAIL: fnsave: the 108-byte image differs, or no fninit after it\n"
msg_fnsave16:	.asciz	"FAIL: 16-bit fnsave: the 94-byte image differs\n"
msg_fldenv:	.asciz	"FAIL: fldenv: FCW/FSW not as the FPU keeps them\n"

	.data
	.align 8
gdtr:	.word	gdt_end - gdt - 1
	.long	gdt
gdt:	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08 kernel code 32 */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0	/* 0x18, 0x20: unused */
	.quad	0
	.quad	0x00cf92001000ffff	/* 0x28 data, base 0x1000 */
gdt_end:

	.include "x87env.inc"
word:		.word	0
env_out:	.space	28
save_out:	.space	108

/*
 * runner_fail: a guest test that fails, for kvmpy's guest runner
 * (`pytest --kvm-guests`, see docs/testing.md).  16-bit real mode at 0x7c00.
 *
 * One check passes and one, comparing against a wrong value on purpose,
 * fails; the guest then exits with code 1 (process status 3): a failure.
 */
	.code16
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.text
	.globl _start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp

	mov	$pass_line, %si
	call	puts
	mov	$6, %ax
	imul	$7, %ax
	cmp	$43, %ax		/* wrong on purpose: 6 * 7 is 42 */
	je	1f
	mov	$fail_line, %si
	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
1:	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt

	.include "puts.inc"

pass_line:	.asciz "PASS: the guest runs\n"
fail_line:	.asciz "FAIL: 6 * 7 == 43\n"

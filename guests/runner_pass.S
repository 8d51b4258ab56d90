/*
 * runner_pass: a guest test that passes, for kvmpy's guest runner
 * (`pytest --kvm-guests`, see docs/testing.md).  16-bit real mode at 0x7c00.
 *
 * Like a kvm-unit-tests test it prints one line per check ("PASS: name",
 * "FAIL: name" or "SKIP: name"), then exits through the debug-exit port:
 * code 0 (process status 1) when every check passed, 1 otherwise.
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
	xor	%bl, %bl		/* failures so far */

	mov	$40, %ax		/* check 1: arithmetic */
	add	$2, %ax
	cmp	$42, %ax
	mov	$add_name, %si
	call	report

	smsw	%ax			/* check 2: still in real mode */
	test	$1, %al
	mov	$real_name, %si
	call	report

	mov	$skip_line, %si		/* a check this guest does not do, reported as such */
	call	puts

	mov	%bl, %al		/* 0 if every check passed */
	out	%al, $DEBUG_EXIT
	hlt

/* Print "PASS: " or "FAIL: " by ZF (set: pass), then the name at SI. */
report:
	push	%si
	mov	$pass, %si
	jz	1f
	mov	$fail, %si
	mov	$1, %bl
1:	call	puts
	pop	%si
	call	puts
	ret

	.include "puts.inc"

pass:		.asciz "PASS: "
fail:		.asciz "FAIL: "
add_name:	.asciz "40 + 2 == 42\n"
real_name:	.asciz "CR0.PE is clear\n"
skip_line:	.asciz "SKIP: protected-mode checks (see protected_hello)\n"

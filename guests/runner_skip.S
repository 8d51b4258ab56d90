/*
 * runner_skip: a guest test that skips unless it has two vCPUs, for kvmpy's
 * guest runner (`pytest --kvm-guests`, see docs/testing.md).  16-bit real
 * mode at 0x7c00.
 *
 * It asks QEMU's fw_cfg for the CPU count (key 0x05).  With fewer than two
 * it prints "SKIP: ..." and exits with code 38 (process status 77), which
 * kvm-unit-tests and kvmpy's runner read as "skipped"; else it passes.
 */
	.code16
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set FW_CFG_SELECTOR, 0x510
	.set FW_CFG_DATA, 0x511
	.set FW_CFG_NB_CPUS, 0x05
	.set SKIP_CODE, 38

	.text
	.globl _start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp

	mov	$FW_CFG_SELECTOR, %dx
	mov	$FW_CFG_NB_CPUS, %ax
	out	%ax, %dx
	mov	$FW_CFG_DATA, %dx
	in	%dx, %al		/* the count's low byte is enough here */
	cmp	$2, %al
	jb	skip

	mov	$pass_line, %si
	call	puts
	xor	%al, %al
	out	%al, $DEBUG_EXIT

skip:
	mov	$skip_line, %si
	call	puts
	mov	$SKIP_CODE, %al
	out	%al, $DEBUG_EXIT
	hlt

	.include "puts.inc"

pass_line:	.asciz "PASS: fw_cfg counts at least two CPUs\n"
skip_line:	.asciz "SKIP: needs two CPUs (run with cpus = 2)\n"

/*
 * real_hello: the smallest useful guest.  16-bit real mode, loaded at 0x7c00.
 *
 * It greets over the COM1 UART, proves it really runs in real mode (CR0.PE
 * is clear and segment:offset addressing works), and exits through the
 * debug-exit port: code 0 on success (process status 1), 1 on failure.
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

	call	uart_init
	mov	$hello, %si
	call	puts

	/* Check 1: protected mode is off. */
	smsw	%ax
	test	$1, %al
	jnz	fail

	/* Check 2: 0x2000:0x0010 and 0x2001:0x0000 name the same byte (0x20010). */
	mov	$0x2000, %ax
	mov	%ax, %es
	movw	$0xbeef, %es:0x10
	mov	$0x2001, %ax
	mov	%ax, %es
	cmpw	$0xbeef, %es:0
	jne	fail

	mov	$ok, %si
	call	puts
	xor	%al, %al
	jmp	exit

fail:
	mov	$bad, %si
	call	puts
	mov	$1, %al
exit:
	out	%al, $DEBUG_EXIT
	hlt			/* not reached: the VMM stops at the debug exit */

/* 115200 baud, 8N1, FIFOs on. */
uart_init:
	mov	$COM1 + 3, %dx
	mov	$0x80, %al	/* LCR: DLAB=1 to reach the divisor latch */
	out	%al, %dx
	mov	$COM1, %dx
	mov	$1, %al		/* divisor 1 = 115200 baud */
	out	%al, %dx
	inc	%dx
	xor	%al, %al
	out	%al, %dx
	mov	$COM1 + 3, %dx
	mov	$0x03, %al	/* LCR: 8 data bits, no parity, 1 stop bit */
	out	%al, %dx
	mov	$COM1 + 2, %dx
	mov	$0x07, %al	/* FCR: enable and clear the FIFOs */
	out	%al, %dx
	ret

	.include "puts.inc"

hello:	.asciz	"Hello from real mode!\n"
ok:	.asciz	"real mode OK: CR0.PE=0, segment:offset addressing works\n"
bad:	.asciz	"FAIL: not in real mode\n"

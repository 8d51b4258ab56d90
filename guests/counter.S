/*
 * counter: counts to 20, one line per byte it receives on COM1.
 *
 * For snapshot tests: stop it half-way, save it, restore it in another
 * process, and the rest of the count must follow as if nothing happened.
 * Waiting for input makes "half-way" a place, not a moment.
 */
	.code16
	.set COM1, 0x3f8
	.set LSR_DATA_READY, 0x01
	.set LSR_THR_EMPTY, 0x20
	.set COUNT, 20

	.text
	.globl _start
_start:
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp
	xor	%bx, %bx		/* the count */

next:	mov	$COM1 + 5, %dx		/* wait for a byte from the host */
1:	in	%dx, %al
	test	$LSR_DATA_READY, %al
	jz	1b
	mov	$COM1, %dx
	in	%dx, %al		/* and take it */

	mov	$label, %si
	call	puts
	mov	%bx, %ax		/* two decimal digits */
	mov	$10, %cl
	div	%cl
	add	$'0', %al
	call	putc
	mov	%ah, %al
	add	$'0', %al
	call	putc
	mov	$'\n', %al
	call	putc

	inc	%bx
	cmp	$COUNT, %bx
	jb	next
	xor	%al, %al
	out	%al, $0xf4
	hlt

	.include "puts.inc"

label:	.asciz	"count "

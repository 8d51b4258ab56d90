/*
 * chatty: prints the same line on COM1 forever, as fast as the UART takes it.
 * For bench/rss_stress.py: kvmpy's console must stay bounded under it.
 */
	.code16
	.text
	.globl _start
_start:
	cli
1:	mov	$line, %si
	call	puts
	jmp	1b

	.include "puts.inc"

line:
	.asciz	"chatty: a line that never ends, and then another one\n"

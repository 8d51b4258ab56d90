/*
 * triple_fault: a long-mode guest that dies on purpose, to show crash reports.
 *
 * kvmpy starts it with an empty IDT, so the #UD from ud2 cannot be delivered:
 * that becomes #GP, then a double fault, then a triple fault (shutdown).
 */
	.code64
	.text
	.globl _start
_start:
	mov	$0x1234, %rax
	ud2

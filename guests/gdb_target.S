/*
 * gdb_target: a small long-mode guest to debug with `kvmpy run --gdb`.
 *
 * It adds RDX (1) to the data word `counter`, prints the sum over COM1 as
 * "counter=<16 hex digits>" and exits with code 0 through the debug-exit
 * port.  The global labels are places to stop: `marker` (a nop before the
 * work), `load`, `store` (the instruction that writes `counter`),
 * `after_store` and `done`.  The tests (tests/test_gdbstub.py) link the same
 * object as an ELF file so that gdb knows these symbols.
 */
	.code64
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.text
	.globl _start, marker, load, store, after_store, done, counter
_start:
	lea	hello(%rip), %rsi
	call	puts
	mov	$1, %edx
marker:
	nop
load:
	mov	counter(%rip), %rax
	add	%rdx, %rax
store:
	mov	%rax, counter(%rip)
after_store:
	lea	result(%rip), %rsi
	call	puts
	mov	counter(%rip), %rax
	call	puthex
	mov	$'\n', %al
	call	putc
done:
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
	hlt

/* Print RAX as 16 hex digits. */
puthex:
	mov	%rax, %rbx
	mov	$16, %ecx
1:	rol	$4, %rbx
	mov	%bl, %al
	and	$0xf, %al
	add	$'0', %al
	cmp	$'9', %al
	jbe	2f
	add	$('a' - '9' - 1), %al
2:	call	putc
	dec	%ecx
	jnz	1b
	ret

	.include "puts.inc"

hello:	.asciz	"gdb_target: running\n"
result:	.asciz	"counter="
	.balign	8
counter:
	.quad	0x1000

/*
 * protected_hello: a guest that starts in 32-bit flat protected mode at 1 MiB.
 *
 * kvmpy enters it with CR0.PE set, paging off, and flat 4 GiB code and data
 * segments whose default operand size is 32 bits.  It checks those from the
 * inside, says so over COM1, and exits through the debug-exit port: code 0
 * on success (process status 1), 1 on failure.
 */
	.code32
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.text
	.globl _start
_start:
	mov	$hello, %esi
	call	puts

	/* Check 1: protection on, paging off. */
	mov	%cr0, %eax
	test	$1, %eax		/* CR0.PE */
	jz	fail
	test	%eax, %eax		/* CR0.PG is bit 31, the sign bit */
	js	fail

	/* Check 2: 32-bit operands: in 16-bit code this dec would only touch AX. */
	xor	%eax, %eax
	dec	%eax
	shr	$16, %eax
	cmp	$0xffff, %eax
	jne	fail

	/* Check 3: the data segment is flat: a byte at 4 MiB, far past a 64 KiB limit. */
	movl	$0x600dcafe, 0x400000
	cmpl	$0x600dcafe, 0x400000
	jne	fail

	mov	$ok, %esi
	call	puts
	xor	%eax, %eax
	jmp	exit

fail:
	mov	$bad, %esi
	call	puts
	mov	$1, %eax
exit:
	out	%al, $DEBUG_EXIT
	hlt

	.include "puts.inc"

hello:	.asciz	"Hello from 32-bit protected mode!\n"
ok:	.asciz	"protected mode OK: CR0.PE=1, CR0.PG=0, 32-bit operands, flat segments\n"
bad:	.asciz	"FAIL: not in flat 32-bit protected mode\n"

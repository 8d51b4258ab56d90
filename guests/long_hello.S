/*
 * long_hello: a guest that starts in 64-bit long mode at 1 MiB.
 *
 * kvmpy enters it with paging on (2 MiB identity-mapped pages), EFER.LME and
 * LMA set and a 64-bit code segment.  It checks each of those from the
 * inside, says so over COM1, and exits through the debug-exit port:
 * code 0 on success (process status 1), 1 on failure.
 */
	.code64
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set MSR_EFER, 0xc0000080
	.set EFER_LMA, 1 << 10
	.set CR0_PG, 1 << 31
	.set CR4_PAE, 1 << 5

	.text
	.globl _start
_start:
	lea	hello(%rip), %rsi
	call	puts

	/* Check 1: EFER.LMA says long mode is active. */
	mov	$MSR_EFER, %ecx
	rdmsr
	test	$EFER_LMA, %eax
	jz	fail

	/* Check 2: paging with PAE is on. */
	mov	%cr0, %rax
	bt	$31, %rax
	jnc	fail
	mov	%cr4, %rax
	test	$CR4_PAE, %eax
	jz	fail

	/* Check 3: 64-bit operands work (this would truncate in 32-bit code). */
	movabs	$0x123456789, %rax
	shr	$32, %rax
	cmp	$1, %rax
	jne	fail

	/* Check 4: we run above 1 MiB, where kvmpy loaded us. */
	lea	_start(%rip), %rax
	cmp	$0x100000, %rax
	jne	fail

	lea	ok(%rip), %rsi
	call	puts
	xor	%eax, %eax
	jmp	exit

fail:
	lea	bad(%rip), %rsi
	call	puts
	mov	$1, %eax
exit:
	out	%al, $DEBUG_EXIT
	hlt

	.include "puts.inc"

hello:	.asciz	"Hello from 64-bit long mode!\n"
ok:	.asciz	"long mode OK: EFER.LMA=1, CR0.PG=1, CR4.PAE=1, 64-bit operands, running at 0x100000\n"
bad:	.asciz	"FAIL: not in long mode\n"

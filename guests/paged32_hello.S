/*
 * paged32_hello: a guest that starts in 32-bit protected mode with paging.
 *
 * kvmpy enters it at 1 MiB with CR0.PG set and CR3 pointing at a page
 * directory of 4 MiB pages (CR4.PSE) that maps every address to itself.  To
 * prove that paging is really on, the guest maps a second, virtual window
 * at 1 GiB onto the first 4 MiB and sees the same bytes through both.
 * Exits through the debug-exit port: code 0 on success, 1 on failure.
 */
	.code32
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set CR4_PSE, 1 << 4
	.set CR4_PAE, 1 << 5
	.set WINDOW, 0x40000000		/* 1 GiB: PDE index 256 */
	.set PDE_4M_RW, 0x83		/* present, writable, 4 MiB page */

	.text
	.globl _start
_start:
	mov	$hello, %esi
	call	puts

	/* Check 1: paging on, 32-bit (non-PAE) paging with 4 MiB pages. */
	mov	%cr0, %eax
	test	%eax, %eax		/* CR0.PG is the sign bit */
	jns	fail
	mov	%cr4, %eax
	test	$CR4_PSE, %eax
	jz	fail
	test	$CR4_PAE, %eax
	jnz	fail

	/* Check 2: alias virtual 1 GiB to physical 0 and read our own message
	 * through the alias. */
	mov	%cr3, %ebx
	movl	$PDE_4M_RW, (WINDOW >> 22) * 4(%ebx)
	invlpg	WINDOW + hello
	mov	WINDOW + hello, %eax
	cmp	hello, %eax
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

hello:	.asciz	"Hello from 32-bit paged protected mode!\n"
ok:	.asciz	"paged32 OK: CR0.PG=1, CR4.PSE=1, CR4.PAE=0, a 4 MiB alias at 1 GiB reads our code\n"
bad:	.asciz	"FAIL: paging is not what it should be\n"

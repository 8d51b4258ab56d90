/*
 * stress_io: a hostile guest for bench/rss_stress.py.  It never stops.
 *
 * Forever, from an xorshift64 generator: write a random value of a random
 * width to a random port below 0x1000 (skipping the ones that would end the
 * run: debug-exit, the resets, ACPI power-off), then read or write 1 to 8
 * bytes at a random offset around the test device's page end and in
 * unclaimed MMIO space, so accesses cross page and device boundaries, and
 * every 64th round print a line on COM1.  kvmpy must survive it with its
 * memory flat.
 */
	.code64
	.set COM1, 0x3f8
	.set TESTDEV_END, 0xfeb01000
	.set UNCLAIMED, 0xd0000000

	.text
	.globl _start
_start:
	cli
	movabs	$0x9e3779b97f4a7c15, %r15	/* generator state */
	xor	%r14d, %r14d			/* round counter */
round:
	call	next
	mov	%eax, %edx
	and	$0xfff, %edx
	/* Ports that stop or reset the machine: leave them alone. */
	cmp	$0xf4, %dx
	jb	1f
	cmp	$0xf7, %dx
	jbe	mmio
1:	cmp	$0x92, %dx
	je	mmio
	cmp	$0x64, %dx
	je	mmio
	cmp	$0x600, %dx
	jb	2f
	cmp	$0x60f, %dx
	jbe	mmio
2:	cmp	$0xcf9, %dx
	je	mmio
	mov	%edx, %ecx			/* the PICs (0x20, 0x21, 0xa0, 0xa1): no stray vectors */
	and	$0xff7e, %ecx
	cmp	$0x20, %ecx
	je	mmio
	cmp	$0xa0, %ecx
	je	mmio
3:	mov	%r15, %rax
	shr	$40, %rax
	test	$1, %al
	jz	4f
	out	%al, %dx
	jmp	mmio
4:	test	$2, %al
	jz	5f
	out	%ax, %dx
	jmp	mmio
5:	out	%eax, %dx
	in	%dx, %al

mmio:
	call	next
	mov	%eax, %ebx
	and	$0xf, %ebx			/* an offset from 8 bytes below the page end */
	mov	$TESTDEV_END - 8, %edi
	test	$0x100, %eax
	jz	6f
	mov	$UNCLAIMED + 0xff8, %edi
6:	add	%rbx, %rdi
	mov	%r15, %rcx
	shr	$33, %rcx
	and	$7, %ecx			/* which access, below */
	lea	accesses(%rip), %rsi
	jmp	*(%rsi,%rcx,8)
acc_read1:	movb	(%rdi), %al
	jmp	chat
acc_read2:	movw	(%rdi), %ax
	jmp	chat
acc_read4:	movl	(%rdi), %eax
	jmp	chat
acc_read8:	movq	(%rdi), %rax
	jmp	chat
acc_write1:	movb	%r15b, (%rdi)
	jmp	chat
acc_write2:	movw	%r15w, (%rdi)
	jmp	chat
acc_write4:	movl	%r15d, (%rdi)
	jmp	chat
acc_write8:	movq	%r15, (%rdi)

chat:
	inc	%r14
	test	$63, %r14
	jnz	round
	lea	line(%rip), %rsi
	call	puts
	jmp	round

/* xorshift64: the next value in %rax (and the state in %r15). */
next:
	mov	%r15, %rax
	shl	$13, %rax
	xor	%rax, %r15
	mov	%r15, %rax
	shr	$7, %rax
	xor	%rax, %r15
	mov	%r15, %rax
	shl	$17, %rax
	xor	%rax, %r15
	mov	%r15, %rax
	ret

	.include "puts.inc"

	.section .rodata
	.balign	8
accesses:
	.quad	acc_read1, acc_read2, acc_read4, acc_read8
	.quad	acc_write1, acc_write2, acc_write4, acc_write8
line:
	.asciz	"stress_io: still here, writing ports and MMIO at random\n"

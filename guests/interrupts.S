/*
 * interrupts: a 64-bit guest that takes hardware interrupts.
 *
 * It points an IDT gate at a handler for vector 0x20, enables the local APIC
 * (KVM's in-kernel one, at 0xFEE00000) and starts its timer in periodic
 * mode.  Then it halts; each timer interrupt wakes it, the handler counts
 * the tick and signals end-of-interrupt, and after three ticks the guest
 * stops the timer and exits with code 0.  The handler returns with iretq
 * (on PVM hosts a 32-bit iret cannot be emulated, a 64-bit one can).
 */
	.code64
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set CODE_SELECTOR, 0x10	/* the code segment kvmpy's GDT gives us */
	.set TIMER_VECTOR, 0x20
	.set LAPIC, 0xfee00000
	.set LAPIC_EOI, 0xb0
	.set LAPIC_SVR, 0xf0		/* spurious vector register: bit 8 enables */
	.set LAPIC_LVT_TIMER, 0x320
	.set LAPIC_TIMER_INITIAL, 0x380
	.set LAPIC_TIMER_DIVIDE, 0x3e0
	.set LVT_PERIODIC, 1 << 17
	.set LVT_MASKED, 1 << 16
	.set TICKS, 3

	.text
	.globl _start
_start:
	/* IDT gate for the timer: a 64-bit interrupt gate (type 0xE, present). */
	lea	timer_handler(%rip), %rax
	lea	idt + TIMER_VECTOR * 16(%rip), %rdi
	mov	%ax, (%rdi)			/* offset 15:0 */
	movw	$CODE_SELECTOR, 2(%rdi)
	movw	$0x8e00, 4(%rdi)		/* present, DPL 0, interrupt gate */
	shr	$16, %rax
	mov	%ax, 6(%rdi)			/* offset 31:16 */
	shr	$16, %rax
	mov	%eax, 8(%rdi)			/* offset 63:32 */
	lidt	idtr(%rip)

	movabs	$LAPIC, %rbx
	movl	$0x1ff, LAPIC_SVR(%rbx)		/* enable, spurious vector 0xff */
	movl	$0xb, LAPIC_TIMER_DIVIDE(%rbx)	/* divide by 1 */
	movl	$(TIMER_VECTOR | LVT_PERIODIC), LAPIC_LVT_TIMER(%rbx)
	movl	$1000000, LAPIC_TIMER_INITIAL(%rbx)

wait:	sti
	hlt				/* sleep until the next interrupt */
	cli
	cmpl	$TICKS, ticks(%rip)
	jb	wait

	movl	$LVT_MASKED, LAPIC_LVT_TIMER(%rbx)
	lea	done(%rip), %rsi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
	hlt

timer_handler:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	incl	ticks(%rip)
	lea	tick(%rip), %rsi
	call	puts
	movabs	$LAPIC, %rax
	movl	$0, LAPIC_EOI(%rax)	/* end of interrupt */
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq

	.include "puts.inc"

tick:	.asciz	"tick\n"
done:	.asciz	"three timer interrupts taken\n"

	.data
	.align 16
idtr:	.word	256 * 16 - 1
	.quad	idt
ticks:	.long	0
	.align 16
idt:	.space	256 * 16

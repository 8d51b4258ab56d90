/*
 * exit_cycles: guest-measured cost of three exits, in TSC cycles per operation.
 *
 * A flat Multiboot kernel (the a.out kludge: loaded at 1 MiB as it is), so
 * that kvmpy, QEMU's -kernel and bench/guest_exit_cycles_ref.c all run the
 * same bytes in 32-bit protected mode.  It times with rdtsc N = 20000 of
 * each: `in` from pc-testdev's scratch port 0xe0 (an exit to the VMM in user
 * space), a 32-bit read of pc-testdev's MMIO window at 0xff000000 (the
 * same, through the instruction emulator), `cpuid` (answered inside KVM),
 * then `in` from port 0x99 and a read of 0xd0000000, which no device
 * claims; prints "port N", "mmio N", "cpuid N", "uport N", "ummio N" on
 * COM1 and exits with code 0.
 */
	.set MB_MAGIC, 0x1badb002
	.set MB_FLAGS, 1 << 16			/* the address fields below */
	.set LOAD_ADDR, 0x100000
	.set DEBUG_EXIT, 0xf4
	.set ROUNDS, 20000

	.code32
	.text
	.globl _start
_start:
	jmp	start
	.align 4
header:
	.long	MB_MAGIC
	.long	MB_FLAGS
	.long	-(MB_MAGIC + MB_FLAGS)
	.long	header			/* header_addr */
	.long	LOAD_ADDR		/* load_addr */
	.long	0			/* load_end_addr: the whole file */
	.long	0			/* bss_end_addr: none */
	.long	start			/* entry_addr */

start:
	mov	$0x80000, %esp

	mov	$port_label, %esi
	mov	$time_port, %ebx
	call	measure
	mov	$mmio_label, %esi
	mov	$time_mmio, %ebx
	call	measure
	mov	$cpuid_label, %esi
	mov	$time_cpuid, %ebx
	call	measure
	mov	$uport_label, %esi
	mov	$time_unclaimed_port, %ebx
	call	measure
	mov	$ummio_label, %esi
	mov	$time_unclaimed_mmio, %ebx
	call	measure

	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt

/* measure: print the label at ESI, then the cycles per round of the loop at EBX. */
measure:
	call	puts
	call	*%ebx			/* warm-up round */
	rdtsc
	mov	%eax, %edi
	mov	%edx, %ebp
	call	*%ebx
	rdtsc
	sub	%edi, %eax
	sbb	%ebp, %edx
	mov	$ROUNDS, %ecx
	div	%ecx			/* EAX = cycles per operation */
	call	print_decimal
	mov	$'\n', %al
	call	putc
	ret

time_port:
	mov	$ROUNDS, %ecx
1:	in	$0xe0, %eax
	dec	%ecx
	jnz	1b
	ret

time_mmio:
	mov	$ROUNDS, %ecx
	mov	$0xff000000, %esi
1:	mov	(%esi), %eax
	dec	%ecx
	jnz	1b
	ret

time_unclaimed_port:
	mov	$ROUNDS, %ecx
1:	in	$0x99, %al
	dec	%ecx
	jnz	1b
	ret

time_unclaimed_mmio:
	mov	$ROUNDS, %ecx
	mov	$0xd0000000, %esi
1:	mov	(%esi), %eax
	dec	%ecx
	jnz	1b
	ret

time_cpuid:
	push	%ebx			/* cpuid writes EBX */
	mov	$ROUNDS, %esi
1:	xor	%eax, %eax
	xor	%ecx, %ecx
	cpuid
	dec	%esi
	jnz	1b
	pop	%ebx
	ret

/* print_decimal: EAX in decimal on COM1.  Clobbers EAX, ECX, EDX. */
print_decimal:
	push	%ebx
	mov	$10, %ebx
	xor	%ecx, %ecx
1:	xor	%edx, %edx
	div	%ebx
	push	%edx
	inc	%ecx
	test	%eax, %eax
	jnz	1b
2:	pop	%eax
	add	$'0', %al
	push	%ecx
	call	putc
	pop	%ecx
	loop	2b
	pop	%ebx
	ret

	.include "puts.inc"

port_label:	.asciz "port "
mmio_label:	.asciz "mmio "
cpuid_label:	.asciz "cpuid "
uport_label:	.asciz "uport "
ummio_label:	.asciz "ummio "

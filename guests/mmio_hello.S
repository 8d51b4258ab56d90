/*
 * mmio_hello: memory-mapped I/O from a 64-bit guest.
 *
 * There is no RAM at 0xFEB00000: kvmpy's test device lives there.  Each load
 * or store to it leaves the guest with KVM_EXIT_MMIO, and kvmpy's MMIO bus
 * hands the access to the device.  The guest reads the device's ID, writes
 * and reads back its scratch register, and exits with code 0 on success.
 */
	.code64
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set TESTDEV, 0xfeb00000
	.set TESTDEV_ID, 0x00
	.set TESTDEV_SCRATCH, 0x04

	.text
	.globl _start
_start:
	movabs	$TESTDEV, %rbx

	lea	id_is(%rip), %rsi
	call	puts
	mov	TESTDEV_ID(%rbx), %eax	/* an MMIO read: "KVMP" */
	mov	%eax, id(%rip)
	lea	id(%rip), %rsi
	call	puts

	movl	$0x12345678, TESTDEV_SCRATCH(%rbx)	/* an MMIO write */
	cmpl	$0x12345678, TESTDEV_SCRATCH(%rbx)	/* and a read back */
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

id_is:	.asciz	"test device id: "
ok:	.asciz	"\nscratch register: wrote 0x12345678, read it back\n"
bad:	.asciz	"\nFAIL: the scratch register did not keep its value\n"
	.data
id:	.long	0
	.byte	0

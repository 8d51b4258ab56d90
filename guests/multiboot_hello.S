/*
 * multiboot_hello: the smallest Multiboot v1 kernel, an ELF32 file.
 *
 * Any multiboot loader (kvmpy, QEMU's -kernel, GRUB) enters it in 32-bit
 * protected mode with EAX = 0x2BADB002 and EBX = the multiboot information.
 * It checks the magic, prints the command line it was given, and exits
 * through the debug-exit port: code 0 on success, 1 on failure.
 */
	.set MB_MAGIC, 0x1badb002
	.set MB_FLAGS, 0x3		/* page-align modules, give memory info */
	.set MB_BOOT_MAGIC, 0x2badb002
	.set MBI_FLAG_CMDLINE, 1 << 2
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.section .multiboot, "a"
	.align 4
	.long	MB_MAGIC
	.long	MB_FLAGS
	.long	-(MB_MAGIC + MB_FLAGS)

	.code32
	.text
	.globl _start
_start:
	mov	$stack_top, %esp
	mov	%ebx, %edi		/* keep the info pointer */
	cmp	$MB_BOOT_MAGIC, %eax
	jne	fail

	mov	$hello, %esi
	call	puts
	testl	$MBI_FLAG_CMDLINE, (%edi)	/* mbi.flags */
	jz	fail
	mov	16(%edi), %esi		/* mbi.cmdline */
	call	puts
	mov	$newline, %esi
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

	.section .rodata
hello:	.asciz	"Hello from a multiboot kernel! command line: "
newline: .asciz	"\n"
bad:	.asciz	"FAIL: not started by a multiboot loader\n"

	.bss
	.align 16
	.space 4096
stack_top:

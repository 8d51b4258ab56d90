/*
 * pvh_hello: a PVH kernel, the other ELF that QEMU's -kernel boots.
 *
 * Its "Xen" ELF note (XEN_ELFNOTE_PHYS32_ENTRY) says where to enter: in
 * 32-bit protected mode, paging off, with EBX pointing at a
 * struct hvm_start_info.  The kernel checks the structure's magic, prints
 * its command line and the number of memory-map entries, and exits.
 */
	.set HVM_START_MAGIC, 0x336ec578
	.set XEN_ELFNOTE_PHYS32_ENTRY, 18
	.set DEBUG_EXIT, 0xf4

	.section .note.Xen, "a"
	.align 4
	.long	4			/* name size */
	.long	4			/* descriptor size */
	.long	XEN_ELFNOTE_PHYS32_ENTRY
	.asciz	"Xen"
	.long	pvh_start

	.code32
	.text
	.globl pvh_start
pvh_start:
	mov	$stack_top, %esp
	mov	%ebx, %edi		/* the start info */
	cmpl	$HVM_START_MAGIC, (%edi)
	jne	fail
	mov	$hello, %esi
	call	puts
	mov	24(%edi), %esi		/* cmdline_paddr (low half) */
	call	puts
	mov	$entries, %esi
	call	puts
	mov	48(%edi), %eax		/* memmap_entries */
	add	$'0', %al
	mov	%al, digit
	mov	$digit, %esi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
fail:
	mov	$bad, %esi
	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT

	.include "puts.inc"

	.section .rodata
hello:	.asciz	"Hello from a PVH kernel! command line: "
entries: .asciz	"\nmemory map entries: "
bad:	.asciz	"FAIL: no hvm_start_info\n"
	.data
digit:	.asciz	"?\n"
	.bss
	.align 16
	.space 4096
stack_top:

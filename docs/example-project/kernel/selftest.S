/*
 * The example kernel's self-test: checks how it was booted, kvm-unit-tests
 * style.  One "PASS: name" or "FAIL: name" line per check, then debug-exit
 * code 0 (status 1) if all passed, 1 (status 3) if not.  kvmpy's guest
 * runner (guests/guests.toml) turns that into a pytest pass or failure.
 */
	.set MB_MAGIC, 0x1badb002
	.set MB_FLAGS, 0
	.set MB_BOOT_MAGIC, 0x2badb002
	.set CR0_PE, 1
	.set CR0_PG, 1 << 31
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4

	.section .multiboot, "a"
	.align 4
	.long	MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

	.code32
	.text
	.globl _start
_start:
	mov	$stack_top, %esp
	xor	%edi, %edi			/* failures so far */

	cmp	$MB_BOOT_MAGIC, %eax		/* ZF set: a pass */
	mov	$magic_name, %esi
	call	report

	mov	%cr0, %eax
	not	%eax				/* ZF set if CR0.PE is set */
	test	$CR0_PE, %eax
	mov	$protected_name, %esi
	call	report

	mov	%cr0, %eax
	test	$CR0_PG, %eax			/* ZF set if CR0.PG is clear */
	mov	$paging_name, %esi
	call	report

	mov	%edi, %eax
	out	%al, $DEBUG_EXIT
	hlt

/* Print "PASS: " if ZF is set, else "FAIL: " (and count it), then the name at ESI. */
report:
	push	%esi
	mov	$pass, %esi
	jz	1f
	mov	$fail, %esi
	mov	$1, %edi
1:	call	puts
	pop	%esi
	call	puts
	ret

/* Print the NUL-terminated string at ESI. */
puts:
	mov	$COM1, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	ret

	.section .rodata
pass:		.asciz "PASS: "
fail:		.asciz "FAIL: "
magic_name:	.asciz "entered by a multiboot loader\n"
protected_name:	.asciz "in protected mode\n"
paging_name:	.asciz "paging is off\n"

	.bss
	.align 16
	.skip 4096
stack_top:

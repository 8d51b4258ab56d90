/*
 * The example kernel: a multiboot kernel with a tiny shell on COM1.
 *
 * It prints its command line, then a "> " prompt, and reads a line: "quit"
 * exits through QEMU's debug-exit port with code 0 (status 1, success);
 * anything else is echoed back as "echo: LINE" before the next prompt.
 * Runs the same under qemu-system-x86_64 -kernel and under kvmpy.
 */
	.set MB_MAGIC, 0x1badb002
	.set MB_FLAGS, 0
	.set MBI_FLAG_CMDLINE, 1 << 2
	.set COM1, 0x3f8
	.set COM1_LSR, COM1 + 5
	.set LSR_DATA_READY, 1
	.set DEBUG_EXIT, 0xf4
	.set LINE_MAX, 79

	.section .multiboot, "a"
	.align 4
	.long	MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

	.code32
	.text
	.globl _start
_start:
	mov	$stack_top, %esp
	mov	$booted, %esi
	call	puts
	mov	$nothing, %esi
	testl	$MBI_FLAG_CMDLINE, (%ebx)	/* mbi.flags */
	jz	1f
	mov	16(%ebx), %esi			/* mbi.cmdline */
1:	call	puts
	mov	$quote_newline, %esi
	call	puts

prompt:
	mov	$prompt_text, %esi
	call	puts
	mov	$line, %edi
read:
	call	getc
	cmp	$'\r', %al
	je	read
	cmp	$'\n', %al
	je	got_line
	cmp	$line + LINE_MAX, %edi		/* keep what fits */
	jae	read
	stosb
	jmp	read
got_line:
	movb	$0, (%edi)
	mov	$line, %esi
	mov	$quit, %edi
	call	streq
	je	bye
	mov	$echo, %esi
	call	puts
	mov	$line, %esi
	call	puts
	mov	$newline, %esi
	call	puts
	jmp	prompt

bye:
	mov	$goodbye, %esi
	call	puts
	xor	%eax, %eax
	out	%al, $DEBUG_EXIT
	hlt

/* Wait for a byte from COM1 and return it in AL. */
getc:
	mov	$COM1_LSR, %dx
1:	in	%dx, %al
	test	$LSR_DATA_READY, %al
	jz	1b
	mov	$COM1, %dx
	in	%dx, %al
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

/* ZF set if the strings at ESI and EDI are equal. */
streq:
	mov	(%esi), %al
	cmp	(%edi), %al
	jne	1f
	inc	%esi
	inc	%edi
	test	%al, %al
	jnz	streq
1:	ret

	.section .rodata
booted:		.asciz "example kernel: booted, command line \""
nothing:	.asciz ""
quote_newline:	.asciz "\"\n"
prompt_text:	.asciz "> "
quit:		.asciz "quit"
echo:		.asciz "echo: "
newline:	.asciz "\n"
goodbye:	.asciz "bye\n"

	.bss
line:	.skip LINE_MAX + 1
	.align 16
	.skip 4096
stack_top:

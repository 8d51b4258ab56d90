/*
 * s3_wake64: ACPI S3 resume at the FACS x_firmware_waking_vector, in the mode
 * the ACPI spec says, twice: 32-bit, then 64-bit.  PASS when both check out.
 *
 * 64-bit long mode at 1 MiB (CPL0, identity map).  It finds the FADT and the
 * FACS through the RSDP and checks the FACS is version 2 or later with
 * 64BIT_WAKE_SUPPORTED_F.  Then:
 *  1. x_firmware_waking_vector = resume32, OSPM flags without 64BIT_WAKE_F:
 *     sleep (SLP_TYP 1, woken by the RTC alarm).  resume32 must run in 32-bit
 *     flat protected mode with paging off (CR0.PE set, CR0.PG clear, EFER.LMA
 *     clear, CS and DS based at 0).
 *  2. From there, x_firmware_waking_vector = resume64 with 64BIT_WAKE_F set:
 *     sleep again.  resume64 must run in long mode (EFER.LMA, CR0.PG), with
 *     RAM kept and WAK_STS set; then it prints PASS and exits with code 0.
 * Any failed check exits with its number (2-9) as the debug-exit code.
 */
	.set DEBUG_EXIT, 0xf4
	.set COM1, 0x3f8
	.set RTC_INDEX, 0x70
	.set RTC_DATA, 0x71
	.include "rtc_alarm.inc"
	.set SLP_S3, (1 << 10) | (1 << 13)	/* SLP_TYP 1 (\_S3), SLP_EN */
	.set RTC_EN, 1 << 10
	.set WAK_STS, 1 << 15
	.set FACS_FLAGS, 20
	.set FACS_X_VECTOR, 24
	.set FACS_VERSION, 32
	.set FACS_OSPM_FLAGS, 36
	.set WAKE64_SUPPORTED, 1 << 1
	.set WAKE64, 1 << 0
	.set EFER, 0xc0000080
	.set EFER_LMA, 1 << 10
	.set CR0_PE, 1 << 0
	.set CR0_PG, 1 << 31
	.set STACK, 0x80000

/* Set the RTC alarm two seconds ahead (rtc_alarm.inc), clear PM1 status,
 * enable the RTC wake and enter S3.  Mode-neutral code: port I/O and 32-bit
 * moves through absolute addresses below 4 GiB only. */
.macro sleep_until_alarm
	rtc_alarm_in_two_seconds
	movl	pm1a_evt, %edx
	mov	$0xffff, %ax
	out	%ax, %dx
	add	$2, %edx
	mov	$RTC_EN, %ax
	out	%ax, %dx
	movl	pm1a_cnt, %edx
	mov	$SLP_S3, %ax
	out	%ax, %dx
	/* Still running: the machine did not sleep. */
	mov	$9, %al
	out	%al, $DEBUG_EXIT
	hlt
.endm

	.text
	.code64
	.globl _start
_start:
	cli
	/* The RSDP: "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff. */
	mov	$0xe0000, %esi
1:	cmpl	$0x20445352, (%rsi)		/* "RSD " */
	jne	2f
	cmpl	$0x20525450, 4(%rsi)		/* "PTR " */
	je	3f
2:	add	$16, %esi
	cmp	$0x100000, %esi
	jb	1b
	mov	$2, %al
	jmp	fail64
	/* The RSDT's entries, for "FACP". */
3:	mov	16(%rsi), %ebx
	mov	4(%rbx), %ecx
	sub	$36, %ecx
	shr	$2, %ecx
	lea	36(%rbx), %rsi
4:	mov	(%rsi), %ebx
	cmpl	$0x50434146, (%rbx)		/* "FACP" */
	je	5f
	add	$4, %rsi
	loop	4b
	mov	$3, %al
	jmp	fail64
5:	mov	56(%rbx), %eax			/* PM1a_EVT_BLK */
	mov	%eax, pm1a_evt
	mov	64(%rbx), %eax			/* PM1a_CNT_BLK */
	mov	%eax, pm1a_cnt
	mov	36(%rbx), %edi			/* FIRMWARE_CTRL: the FACS */
	mov	%edi, facs
	mov	$4, %al
	cmpb	$2, FACS_VERSION(%rdi)
	jb	fail64
	testl	$WAKE64_SUPPORTED, FACS_FLAGS(%rdi)
	jz	fail64

	/* 1: a 32-bit wake. */
	movl	$0x5a5a5a5a, marker
	movq	$resume32, FACS_X_VECTOR(%rdi)
	andl	$~WAKE64, FACS_OSPM_FLAGS(%rdi)
	sleep_until_alarm

fail64:
	out	%al, $DEBUG_EXIT
	hlt

	.code32
resume32:
	mov	$STACK, %esp
	mov	$5, %al
	mov	%cr0, %ebx
	test	$CR0_PE, %ebx			/* protected mode... */
	jz	fail32
	test	$CR0_PG, %ebx			/* ...without paging */
	jnz	fail32
	mov	$EFER, %ecx
	rdmsr
	test	$EFER_LMA, %eax
	mov	$6, %al
	jnz	fail32
	cmpl	$0x5a5a5a5a, marker		/* flat DS: the marker at its address */
	jne	fail32
	mov	$msg32, %esi
	call	puts32

	/* 2: a 64-bit wake. */
	mov	facs, %edi
	movl	$resume64, FACS_X_VECTOR(%edi)
	movl	$0, FACS_X_VECTOR + 4(%edi)
	orl	$WAKE64, FACS_OSPM_FLAGS(%edi)
	sleep_until_alarm

fail32:
	out	%al, $DEBUG_EXIT
	hlt

puts32:
	mov	$COM1, %dx
1:	lodsb
	test	%al, %al
	jz	2f
	out	%al, %dx
	jmp	1b
2:	ret

	.code64
resume64:
	mov	$STACK, %esp
	mov	$7, %al
	mov	%cr0, %rbx
	bt	$31, %rbx			/* paging on */
	jnc	fail64
	mov	$EFER, %ecx
	rdmsr
	test	$EFER_LMA, %eax			/* long mode */
	mov	$8, %al
	jz	fail64
	cmpl	$0x5a5a5a5a, marker
	jne	fail64
	movl	pm1a_evt, %edx
	in	%dx, %ax
	test	$WAK_STS, %ax
	mov	$8, %al
	jz	fail64
	mov	$pass, %esi
1:	lodsb
	test	%al, %al
	jz	2f
	mov	$COM1, %dx
	out	%al, %dx
	jmp	1b
2:	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt

	.data
pm1a_evt:	.long 0
pm1a_cnt:	.long 0
facs:		.long 0
marker:		.long 0
msg32:		.asciz "s3_wake64: resumed in 32-bit protected mode at x_firmware_waking_vector\n"
pass:		.asciz "s3_wake64: resumed in 64-bit mode with 64BIT_WAKE_F: PASS\n"

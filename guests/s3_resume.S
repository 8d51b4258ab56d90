/*
 * s3_resume: suspend to RAM (ACPI S3), wake on the RTC alarm, resume, PASS.
 *
 * 16-bit real mode at 0x7c00.  It finds the FADT and FACS through the RSDP,
 * puts its resume entry in the FACS firmware_waking_vector, sets the RTC
 * alarm two seconds ahead (binary mode, AIE), enables RTC_EN, clears PM1
 * status and writes SLP_TYP 1 | SLP_EN to PM1a_CNT.  Resumed in real mode at
 * CS:IP = vector >> 4 : vector & 0xF, it checks that RAM kept its marker and
 * that PM1 status has WAK_STS and RTC_STS, and exits with code 0 (status 1).
 */
	.code16
	.set DEBUG_EXIT, 0xf4
	.set RTC_INDEX, 0x70
	.set RTC_DATA, 0x71
	.include "rtc_alarm.inc"
	.set SLP_S3, (1 << 10) | (1 << 13)	/* SLP_TYP 1 (\_S3), SLP_EN */
	.set RTC_EN, 1 << 10
	.set RTC_STS, 1 << 10
	.set WAK_STS, 1 << 15

	.text
	.globl _start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp
	mov	$hello, %si
	call	puts

	/* The RSDP: "RSD PTR " on a 16-byte boundary in E000:0000-FFFF. */
	mov	$0xe000, %ax
	mov	%ax, %es
	xor	%di, %di
1:	cmpl	$0x20445352, %es:(%di)		/* "RSD " */
	jne	2f
	cmpl	$0x20525450, %es:4(%di)		/* "PTR " */
	je	3f
2:	add	$16, %di
	jnz	1b
	jmp	fail
	/* The RSDT's entries, for "FACP".  The tables lie in E000:xxxx. */
3:	mov	%es:16(%di), %bx
	mov	%es:4(%bx), %cx
	sub	$36, %cx
	shr	$2, %cx
	lea	36(%bx), %si
4:	mov	%es:(%si), %bx
	cmpl	$0x50434146, %es:(%bx)		/* "FACP" */
	je	5f
	add	$4, %si
	loop	4b
	jmp	fail
5:	mov	%es:56(%bx), %ax		/* PM1a_EVT_BLK */
	mov	%ax, pm1a_evt
	mov	%es:64(%bx), %ax		/* PM1a_CNT_BLK */
	mov	%ax, pm1a_cnt
	mov	%es:36(%bx), %di		/* FIRMWARE_CTRL: the FACS */
	movl	$resume, %es:12(%di)		/* firmware_waking_vector */

	movw	$0x5a5a, marker			/* RAM must keep this */

	rtc_alarm_in_two_seconds

	/* PM1: clear every status bit, enable the RTC wake, sleep. */
	mov	pm1a_evt, %dx
	mov	$0xffff, %ax
	out	%ax, %dx
	add	$2, %dx
	mov	$RTC_EN, %ax
	out	%ax, %dx
	mov	$sleeping, %si
	call	puts
	mov	pm1a_cnt, %dx
	mov	$SLP_S3, %ax
	out	%ax, %dx
	/* Still running: the machine did not sleep. */
	mov	$awake, %si
	call	puts
	jmp	fail

	/* The waking vector: CS = resume >> 4.  Go to CS = 0 first. */
resume:
	ljmp	$0, $resumed
resumed:
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp
	cmpw	$0x5a5a, marker
	jne	fail
	mov	pm1a_evt, %dx
	in	%dx, %ax
	test	$WAK_STS, %ax
	jz	fail
	test	$RTC_STS, %ax
	jz	fail
	mov	$pass, %si
	call	puts
	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt

fail:
	xor	%ax, %ax
	mov	%ax, %ds
	mov	$bad, %si
	call	puts
	mov	$1, %al
	out	%al, $DEBUG_EXIT
	hlt

	.include "puts.inc"

pm1a_evt:	.word 0
pm1a_cnt:	.word 0
marker:		.word 0
hello:		.asciz "s3: suspending to RAM, RTC alarm in 2 s\n"
sleeping:	.asciz "s3: SLP_TYP 1 | SLP_EN\n"
awake:		.asciz "s3: still awake after SLP_EN\n"
pass:		.asciz "s3: resumed at the waking vector, RAM kept, WAK_STS and RTC_STS set: PASS\n"
bad:		.asciz "s3: FAIL\n"

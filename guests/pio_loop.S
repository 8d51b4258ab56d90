/*
 * pio_loop: the exit-roundtrip benchmark guest.  Real mode, at 0x7c00.
 *
 * Does ECX port writes to 0x80 (one VM exit each; the VMM sets ECX before
 * starting it), then exits with code 0.
 */
	.code16
	.text
	.globl _start
_start:
	test	%ecx, %ecx
	jz	2f
1:	out	%al, $0x80
	dec	%ecx
	jnz	1b
2:	xor	%al, %al
	out	%al, $0xf4
	hlt

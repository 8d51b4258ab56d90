/*
 * cpl0_loop: a compute-bound long-mode guest at CPL 0, for bench/hw_vs_sw.py.
 *
 * Counts RCX down to 0 (the VMM sets RCX; 2 instructions per iteration),
 * then exits through the debug-exit port with code 0.  Under PVM this loop
 * runs in KVM's instruction emulator; compare cpl3_loop, the same loop at CPL 3.
 */
	.code64
	.set DEBUG_EXIT, 0xf4

	.text
	.globl _start
_start:
	test	%rcx, %rcx
	jz	2f
1:	dec	%rcx
	jnz	1b
2:	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt

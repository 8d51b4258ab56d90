/*
 * vga_colors: a real-mode guest that paints the 80x25 VGA text screen.
 *
 * It writes character/attribute pairs straight into video memory at 0xB8000:
 * a title bar, a chart of the 128 foreground/background pairs (bit 7, blink,
 * left off), double- and single-line boxes, the 256 characters of code page
 * 437, a band of the 16 colours in full blocks, a blinking word and a status
 * bar.  It places the hardware cursor and sets its shape through the CRTC
 * (ports 0x3D4/0x3D5), reports over COM1, and exits through the debug-exit
 * port with code 0.  kvmpy's tests check the screenshot's pixels against
 * this layout, so keep the two in step.
 */
	.code16
	.set COM1, 0x3f8
	.set DEBUG_EXIT, 0xf4
	.set CRTC_INDEX, 0x3d4
	.set VIDEO_SEGMENT, 0xb800
	.set CURSOR_ROW, 22
	.set CURSOR_COL, 22

	.text
	.globl _start
_start:
	cli
	xor	%ax, %ax
	mov	%ax, %ds
	mov	%ax, %ss
	mov	$0x7c00, %sp
	mov	$VIDEO_SEGMENT, %ax
	mov	%ax, %es
	cld

	/* The whole screen: blanks, light grey on black. */
	xor	%di, %di
	mov	$80 * 25, %cx
	mov	$0x0720, %ax
	rep stosw

	/* Title bar (row 0): white on blue; status bar (row 24): black on cyan. */
	xor	%di, %di
	mov	$80, %cx
	mov	$0x1f20, %ax
	rep stosw
	mov	$24 * 160, %di
	mov	$80, %cx
	mov	$0x3020, %ax
	rep stosw

	/* Rows 2-9: background b (0-7) by row, foreground f (0-15) in 4-column
	 * blocks from column 8, each " bf " in its own colours. */
	xor	%bx, %bx		/* BL = b, BH = f */
chart_row:
	movb	$0, %bh
chart_cell:
	mov	%bl, %dh
	add	$2, %dh
	mov	%bh, %dl
	shl	$2, %dl
	add	$8, %dl
	call	at
	mov	%bl, %ah
	shl	$4, %ah
	or	%bh, %ah		/* AH = attribute b << 4 | f */
	mov	$' ', %al
	stosw
	mov	%bl, %al
	call	hexdigit
	stosw
	mov	%bh, %al
	call	hexdigit
	stosw
	mov	$' ', %al
	stosw
	inc	%bh
	cmp	$16, %bh
	jb	chart_cell
	inc	%bl
	cmp	$8, %bl
	jb	chart_row

	/* Rows 15-18: all 256 characters, 64 a row from column 8. */
	xor	%bx, %bx
charset:
	mov	%bl, %dh
	shr	$6, %dh
	add	$15, %dh
	mov	%bl, %dl
	and	$63, %dl
	add	$8, %dl
	call	at
	mov	%bl, %al
	mov	$0x07, %ah
	stosw
	inc	%bx
	cmp	$256, %bx
	jb	charset

	/* Row 20: colour c (0-15) as 5 full blocks (0xDB) from column 5c. */
	xor	%bx, %bx
rainbow:
	mov	%bl, %al
	mov	$5, %cl
	mul	%cl			/* AX = 5c */
	mov	%al, %dl
	mov	$20, %dh
	call	at
	mov	%bl, %ah
	mov	$0xdb, %al
	mov	$5, %cx
	rep stosw
	inc	%bl
	cmp	$16, %bl
	jb	rainbow

	/* The text: records of row, column, attribute and a NUL-terminated string. */
	mov	$texts, %si
text_record:
	lodsb
	cmp	$0xff, %al
	je	texts_done
	mov	%al, %dh
	lodsb
	mov	%al, %dl
	lodsb
	mov	%al, %ah
	call	at
text_char:
	lodsb
	test	%al, %al
	jz	text_record
	stosw
	jmp	text_char
texts_done:

	/* The cursor: a block on scan lines 12-15, at row 22, column 22.
	 * Each outw sends the CRTC index in AL and the value in AH. */
	mov	$CRTC_INDEX, %dx
	mov	$0x0c0a, %ax		/* cursor start = 12, enabled */
	out	%ax, %dx
	mov	$0x0f0b, %ax		/* cursor end = 15 */
	out	%ax, %dx
	.set CURSOR, CURSOR_ROW * 80 + CURSOR_COL
	mov	$0x0e | (CURSOR >> 8) << 8, %ax
	out	%ax, %dx
	mov	$0x0f | (CURSOR & 0xff) << 8, %ax
	out	%ax, %dx

	mov	$done_msg, %si
	call	puts
	xor	%al, %al
	out	%al, $DEBUG_EXIT
	hlt			/* not reached: the VMM stops at the debug exit */

/* DI = the video-memory offset of row DH, column DL: 2 * (80 * DH + DL). */
at:
	push	%ax
	push	%dx
	movzbw	%dh, %ax
	imul	$80, %ax, %ax
	xor	%dh, %dh
	add	%dx, %ax
	shl	%ax
	mov	%ax, %di
	pop	%dx
	pop	%ax
	ret

/* AL (0-15) -> its hex digit in AL. */
hexdigit:
	add	$'0', %al
	cmp	$'9', %al
	jbe	1f
	add	$'A' - '9' - 1, %al
1:	ret

	.include "puts.inc"

done_msg:
	.asciz	"vga_colors: 80x25 screen drawn, cursor at row 22 column 22\n"

/* row, column, attribute, text */
texts:
	.byte	0, 2, 0x1f
	.asciz	"kvmpy VGA text mode: 80x25, 16 colours, code page 437"
	.byte	1, 8, 0x07
	.asciz	"attributes: background (rows) x foreground (columns)"

	/* A double-line box, yellow on blue (0xC9 0xCD.. 0xBB / 0xBA / 0xC8 0xCD.. 0xBC). */
	.byte	11, 2, 0x1e
	.byte	0xc9
	.fill	36, 1, 0xcd
	.byte	0xbb, 0
	.byte	12, 2, 0x1e
	.byte	0xba
	.ascii	"    Hello from VGA text mode!       "
	.byte	0xba, 0
	.byte	13, 2, 0x1e
	.byte	0xc8
	.fill	36, 1, 0xcd
	.byte	0xbc, 0

	/* A single-line box, light green on black, around the shades and blocks. */
	.byte	11, 44, 0x0a
	.byte	0xda
	.fill	34, 1, 0xc4
	.byte	0xbf, 0
	.byte	12, 44, 0x0a
	.byte	0xb3, ' '
	.fill	8, 1, 0xb0
	.fill	8, 1, 0xb1
	.fill	8, 1, 0xb2
	.fill	8, 1, 0xdb
	.byte	' ', 0xb3, 0
	.byte	13, 44, 0x0a
	.byte	0xc0
	.fill	34, 1, 0xc4
	.byte	0xd9, 0

	.byte	22, 2, 0x0f
	.asciz	"The cursor is here:"
	.byte	22, 40, 0x8e
	.asciz	"BLINK"
	.byte	22, 46, 0x0c
	.asciz	"(yellow, blinking)"
	.byte	24, 1, 0x30
	.asciz	"vga_colors.S: real mode, stosw into 0xB8000, cursor set via 0x3D4/0x3D5"
	.byte	0xff

"""The two ways a PC guest asks for a reset: port 0x92 and the i8042 keyboard controller.

Both devices call ``on_reset()`` to request a system reset and otherwise
carry on; the machine decides what a reset means and should then call each
device's ``reset()``.  The callback runs on the calling thread while the
caller holds the device lock, so it must not call back into the device (it
should only ask the machine to stop).  Neither device masks address line A20
(KVM does not model the A20 gate); they only remember the gate's state.

The i8042 occupies ports 0x60 and 0x64 while 0x61-0x63 belong to others
(0x61 is the PC speaker / PIT gate), so :class:`I8042` is mapped as two
one-port views, :attr:`I8042.data_port` (map at 0x60) and
:attr:`I8042.command_port` (map at 0x64); :meth:`I8042.mappings` lists them
for a bus.  Both views share the controller's state: a bus must serialise
them with ONE lock, the one of their ``owner`` (the :class:`I8042`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from kvmpy.records import Record

from .base import (
    U8,
    Device,
    DeviceStateError,
    IrqCallback,
    access_fits,
    all_ones,
    boolean,
    bounded,
    check_state,
    no_irq,
)

# System Control Port A.
SYSTEM_CONTROL_PORT_A = 0x92
PORT_A_FAST_RESET = 0x01  # a 0 -> 1 transition resets the CPU
PORT_A_A20 = 0x02

# i8042 ports.
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64  # reads return the status register
KBD_IRQ = 1
AUX_IRQ = 12

# Status register.
STATUS_OBF = 0x01  # output buffer full: a byte waits at 0x60
STATUS_IBF = 0x02  # input buffer full: never, commands complete at once
STATUS_SYS = 0x04  # system flag: the controller passed its self test
STATUS_CMD = 0x08  # the last write went to 0x64 (1) or 0x60 (0)
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the keylock
STATUS_AUX_OBF = 0x20  # the waiting byte comes from the auxiliary (mouse) port

# Controller command byte ("mode").
CB_KBD_INT = 0x01  # keyboard bytes raise IRQ 1
CB_AUX_INT = 0x02  # aux bytes raise IRQ 12
CB_SYS = 0x04
CB_KBD_DISABLE = 0x10
CB_AUX_DISABLE = 0x20
CB_XLATE = 0x40  # translate keyboard bytes to scan code set 1
# What firmware leaves behind: interrupts on, system flag set.
DEFAULT_COMMAND_BYTE = CB_KBD_INT | CB_AUX_INT | CB_SYS

# Controller commands (written to 0x64).
CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_BUFFER = 0xD2  # next data byte appears as if the keyboard sent it
CMD_WRITE_AUX_BUFFER = 0xD3  # ... as if the mouse sent it
CMD_WRITE_AUX = 0xD4  # next data byte goes to the mouse
CMD_A20_OFF = 0xDD
CMD_A20_ON = 0xDF
CMD_PULSE = 0xF0  # 0xF0-0xFF pulse output-port bits 3-0 that are 0 in the command
CMD_RESET = 0xFE  # pulse bit 0 only: the classic reset
# Commands whose operand is the next byte written to 0x60.
CMDS_WITH_DATA = frozenset(
    (
        CMD_WRITE_COMMAND_BYTE,
        CMD_WRITE_OUTPUT_PORT,
        CMD_WRITE_KBD_BUFFER,
        CMD_WRITE_AUX_BUFFER,
        CMD_WRITE_AUX,
    )
)
SELF_TEST_PASSED = 0x55
INTERFACE_TEST_PASSED = 0x00
INPUT_PORT_VALUE = 0x80  # keyboard not inhibited (QEMU's value)

# Output port.
OUT_RESET = 0x01  # 0 holds the CPU in reset
OUT_A20 = 0x02
OUT_OBF = 0x10
OUT_AUX_OBF = 0x20
OUT_ONES = 0xCC  # lines QEMU reports high
DEFAULT_OUTPUT_PORT = OUT_RESET | OUT_A20 | OUT_ONES

# The PS/2 keyboard behind the controller: enough for a driver's probe.
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCAN_CODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_RATE = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5  # also restores defaults
KBD_DEFAULTS = 0xF6
KBD_RESET = 0xFF
KBD_CMDS_WITH_PARAMETER = frozenset((KBD_SET_LEDS, KBD_SCAN_CODE_SET, KBD_SET_RATE))
KBD_ACK = 0xFA
KBD_RESEND = 0xFE  # what a keyboard answers to a command it does not know
KBD_SELF_TEST_PASSED = 0xAA
KBD_ID = 0xAB
KBD_ID_TAIL = 0x83  # second ID byte; 0x41 when the controller translates
KBD_ID_TAIL_TRANSLATED = 0x41
DEFAULT_SCAN_CODE_SET = 2
# Scan code set numbers as reported through set-1 translation.
TRANSLATED_SET_NUMBERS = {1: 0x43, 2: 0x41, 3: 0x3F}
OUTPUT_QUEUE_LIMIT = 16  # bytes per device, like a PS/2 device's queue
I8042_SPAN = I8042_COMMAND_PORT - I8042_DATA_PORT + 1  # offsets I8042.read/write decode


class SystemControlPortAState(Record):
    VERSION: ClassVar[int] = 1
    value: int = bounded(0, U8)


class I8042State(Record):
    """The controller, the keyboard's pending command, and both output queues.

    ``pending_command`` and ``kbd_pending`` are -1 when nothing is pending.
    """

    VERSION: ClassVar[int] = 1
    command_byte: int = bounded(0, U8)
    output_port: int = bounded(0, U8)
    last_write_command: bool = boolean()
    pending_command: int = bounded(-1, U8)
    kbd_pending: int = bounded(-1, U8)
    scan_code_set: int = bounded(1, 3)
    last_read: int = bounded(0, U8)
    kbd_out: tuple[int, ...] = bounded(0, U8, max_length=OUTPUT_QUEUE_LIMIT)
    aux_out: tuple[int, ...] = bounded(0, U8, max_length=OUTPUT_QUEUE_LIMIT)


class SystemControlPortA:
    """Port 0x92 (map 1 port): bit 0 resets the machine, bit 1 gates A20.

    As in QEMU the register reads back what was last written, and only a
    0 -> 1 transition of bit 0 resets, so a guest writing back what it read
    does not reset again.  :meth:`reset` returns to the power-on value 0
    (A20 gate off, as the PC's power-on left it).  Wider accesses use the low byte;
    anything beyond port 0x92 is ignored and counted in ``ignored_accesses``.
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.ignored_accesses = 0
        self._value = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, 1):
            self.ignored_accesses += 1
            return all_ones(size)
        return self._value

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, 1):
            self.ignored_accesses += 1
            return
        old, self._value = self._value, value & 0xFF
        if value & PORT_A_FAST_RESET and not old & PORT_A_FAST_RESET:
            self.on_reset()

    def reset(self) -> None:
        self._value = 0

    def state(self) -> SystemControlPortAState:
        return SystemControlPortAState(self._value)

    def restore(self, state: SystemControlPortAState) -> None:
        self._value = check_state("port92", state, SystemControlPortAState).value

    @property
    def a20(self) -> bool:
        return bool(self._value & PORT_A_A20)


class I8042Port:
    """One of the i8042's ports as a device of length 1; wider accesses use the low byte.

    ``owner`` is the controller: its lock serialises this view, and reset,
    state and restore are the controller's.
    """

    def __init__(self, owner: I8042, port_offset: int) -> None:
        self.owner = owner
        self._port_offset = port_offset

    def read(self, offset: int, size: int) -> int:
        if offset != 0:
            self.owner.ignored_accesses += 1
            return all_ones(size)
        return self.owner.read(self._port_offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            self.owner.ignored_accesses += 1
            return
        self.owner.write(self._port_offset, size, value)

    def reset(self) -> None:
        self.owner.reset()

    def state(self) -> I8042State:
        return self.owner.state()

    def restore(self, state: Any) -> None:
        self.owner.restore(state)


class I8042:
    """The 8042 keyboard controller with a PS/2 keyboard and no mouse.

    Map :attr:`data_port` at :data:`I8042_DATA_PORT` and :attr:`command_port`
    at :data:`I8042_COMMAND_PORT`, one port each.  Controller commands
    complete at once (IBF is never set) and queue their answers in the output
    buffer.  Command 0xFE (any 0xF0-0xFF with bit 0 clear) and writing the
    output port with bit 0 clear (command 0xD1) call ``on_reset()``.

    The keyboard answers the commands a driver's probe sends (ACK, echo, ID
    0xAB 0x83, reset self-test 0xAA, scan code set) and never types.  Bytes
    for the mouse (command 0xD4) are dropped, as if none were plugged in.

    ``irq_kbd`` (IRQ 1) and ``irq_aux`` (IRQ 12) follow QEMU: high while a
    byte waits and the command byte enables its interrupt, pulsed low after
    each read so that an edge-triggered PIC sees the next byte.

    As a device, :meth:`read` and :meth:`write` decode offset 0 (port 0x60)
    and offset 4 (port 0x64); other offsets and sizes above 8 are ignored
    and counted in ``ignored_accesses``.  ``on_reset`` and the interrupt
    callbacks run with the device lock held and must not call back into it.
    """

    def __init__(
        self,
        on_reset: Callable[[], None],
        *,
        irq_kbd: IrqCallback = no_irq,
        irq_aux: IrqCallback = no_irq,
    ) -> None:
        self.on_reset = on_reset
        self._irq_kbd = irq_kbd
        self._irq_aux = irq_aux
        self.ignored_accesses = 0
        self._kbd_out: deque[int] = deque()
        self._aux_out: deque[int] = deque()
        self._kbd_level = False
        self._aux_level = False
        self.data_port = I8042Port(self, 0)
        self.command_port = I8042Port(self, I8042_COMMAND_PORT - I8042_DATA_PORT)
        self._power_on()

    def _power_on(self) -> None:
        self._command_byte = DEFAULT_COMMAND_BYTE
        self._output_port = DEFAULT_OUTPUT_PORT
        self._last_write_command = True
        self._pending_command: int | None = None  # a command awaiting its data byte
        self._kbd_pending: int | None = None  # a keyboard command awaiting its parameter
        self._scan_code_set = DEFAULT_SCAN_CODE_SET
        self._last_read = 0
        self._kbd_out.clear()
        self._aux_out.clear()

    def mappings(self) -> tuple[tuple[int, int, Device, str], ...]:
        """(port, length, device, name) for each of the two ports."""
        return (
            (I8042_DATA_PORT, 1, self.data_port, "i8042-data"),
            (I8042_COMMAND_PORT, 1, self.command_port, "i8042-command"),
        )

    def read(self, offset: int, size: int) -> int:
        """Offset 0 reads the data port (0x60), offset 4 the status register (0x64)."""
        if not access_fits(offset, size, I8042_SPAN) or offset not in (0, I8042_SPAN - 1):
            self.ignored_accesses += 1
            return all_ones(size)
        return self._read_data() if offset == 0 else self._read_status()

    def write(self, offset: int, size: int, value: int) -> None:
        """Offset 0 writes the data port (0x60), offset 4 a command (0x64); low byte only."""
        if not access_fits(offset, size, I8042_SPAN) or offset not in (0, I8042_SPAN - 1):
            self.ignored_accesses += 1
            return
        if offset == 0:
            self._write_data(value & 0xFF)
        else:
            self._write_command(value & 0xFF)

    def reset(self) -> None:
        """Return to the power-on state, dropping queued bytes."""
        self._power_on()
        self._update_irq()

    def state(self) -> I8042State:
        return I8042State(
            command_byte=self._command_byte,
            output_port=self._output_port,
            last_write_command=self._last_write_command,
            pending_command=-1 if self._pending_command is None else self._pending_command,
            kbd_pending=-1 if self._kbd_pending is None else self._kbd_pending,
            scan_code_set=self._scan_code_set,
            last_read=self._last_read,
            kbd_out=tuple(self._kbd_out),
            aux_out=tuple(self._aux_out),
        )

    def restore(self, state: I8042State) -> None:
        """Take ``state``; the interrupt levels it implies are taken as already driven."""
        state = check_state("i8042", state, I8042State)
        if state.pending_command not in CMDS_WITH_DATA | {-1}:
            raise DeviceStateError(
                "i8042", "pending_command", f"{state.pending_command:#x} takes no data byte"
            )
        if state.kbd_pending not in KBD_CMDS_WITH_PARAMETER | {-1}:
            raise DeviceStateError(
                "i8042", "kbd_pending", f"{state.kbd_pending:#x} takes no parameter"
            )
        self._command_byte = state.command_byte
        self._output_port = state.output_port
        self._last_write_command = state.last_write_command
        self._pending_command = None if state.pending_command < 0 else state.pending_command
        self._kbd_pending = None if state.kbd_pending < 0 else state.kbd_pending
        self._scan_code_set = state.scan_code_set
        self._last_read = state.last_read
        self._kbd_out = deque(state.kbd_out)
        self._aux_out = deque(state.aux_out)
        self._kbd_level, self._aux_level = self._irq_levels()

    @property
    def a20(self) -> bool:
        return bool(self._output_port & OUT_A20)

    @property
    def command_byte(self) -> int:
        return self._command_byte

    # Port handlers ----------------------------------------------------------

    def _read_status(self) -> int:
        status = STATUS_SYS | STATUS_UNLOCKED
        if self._last_write_command:
            status |= STATUS_CMD
        if self._kbd_out or self._aux_out:
            status |= STATUS_OBF
            if not self._kbd_out:
                status |= STATUS_AUX_OBF
        return status

    def _read_data(self) -> int:
        # Keyboard bytes go first; an empty buffer repeats the last byte.
        if self._kbd_out:
            self._last_read = self._kbd_out.popleft()
        elif self._aux_out:
            self._last_read = self._aux_out.popleft()
        self._lower_irqs()
        self._update_irq()
        return self._last_read

    def _write_command(self, value: int) -> None:
        self._last_write_command = True
        requested = self._command(value)
        self._update_irq()
        if requested:
            self.on_reset()

    def _write_data(self, value: int) -> None:
        self._last_write_command = False
        command, self._pending_command = self._pending_command, None
        requested = False
        if command is None:
            self._keyboard_write(value)
        elif command == CMD_WRITE_COMMAND_BYTE:
            self._command_byte = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            requested = not value & OUT_RESET
        elif command == CMD_WRITE_KBD_BUFFER:
            self._queue(self._kbd_out, value)
        elif command == CMD_WRITE_AUX_BUFFER:
            self._queue(self._aux_out, value)
        # CMD_WRITE_AUX: no mouse to receive it.
        self._update_irq()
        if requested:
            self.on_reset()

    # Controller ---------------------------------------------------------------

    def _command(self, value: int) -> bool:
        """Run controller command ``value``; True if it asks for a reset."""
        if value & CMD_PULSE == CMD_PULSE:
            return not value & OUT_RESET  # bit 0 pulsed low resets the CPU
        if value == CMD_READ_COMMAND_BYTE:
            self._queue(self._kbd_out, self._command_byte)
        elif value in CMDS_WITH_DATA:
            self._pending_command = value
        elif value == CMD_AUX_DISABLE:
            self._command_byte |= CB_AUX_DISABLE
        elif value == CMD_AUX_ENABLE:
            self._command_byte &= ~CB_AUX_DISABLE
        elif value in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._queue(self._kbd_out, INTERFACE_TEST_PASSED)
        elif value == CMD_SELF_TEST:
            self._queue(self._kbd_out, SELF_TEST_PASSED)
        elif value == CMD_KBD_DISABLE:
            self._command_byte |= CB_KBD_DISABLE
        elif value == CMD_KBD_ENABLE:
            self._command_byte &= ~CB_KBD_DISABLE
        elif value == CMD_READ_INPUT_PORT:
            self._queue(self._kbd_out, INPUT_PORT_VALUE)
        elif value == CMD_READ_OUTPUT_PORT:
            self._queue(self._kbd_out, self._output_port_value())
        elif value == CMD_A20_OFF:
            self._output_port &= ~OUT_A20
        elif value == CMD_A20_ON:
            self._output_port |= OUT_A20
        # Anything else is ignored, as QEMU does.
        return False

    def _output_port_value(self) -> int:
        value = self._output_port & ~(OUT_OBF | OUT_AUX_OBF)
        if self._kbd_out or self._aux_out:
            value |= OUT_OBF if self._kbd_out else OUT_AUX_OBF | OUT_OBF
        return value

    @staticmethod
    def _queue(queue: deque[int], value: int) -> None:
        if len(queue) < OUTPUT_QUEUE_LIMIT:  # a full device drops what it would send
            queue.append(value)

    # Keyboard -------------------------------------------------------------------

    def _keyboard_write(self, value: int) -> None:
        out = self._kbd_out
        command, self._kbd_pending = self._kbd_pending, None
        if command == KBD_SCAN_CODE_SET:
            if value == 0:  # query
                self._queue(out, KBD_ACK)
                self._queue(out, self._set_number())
            elif value in TRANSLATED_SET_NUMBERS:
                self._scan_code_set = value
                self._queue(out, KBD_ACK)
            else:
                self._queue(out, KBD_RESEND)
        elif command is not None:  # LED state or typematic rate: accepted, no effect
            self._queue(out, KBD_ACK)
        elif value in KBD_CMDS_WITH_PARAMETER:
            self._kbd_pending = value
            self._queue(out, KBD_ACK)
        elif value == KBD_ECHO:
            self._queue(out, KBD_ECHO)
        elif value == KBD_GET_ID:
            self._queue(out, KBD_ACK)
            self._queue(out, KBD_ID)
            xlate = self._command_byte & CB_XLATE
            self._queue(out, KBD_ID_TAIL_TRANSLATED if xlate else KBD_ID_TAIL)
        elif value == KBD_RESET:
            self._scan_code_set = DEFAULT_SCAN_CODE_SET
            self._queue(out, KBD_ACK)
            self._queue(out, KBD_SELF_TEST_PASSED)
        elif value in (KBD_ENABLE, KBD_DISABLE, KBD_DEFAULTS):
            if value != KBD_ENABLE:
                self._scan_code_set = DEFAULT_SCAN_CODE_SET
            self._queue(out, KBD_ACK)
        else:
            self._queue(out, KBD_RESEND)

    def _set_number(self) -> int:
        if self._command_byte & CB_XLATE:
            return TRANSLATED_SET_NUMBERS[self._scan_code_set]
        return self._scan_code_set

    # Interrupts -----------------------------------------------------------------

    def _lower_irqs(self) -> None:
        if self._kbd_level:
            self._kbd_level = False
            self._irq_kbd(False)
        if self._aux_level:
            self._aux_level = False
            self._irq_aux(False)

    def _irq_levels(self) -> tuple[bool, bool]:
        mode = self._command_byte
        kbd = bool(self._kbd_out) and bool(mode & CB_KBD_INT) and not mode & CB_KBD_DISABLE
        aux = not self._kbd_out and bool(self._aux_out) and bool(mode & CB_AUX_INT)
        return kbd, aux

    def _update_irq(self) -> None:
        kbd, aux = self._irq_levels()
        if kbd != self._kbd_level:
            self._kbd_level = kbd
            self._irq_kbd(kbd)
        if aux != self._aux_level:
            self._aux_level = aux
            self._irq_aux(aux)

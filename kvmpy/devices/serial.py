"""A 16550A UART, as found at 0x3f8 (COM1) on a PC.

The model follows the National Semiconductor PC16550D datasheet for everything
a guest can observe through the eight registers, with two simplifications that
come from having no baud clock:

* The line is infinitely fast.  A byte written to THR is transmitted at once, so
  THR and the transmitter are always empty (LSR.THRE and LSR.TEMT stay set) and
  the transmit FIFO never holds anything.
* The character-timeout interrupt cannot wait four character times, so it is
  reported whenever the receive FIFO holds data below the trigger level.

Input from the host goes through :meth:`Serial16550.feed` into a bounded host
queue first and moves into the 16-byte FIFO (or the one-byte holding register
when FIFOs are off) as the guest drains it.  ``feed`` therefore never
overruns the UART; it pushes back on the host by accepting fewer bytes when the
queue is full.  LSR.OE is only set in loopback mode, where a transmitted byte
that finds the receiver full is lost exactly as on real hardware.

Accesses wider than a byte use the low byte (reads zero-extend it); an
access outside the eight ports, or wider than 8 bytes, reads all ones, is
not written and is counted in ``ignored_accesses``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

from kvmpy.records import Record

from .base import (
    U8,
    U16,
    DeviceStateError,
    IrqCallback,
    access_fits,
    all_ones,
    boolean,
    bounded,
    check_state,
    flags,
    no_irq,
)

# Register offsets from the base port.
RBR = 0  # receiver buffer (read, DLAB=0)
THR = 0  # transmitter holding (write, DLAB=0)
DLL = 0  # divisor latch low byte (DLAB=1)
IER = 1  # interrupt enable (DLAB=0)
DLM = 1  # divisor latch high byte (DLAB=1)
IIR = 2  # interrupt identification (read)
FCR = 2  # FIFO control (write)
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch
NUM_PORTS = 8

# IER: interrupt enables.
IER_ERBFI = 0x01  # received data available (and character timeout)
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # bits 4-7 always read 0

# IIR: interrupt identification, highest priority first.
IIR_NONE = 0x01  # bit 0 set: nothing pending
IIR_RLS = 0x06  # receiver line status; cleared by reading LSR
IIR_RDA = 0x04  # received data at/above the trigger level; cleared by draining
IIR_TIMEOUT = 0x0C  # data below the trigger level; cleared by reading RBR
IIR_THRE = 0x02  # THR empty; cleared by reading IIR or writing THR
IIR_MSI = 0x00  # modem status change; cleared by reading MSR
IIR_FIFO_ENABLED = 0xC0  # bits 6-7 read 0b11 while FCR enables the FIFOs

# FCR: FIFO control (write-only).
FCR_ENABLE = 0x01  # enable both FIFOs; the other bits only program when set
FCR_CLEAR_RX = 0x02  # self-clearing: empty the receive FIFO
FCR_CLEAR_TX = 0x04  # self-clearing: empty the transmit FIFO
FCR_DMA = 0x08  # DMA mode select: stored, no effect without DMA
FCR_TRIGGER = 0xC0  # receive trigger level selector
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)  # bytes, indexed by FCR bits 6-7
RX_FIFO_SIZE = 16

# LCR: line control.
LCR_WORD_LENGTH = 0x03  # data bits minus 5
LCR_STOP = 0x04  # 2 stop bits (1.5 with 5 data bits)
LCR_PARITY_ENABLE = 0x08
LCR_EVEN_PARITY = 0x10
LCR_STICK_PARITY = 0x20
LCR_BREAK = 0x40  # hold the line spacing; nothing to do on a virtual line
LCR_DLAB = 0x80  # divisor latch access

# MCR: modem control.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # on a PC, gates the UART interrupt onto the ISA IRQ line
MCR_LOOP = 0x10  # internal loopback
MCR_MASK = 0x1F  # bits 5-7 always read 0 on a 16550A

# LSR: line status.
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_PE = 0x04  # parity error
LSR_FE = 0x08  # framing error
LSR_BI = 0x10  # break interrupt
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty
LSR_RX_FIFO_ERROR = 0x80  # some byte in the receive FIFO has PE/FE/BI
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # cleared by reading LSR

# MSR: modem status.
MSR_DCTS = 0x01  # delta CTS
MSR_DDSR = 0x02  # delta DSR
MSR_TERI = 0x04  # trailing edge of RI (1 -> 0)
MSR_DDCD = 0x08  # delta DCD
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD  # cleared by reading MSR
MSR_CONNECTED = MSR_CTS | MSR_DSR | MSR_DCD  # the host end of a connected line

BASE_BAUD = 115200  # 1.8432 MHz crystal / 16
RESET_DIVISOR = 12  # 9600 baud, what PC firmware leaves behind
DEFAULT_HOST_QUEUE_LIMIT = 64 * 1024
RX_ERRORS = LSR_PE | LSR_FE | LSR_BI  # the error bits a received byte can carry
FCR_STORED = FCR_ENABLE | FCR_DMA | FCR_TRIGGER  # the FCR bits the UART keeps


class SerialState(Record):
    """The UART's registers and receive path; everything a guest can observe.

    ``rx`` is the receive FIFO (or holding register) and ``host`` the bytes
    queued by the host behind it, each as (byte, LSR error bits).
    """

    VERSION: ClassVar[int] = 1
    ier: int = flags(IER_MASK)
    lcr: int = bounded(0, U8)
    mcr: int = flags(MCR_MASK)
    fcr: int = flags(FCR_STORED)
    scr: int = bounded(0, U8)
    divisor: int = bounded(0, U16)
    lsr_errors: int = flags(LSR_ERRORS)
    msr: int = bounded(0, U8)
    thre_pending: bool = boolean()
    rbr: int = bounded(0, U8)
    rx: tuple[tuple[int, int], ...] = bounded(0, U8, max_length=RX_FIFO_SIZE)
    host: tuple[tuple[int, int], ...] = bounded(0, U8)


class Serial16550:
    """A 16550A UART mapped at :data:`NUM_PORTS` consecutive I/O ports.

    ``output`` receives every transmitted byte (outside loopback) and ``irq`` is
    driven with the level of the UART interrupt gated by MCR.OUT2, and is only
    called when that level changes.  Both callbacks run on the calling thread
    while the device lock is held, so that interrupt levels reach the machine
    in the order they were computed; they must not call back into the device.
    The gate follows the OUT2 register bit even in loopback, where a real chip
    would force the OUT2 pin inactive and so cut the PC's IRQ line.

    ``tx_bytes`` counts bytes handed to ``output`` and ``rx_bytes`` bytes
    accepted by :meth:`feed`; loopback traffic stays inside the UART and is
    counted by neither.

    Host entry points (take the device lock): :meth:`feed`, :meth:`send_break`
    and the properties (``rx_pending``, ``line_settings``...).
    """

    def __init__(
        self,
        *,
        output: Callable[[bytes], None] | None = None,
        irq: IrqCallback = no_irq,
        host_queue_limit: int = DEFAULT_HOST_QUEUE_LIMIT,
    ) -> None:
        self._output = output
        self._irq = irq
        self._host_queue_limit = host_queue_limit
        self._irq_level = False
        # Bytes as (value, LSR error bits that arrived with it).
        self._rx: deque[tuple[int, int]] = deque()
        self._host: deque[tuple[int, int]] = deque()
        self.tx_bytes = 0
        self.rx_bytes = 0
        self.ignored_accesses = 0
        self._power_on()

    def _power_on(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._divisor = RESET_DIVISOR
        self._lsr_errors = 0  # latched OE/PE/FE/BI
        self._msr = MSR_CONNECTED
        self._thre_pending = False
        self._rbr = 0  # last byte read, what RBR returns when empty
        self._rx.clear()
        self._host.clear()

    def reset(self) -> None:
        """Return to the power-on state, dropping all received data.

        The statistics counters are kept: they describe the host side.
        """
        self._power_on()
        self._update_irq()

    def state(self) -> SerialState:
        return SerialState(
            ier=self._ier,
            lcr=self._lcr,
            mcr=self._mcr,
            fcr=self._fcr,
            scr=self._scr,
            divisor=self._divisor,
            lsr_errors=self._lsr_errors,
            msr=self._msr,
            thre_pending=self._thre_pending,
            rbr=self._rbr,
            rx=tuple(self._rx),
            host=tuple(self._host),
        )

    def restore(self, state: SerialState) -> None:
        """Take ``state``; the interrupt level it implies is taken as already driven.

        (The interrupt controller's state is restored with the machine.)
        """
        state = check_state("serial", state, SerialState)
        capacity = RX_FIFO_SIZE if state.fcr & FCR_ENABLE else 1
        if len(state.rx) > capacity:
            raise DeviceStateError(
                "serial", "rx", f"{len(state.rx)} bytes, the FIFO holds {capacity}"
            )
        if len(state.host) > self._host_queue_limit:
            raise DeviceStateError(
                "serial", "host", f"{len(state.host)} bytes, the limit is {self._host_queue_limit}"
            )
        if any(errors & ~RX_ERRORS for _, errors in state.rx + state.host):
            raise DeviceStateError("serial", "rx", "a byte carries error bits other than PE/FE/BI")
        self._ier = state.ier
        self._lcr = state.lcr
        self._mcr = state.mcr
        self._fcr = state.fcr
        self._scr = state.scr
        self._divisor = state.divisor
        self._lsr_errors = state.lsr_errors
        self._msr = state.msr
        self._thre_pending = state.thre_pending
        self._rbr = state.rbr
        self._rx = deque(state.rx)
        self._host = deque(state.host)
        self._irq_level = self._pending_source() != IIR_NONE and bool(self._mcr & MCR_OUT2)

    # Host side ------------------------------------------------------------

    def set_output(self, output: Callable[[bytes], None] | None) -> None:
        """Send transmitted bytes to ``output`` from now on (a front end wiring COM2;
        before the run, or holding the device lock, as every host entry point)."""
        self._output = output

    def feed(self, data: bytes) -> int:
        """Queue ``data`` for the guest; return how many bytes were accepted."""
        # The receiver's free slots count too: the queue only holds the
        # backlog beyond them (it is empty while the receiver has room).
        free = 0 if self._mcr & MCR_LOOP else self._rx_capacity - len(self._rx)
        room = max(0, self._host_queue_limit - len(self._host)) + free
        accepted = min(len(data), room)
        self._host.extend((byte, 0) for byte in data[:accepted])
        self.rx_bytes += accepted
        self._refill()
        self._update_irq()
        return accepted

    def send_break(self) -> bool:
        """Queue a break condition: a NUL byte received with LSR.BI set.

        Returns False (and queues nothing) when the host queue is full.
        """
        if len(self._host) >= self._host_queue_limit:
            return False
        self._host.append((0, LSR_BI))
        self._refill()
        self._update_irq()
        return True

    # Guest side -----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read a register; wider accesses return the byte zero-extended."""
        if not access_fits(offset, size, NUM_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        value = self._read(offset)
        self._update_irq()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a register; wider accesses use only the low byte."""
        if not access_fits(offset, size, NUM_PORTS):
            self.ignored_accesses += 1
            return
        self._write(offset, value & 0xFF)
        self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR:
            return self._divisor & 0xFF if dlab else self._read_rbr()
        if offset == IER:
            return self._divisor >> 8 if dlab else self._ier
        if offset == IIR:
            source = self._pending_source()
            if source == IIR_THRE:
                self._thre_pending = False  # reading IIR acknowledges THRE
            return source | (IIR_FIFO_ENABLED if self._fifo_enabled else 0)
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._lsr()
            self._lsr_errors = 0
            return value
        if offset == MSR:
            value = self._msr
            self._msr &= ~MSR_DELTAS
            return value
        return self._scr  # SCR: read() let only offsets 0-7 through

    def _write(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                # Enabling ETBEI while THR is empty (it always is) raises THRE.
                if value & ~self._ier & IER_ETBEI:
                    self._thre_pending = True
                self._ier = value & IER_MASK
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            was_loop = self._mcr & MCR_LOOP
            self._mcr = value & MCR_MASK
            self._update_msr()
            if was_loop and not self._mcr & MCR_LOOP:
                self._refill()  # the line is connected to the receiver again
        elif offset == SCR:
            self._scr = value
        # LSR and MSR, the status registers, ignore writes.

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive(value, 0)
        else:
            self.tx_bytes += 1
            if self._output is not None:
                self._output(bytes([value]))
        # The byte left THR at once, so THR is empty again.
        self._thre_pending = True

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE:
            self._rx.clear()  # switching FIFO mode empties both FIFOs
        if value & FCR_ENABLE:
            self._fcr = value & (FCR_ENABLE | FCR_DMA | FCR_TRIGGER)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            # FCR_CLEAR_TX: the transmit FIFO is always empty already.
        else:
            self._fcr &= ~FCR_ENABLE  # the other bits are not programmed
        self._refill()

    # Receiver ---------------------------------------------------------------

    @property
    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    @property
    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self._fifo_enabled else 1

    def _receive(self, value: int, errors: int) -> None:
        """A byte finished arriving at the receiver shift register."""
        if len(self._rx) < self._rx_capacity:
            self._rx.append((value, errors))
            if len(self._rx) == 1:
                self._lsr_errors |= errors  # errors show when a byte reaches RBR
            return
        self._lsr_errors |= LSR_OE
        if not self._fifo_enabled:
            # Without FIFOs the new byte overwrites RBR; a full FIFO keeps its
            # contents and the byte in the shift register is lost instead.
            self._rx[0] = (value, errors)
            self._lsr_errors |= errors

    def _refill(self) -> None:
        """Move host bytes into the receiver while it has room.

        Loopback disconnects the serial input, so host bytes wait meanwhile.
        """
        if self._mcr & MCR_LOOP:
            return
        while self._host and len(self._rx) < self._rx_capacity:
            self._receive(*self._host.popleft())

    def _read_rbr(self) -> int:
        if self._rx:
            self._rbr, _ = self._rx.popleft()
            if self._rx:
                self._lsr_errors |= self._rx[0][1]
            self._refill()
        return self._rbr

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        if self._fifo_enabled and any(errors for _, errors in self._rx):
            value |= LSR_RX_FIFO_ERROR
        return value

    # Modem status and interrupts ---------------------------------------------

    def _update_msr(self) -> None:
        """Recompute MSR's line bits from MCR (loopback) or the host line."""
        old = self._msr
        if self._mcr & MCR_LOOP:
            new = 0
            for mcr_bit, msr_bit in (
                (MCR_RTS, MSR_CTS),
                (MCR_DTR, MSR_DSR),
                (MCR_OUT1, MSR_RI),
                (MCR_OUT2, MSR_DCD),
            ):
                if self._mcr & mcr_bit:
                    new |= msr_bit
        else:
            new = MSR_CONNECTED
        changed = old ^ new
        deltas = old & MSR_DELTAS
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if old & ~new & MSR_RI:  # RI only reports its trailing edge
            deltas |= MSR_TERI
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        self._msr = new | deltas

    def _pending_source(self) -> int:
        """The IIR identification of the highest-priority pending interrupt."""
        if self._ier & IER_ELSI and self._lsr_errors:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx:
            if len(self._rx) < self.rx_trigger_level:
                return IIR_TIMEOUT
            return IIR_RDA
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending_source() != IIR_NONE and bool(self._mcr & MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    # Introspection --------------------------------------------------------------

    @property
    def irq_level(self) -> bool:
        """The level last driven on the ``irq`` callback."""
        return self._irq_level

    @property
    def fifo_enabled(self) -> bool:
        return self._fifo_enabled

    @property
    def rx_trigger_level(self) -> int:
        """Bytes in the receive FIFO that raise the data-available interrupt."""
        if not self._fifo_enabled:
            return 1
        return RX_TRIGGER_LEVELS[(self._fcr & FCR_TRIGGER) >> FCR_TRIGGER_SHIFT]

    @property
    def rx_pending(self) -> int:
        """Bytes not yet read by the guest: receive FIFO plus host queue."""
        return len(self._rx) + len(self._host)

    @property
    def loopback(self) -> bool:
        return bool(self._mcr & MCR_LOOP)

    @property
    def divisor(self) -> int:
        return self._divisor

    @property
    def baud(self) -> int:
        """The programmed baud rate; 0 while the divisor is 0 (no clock)."""
        return BASE_BAUD // self._divisor if self._divisor else 0

    @property
    def data_bits(self) -> int:
        return 5 + (self._lcr & LCR_WORD_LENGTH)

    @property
    def stop_bits(self) -> float:
        if not self._lcr & LCR_STOP:
            return 1
        return 1.5 if self.data_bits == 5 else 2

    @property
    def parity(self) -> str:
        """'N'one, 'O'dd, 'E'ven, 'M'ark or 'S'pace."""
        if not self._lcr & LCR_PARITY_ENABLE:
            return "N"
        even = self._lcr & LCR_EVEN_PARITY
        if self._lcr & LCR_STICK_PARITY:
            return "S" if even else "M"  # stick parity sends the inverse of EPS
        return "E" if even else "O"

    @property
    def line_settings(self) -> str:
        """The line in the usual notation, e.g. ``'115200 8N1'``."""
        stop = f"{self.stop_bits:g}"
        return f"{self.baud} {self.data_bits}{self.parity}{stop}"

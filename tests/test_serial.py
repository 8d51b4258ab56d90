"""Unit tests for the 16550A UART model (no /dev/kvm needed)."""

from __future__ import annotations

import threading

import pytest

from kvmpy.devices.base import Device
from kvmpy.devices.serial import (
    DLL,
    DLM,
    FCR,
    IER,
    IER_EDSSI,
    IER_ELSI,
    IER_ERBFI,
    IER_ETBEI,
    IIR,
    LCR,
    LCR_DLAB,
    LSR,
    LSR_BI,
    LSR_DR,
    LSR_OE,
    LSR_RX_FIFO_ERROR,
    LSR_TEMT,
    LSR_THRE,
    MCR,
    MCR_DTR,
    MCR_LOOP,
    MCR_OUT1,
    MCR_OUT2,
    MCR_RTS,
    MSR,
    RBR,
    SCR,
    THR,
    Serial16550,
)

IDLE_LSR = LSR_THRE | LSR_TEMT  # 0x60


class Harness:
    """A UART wired to lists, with short helpers for register access."""

    def __init__(self, **kwargs: int) -> None:
        self.out: list[bytes] = []
        self.irqs: list[bool] = []
        self.uart = Serial16550(output=self.out.append, irq=self.irqs.append, **kwargs)

    def rd(self, offset: int) -> int:
        return self.uart.read(offset, 1)

    def wr(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)

    def drain(self) -> bytes:
        data = bytearray()
        while self.rd(LSR) & LSR_DR:
            data.append(self.rd(RBR))
        return bytes(data)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_satisfies_device_protocol() -> None:
    device: Device = Serial16550()
    assert device.read(LSR, 1) == IDLE_LSR


# Power-on state and plain registers -------------------------------------------


def test_power_on_state(h: Harness) -> None:
    assert [h.rd(off) for off in range(8)] == [0, 0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert h.uart.divisor == 12
    assert h.uart.baud == 9600
    assert not h.uart.fifo_enabled
    assert not h.uart.loopback
    assert h.uart.irq_level is False
    assert h.irqs == []


def test_scratch_register(h: Harness) -> None:
    h.wr(SCR, 0xA5)
    assert h.rd(SCR) == 0xA5
    h.wr(SCR, 0x5A)
    assert h.rd(SCR) == 0x5A


def test_ier_and_mcr_reserved_bits_read_zero(h: Harness) -> None:
    h.wr(IER, 0xFF)
    assert h.rd(IER) == 0x0F
    h.wr(MCR, 0xEF)
    assert h.rd(MCR) == 0x0F
    h.wr(MCR, 0xFF)
    assert h.rd(MCR) == 0x1F


def test_lcr_reads_back(h: Harness) -> None:
    h.wr(LCR, 0x5B)
    assert h.rd(LCR) == 0x5B


def test_status_registers_ignore_writes(h: Harness) -> None:
    h.wr(LSR, 0x00)
    h.wr(MSR, 0x00)
    assert h.rd(LSR) == IDLE_LSR
    assert h.rd(MSR) == 0xB0


def test_wide_accesses_use_low_byte(h: Harness) -> None:
    h.uart.write(SCR, 2, 0x1234)
    assert h.uart.read(SCR, 4) == 0x34
    h.uart.write(THR, 4, 0xDEAD_BE42)
    assert h.out == [b"B"]


@pytest.mark.parametrize("offset", [-1, 8, 0x3F8])
def test_offset_out_of_range_is_ignored_and_counted(h: Harness, offset: int) -> None:
    before = h.uart.state()
    assert h.rd(offset) == 0xFF
    h.wr(offset, 0)
    assert h.uart.state() == before
    assert h.uart.ignored_accesses == 2


# Divisor latch and line settings -------------------------------------------------


def test_divisor_latch(h: Harness) -> None:
    h.wr(IER, IER_ERBFI)
    h.wr(LCR, LCR_DLAB | 0x03)
    h.wr(DLL, 0x80)
    h.wr(DLM, 0x01)
    assert (h.rd(DLL), h.rd(DLM)) == (0x80, 0x01)
    assert h.uart.divisor == 0x180
    assert h.uart.baud == 300
    # Offsets 2-7 are unaffected by DLAB.
    assert h.rd(LCR) == LCR_DLAB | 0x03
    assert h.rd(IIR) == 0x01
    h.wr(LCR, 0x03)
    # Offsets 0 and 1 are RBR/THR and IER again, untouched by the latch writes.
    assert h.rd(IER) == IER_ERBFI
    assert h.out == []


def test_divisor_write_does_not_transmit_and_dlab_read_keeps_rx(h: Harness) -> None:
    h.uart.feed(b"z")
    h.wr(LCR, LCR_DLAB)
    h.wr(DLL, 1)
    assert h.rd(DLL) == 1
    assert h.out == []
    h.wr(LCR, 0)
    assert h.rd(RBR) == ord("z")
    assert h.uart.baud == 115200


def test_divisor_zero_has_no_baud_rate(h: Harness) -> None:
    h.wr(LCR, LCR_DLAB)
    h.wr(DLL, 0)
    h.wr(DLM, 0)
    assert h.uart.divisor == 0
    assert h.uart.baud == 0


@pytest.mark.parametrize(
    ("lcr", "settings"),
    [
        (0x03, "9600 8N1"),
        (0x0B, "9600 8O1"),
        (0x1B, "9600 8E1"),
        (0x2B, "9600 8M1"),
        (0x3B, "9600 8S1"),
        (0x07, "9600 8N2"),
        (0x02, "9600 7N1"),
        (0x04, "9600 5N1.5"),
    ],
)
def test_line_settings(h: Harness, lcr: int, settings: str) -> None:
    h.wr(LCR, lcr)
    assert h.uart.line_settings == settings


# Transmit ------------------------------------------------------------------------


def test_transmit_goes_to_output_at_once(h: Harness) -> None:
    for byte in b"hi\n":
        h.wr(THR, byte)
        assert h.rd(LSR) == IDLE_LSR
    assert h.out == [b"h", b"i", b"\n"]
    assert h.uart.tx_bytes == 3


def test_transmit_without_output_discards() -> None:
    uart = Serial16550()
    uart.write(THR, 1, 0x41)
    assert uart.tx_bytes == 1
    assert uart.read(LSR, 1) == IDLE_LSR


def test_thre_interrupt_on_enable_and_cleared_by_iir_read(h: Harness) -> None:
    h.wr(MCR, MCR_OUT2)
    assert h.irqs == []
    h.wr(IER, IER_ETBEI)
    assert h.irqs == [True]
    assert h.rd(IIR) == 0x02
    assert h.irqs == [True, False]
    assert h.rd(IIR) == 0x01
    # Rewriting an already-set ETBEI is not a 0->1 transition.
    h.wr(IER, IER_ETBEI)
    assert h.rd(IIR) == 0x01
    assert h.irqs == [True, False]


def test_thre_interrupt_after_each_thr_write(h: Harness) -> None:
    h.wr(MCR, MCR_OUT2)
    h.wr(IER, IER_ETBEI)
    assert h.rd(IIR) == 0x02
    h.wr(THR, ord("a"))
    assert h.irqs == [True, False, True]
    h.wr(THR, ord("b"))  # still pending: no new call
    assert h.irqs == [True, False, True]
    assert h.rd(IIR) == 0x02
    assert h.rd(IIR) == 0x01
    assert h.irqs == [True, False, True, False]


def test_thre_masked_then_reenabled(h: Harness) -> None:
    h.wr(MCR, MCR_OUT2)
    h.wr(IER, IER_ETBEI)
    h.wr(IER, 0)
    assert h.irqs == [True, False]
    assert h.rd(IIR) == 0x01
    h.wr(IER, IER_ETBEI)
    assert h.rd(IIR) == 0x02


# Receive -------------------------------------------------------------------------


def test_receive_without_fifo(h: Harness) -> None:
    h.wr(IER, IER_ERBFI)
    assert h.uart.feed(b"ab") == 2
    assert h.rd(LSR) == IDLE_LSR | LSR_DR
    assert h.rd(IIR) == 0x04  # no FIFO: RDA, never a timeout, bits 6-7 clear
    assert h.rd(RBR) == ord("a")
    assert h.rd(LSR) & LSR_DR  # 'b' moved from the host queue into RBR
    assert h.rd(RBR) == ord("b")
    assert h.rd(LSR) == IDLE_LSR
    assert h.rd(IIR) == 0x01
    assert h.uart.rx_bytes == 2


def test_empty_rbr_returns_last_byte(h: Harness) -> None:
    assert h.rd(RBR) == 0
    h.uart.feed(b"q")
    assert h.rd(RBR) == ord("q")
    assert h.rd(RBR) == ord("q")
    assert h.rd(LSR) == IDLE_LSR


def test_fifo_enable_sets_iir_high_bits(h: Harness) -> None:
    h.wr(FCR, 0x01)
    assert h.uart.fifo_enabled
    assert h.rd(IIR) == 0xC1
    h.wr(FCR, 0x00)
    assert not h.uart.fifo_enabled
    assert h.rd(IIR) == 0x01


def test_receive_with_fifo_trigger_one(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(IER, IER_ERBFI)
    h.uart.feed(b"xyz")
    assert h.rd(IIR) == 0xC4
    assert h.drain() == b"xyz"
    assert h.rd(IIR) == 0xC1


@pytest.mark.parametrize(("fcr", "trigger"), [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_trigger_levels(h: Harness, fcr: int, trigger: int) -> None:
    h.wr(FCR, fcr)
    h.wr(IER, IER_ERBFI)
    assert h.uart.rx_trigger_level == trigger
    h.uart.feed(b"a" * (trigger - 1))
    # Below the trigger: the character timeout (none possible at level 1).
    assert h.rd(IIR) == (0xCC if trigger > 1 else 0xC1)
    h.uart.feed(b"b")
    assert h.rd(IIR) == 0xC4
    h.rd(RBR)
    assert h.rd(IIR) == (0xCC if trigger > 1 else 0xC1)


def test_char_timeout_cleared_by_draining(h: Harness) -> None:
    h.wr(MCR, MCR_OUT2)
    h.wr(FCR, 0xC1)
    h.wr(IER, IER_ERBFI)
    h.uart.feed(b"hello")
    assert h.rd(IIR) == 0xCC
    assert h.irqs == [True]
    assert h.drain() == b"hello"
    assert h.rd(IIR) == 0xC1
    assert h.irqs == [True, False]


def test_trigger_change_reevaluates_interrupt(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(IER, IER_ERBFI)
    h.uart.feed(b"abcd")
    assert h.rd(IIR) == 0xC4
    h.wr(FCR, 0x81)  # trigger 8, data kept since FIFO mode did not change
    assert h.rd(IIR) == 0xCC
    assert h.drain() == b"abcd"


@pytest.mark.parametrize("fcr", [0x00, 0x01])
def test_feed_beyond_fifo_keeps_all_data_in_order(h: Harness, fcr: int) -> None:
    h.wr(FCR, fcr)
    data = bytes(range(256)) * 2
    assert h.uart.feed(data) == len(data)
    assert h.uart.rx_pending == len(data)
    assert h.drain() == data
    assert h.uart.rx_pending == 0
    assert h.rd(LSR) == IDLE_LSR  # no overrun: the host queue absorbed it


def test_host_queue_limit_pushes_back() -> None:
    h = Harness(host_queue_limit=10)
    # One byte sits in RBR (FIFO off) and ten wait in the host queue.
    assert h.uart.feed(b"0123456789abcdef") == 11
    assert h.uart.feed(b"x") == 0
    assert h.uart.rx_bytes == 11
    assert h.rd(RBR) == ord("0")
    assert h.uart.feed(b"xy") == 1
    assert h.drain() == b"123456789ax"
    assert h.uart.feed(b"") == 0


def test_fcr_clear_rx(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.uart.feed(b"stale")
    h.wr(FCR, 0x05)  # clear TX only: RX keeps its data
    assert h.uart.rx_pending == 5
    h.wr(FCR, 0x03)
    assert h.uart.rx_pending == 0
    assert h.rd(LSR) == IDLE_LSR
    assert h.uart.fifo_enabled


def test_fcr_clear_rx_refills_from_host_queue(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.uart.feed(bytes(range(20)))
    h.wr(FCR, 0x03)  # the 16 bytes in the FIFO are gone, the rest arrive
    assert h.drain() == bytes(range(16, 20))


def test_fifo_mode_change_clears_receiver(h: Harness) -> None:
    h.uart.feed(b"a")
    h.wr(FCR, 0x01)
    assert h.uart.rx_pending == 0
    h.uart.feed(b"b")
    h.wr(FCR, 0x00)
    assert h.uart.rx_pending == 0


def test_fcr_bits_need_enable_bit(h: Harness) -> None:
    h.uart.feed(b"k")
    h.wr(FCR, 0xC2)  # FCR0 clear: neither the clear nor the trigger is programmed
    assert not h.uart.fifo_enabled
    assert h.rd(RBR) == ord("k")
    assert h.uart.rx_trigger_level == 1


# Line status errors ----------------------------------------------------------------


def test_break_without_fifo(h: Harness) -> None:
    h.wr(IER, IER_ELSI | IER_ERBFI)
    h.uart.send_break()
    assert h.rd(IIR) == 0x06
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_BI
    assert h.rd(LSR) == IDLE_LSR | LSR_DR  # reading LSR cleared BI
    assert h.rd(IIR) == 0x04
    assert h.rd(RBR) == 0
    assert h.rd(IIR) == 0x01


def test_break_reported_when_it_reaches_the_top_of_the_fifo(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(IER, IER_ELSI)
    h.uart.feed(b"x")
    h.uart.send_break()
    h.uart.feed(b"y")
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_RX_FIFO_ERROR
    assert h.rd(IIR) == 0xC1
    assert h.rd(RBR) == ord("x")
    assert h.rd(IIR) == 0xC6
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_BI | LSR_RX_FIFO_ERROR
    assert h.rd(IIR) == 0xC1
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_RX_FIFO_ERROR
    assert h.rd(RBR) == 0
    assert h.rd(LSR) == IDLE_LSR | LSR_DR
    assert h.rd(RBR) == ord("y")
    assert h.rd(LSR) == IDLE_LSR


def test_overrun_in_loopback_with_fifo_keeps_first_16(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(MCR, MCR_LOOP)
    for byte in range(17):
        h.wr(THR, byte)
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_OE
    assert h.rd(LSR) == IDLE_LSR | LSR_DR
    assert h.drain() == bytes(range(16))


def test_overrun_without_fifo_overwrites_rbr(h: Harness) -> None:
    h.wr(MCR, MCR_LOOP)
    h.wr(THR, 1)
    assert h.rd(LSR) == IDLE_LSR | LSR_DR
    h.wr(THR, 2)
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_OE
    assert h.drain() == b"\x02"


# Interrupt priority ----------------------------------------------------------------


def test_interrupt_priorities(h: Harness) -> None:
    h.wr(MCR, MCR_LOOP | MCR_OUT2)  # CTS and DSR drop: a modem status change
    h.wr(IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)
    h.wr(THR, 1)
    h.wr(THR, 2)  # overruns the one-byte holding register
    assert h.irqs == [True]
    assert h.rd(IIR) == 0x06  # line status first
    assert h.rd(IIR) == 0x06  # reading IIR does not clear it
    assert h.rd(LSR) == IDLE_LSR | LSR_DR | LSR_OE
    assert h.rd(IIR) == 0x04  # then received data
    assert h.rd(RBR) == 2
    assert h.rd(IIR) == 0x02  # then THR empty, acknowledged by this read
    assert h.rd(IIR) == 0x00  # then modem status
    assert h.rd(MSR) == 0x80 | 0x03  # DCD (from OUT2), DCTS, DDSR
    assert h.rd(IIR) == 0x01
    assert h.irqs == [True, False]


def test_rda_outranks_thre_without_acknowledging_it(h: Harness) -> None:
    h.wr(IER, IER_ERBFI | IER_ETBEI)
    h.uart.feed(b"r")
    assert h.rd(IIR) == 0x04
    assert h.rd(IIR) == 0x04
    h.rd(RBR)
    assert h.rd(IIR) == 0x02
    assert h.rd(IIR) == 0x01


def test_disabled_sources_are_not_reported(h: Harness) -> None:
    h.uart.feed(b"r")
    h.uart.send_break()
    h.wr(MCR, MCR_LOOP)
    h.wr(IER, 0)
    assert h.rd(IIR) == 0x01


# Modem control and status -------------------------------------------------------


def test_msr_connected_line_outside_loopback(h: Harness) -> None:
    h.wr(MCR, MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)
    assert h.rd(MSR) == 0xB0


def test_loopback_msr_follows_mcr_with_deltas(h: Harness) -> None:
    h.wr(MCR, MCR_LOOP)
    assert h.rd(MSR) == 0x0B  # CTS, DSR, DCD dropped
    assert h.rd(MSR) == 0x00  # reading MSR cleared the deltas
    h.wr(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT1 | MCR_OUT2)
    assert h.rd(MSR) == 0xF0 | 0x0B  # RI rising is not a TERI edge
    h.wr(MCR, MCR_LOOP | MCR_DTR | MCR_RTS | MCR_OUT2)
    assert h.rd(MSR) == 0xB0 | 0x04  # RI trailing edge
    h.wr(MCR, MCR_LOOP | MCR_RTS)
    assert h.rd(MSR) == 0x10 | 0x0A  # DSR and DCD dropped
    h.wr(MCR, 0)
    assert h.rd(MSR) == 0xB0 | 0x0A  # back to the connected line; CTS was up
    assert h.rd(MSR) == 0xB0


def test_modem_status_interrupt(h: Harness) -> None:
    h.wr(IER, IER_EDSSI)
    h.wr(MCR, MCR_OUT2)
    assert h.rd(IIR) == 0x01
    assert h.irqs == []
    h.wr(MCR, MCR_LOOP | MCR_OUT2 | MCR_RTS | MCR_DTR)  # RI, CTS, DSR, DCD unchanged
    assert h.rd(IIR) == 0x01
    h.wr(MCR, MCR_LOOP | MCR_OUT2 | MCR_DTR)  # CTS drops
    assert h.rd(IIR) == 0x00
    assert h.irqs == [True]
    assert h.rd(MSR) == 0xA0 | 0x01
    assert h.rd(IIR) == 0x01
    assert h.irqs == [True, False]


def test_loopback_transmit_goes_to_receiver(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(MCR, MCR_LOOP)
    for byte in b"loop":
        h.wr(THR, byte)
    assert h.out == []
    assert h.uart.tx_bytes == 0
    assert h.drain() == b"loop"
    assert h.uart.rx_bytes == 0


def test_host_input_waits_while_in_loopback(h: Harness) -> None:
    h.wr(FCR, 0x01)
    h.wr(MCR, MCR_LOOP)
    assert h.uart.feed(b"host") == 4
    assert h.rd(LSR) == IDLE_LSR  # the serial input is disconnected
    h.wr(THR, ord("L"))
    assert h.drain() == b"L"
    h.wr(MCR, 0)
    assert h.drain() == b"host"


# Interrupt line ---------------------------------------------------------------------


def test_out2_gates_the_irq_line(h: Harness) -> None:
    h.wr(IER, IER_ETBEI)
    assert h.irqs == []
    assert h.uart.irq_level is False
    h.wr(MCR, MCR_OUT2)
    assert h.irqs == [True]
    assert h.uart.irq_level is True
    h.wr(MCR, MCR_DTR)
    assert h.irqs == [True, False]
    # The interrupt itself is still pending behind the gate.
    assert h.rd(IIR) == 0x02


def test_irq_called_only_on_level_changes(h: Harness) -> None:
    h.wr(MCR, MCR_OUT2)
    h.wr(FCR, 0x01)
    h.wr(IER, IER_ERBFI)
    for chunk in (b"a", b"bc", b"def"):
        h.uart.feed(chunk)
    h.wr(IER, IER_ERBFI | IER_ELSI)
    h.rd(LSR)
    assert h.irqs == [True]
    assert h.drain() == b"abcdef"
    assert h.irqs == [True, False]
    h.uart.feed(b"g")
    assert h.irqs == [True, False, True]


def test_reset_restores_power_on_state(h: Harness) -> None:
    h.wr(LCR, LCR_DLAB)
    h.wr(DLL, 1)
    h.wr(LCR, 0x03)
    h.wr(FCR, 0xC1)
    h.wr(MCR, MCR_OUT2 | MCR_LOOP)
    h.wr(IER, 0x0F)
    h.wr(SCR, 0x77)
    h.uart.feed(b"data")
    h.wr(MCR, MCR_OUT2)
    h.wr(THR, ord("t"))
    assert h.irqs == [True]
    h.uart.reset()
    assert h.irqs == [True, False]
    assert [h.rd(off) for off in range(8)] == [0, 0, 0x01, 0, 0, 0x60, 0xB0, 0]
    assert h.uart.baud == 9600
    assert not h.uart.fifo_enabled
    assert h.uart.rx_pending == 0
    assert (h.uart.tx_bytes, h.uart.rx_bytes) == (1, 4)


# Threads ------------------------------------------------------------------------------


def test_feeder_thread_and_reader_keep_order() -> None:
    # The device takes no lock: like the machine, the caller serialises every
    # call (from the host thread and the "vCPU") with one lock per device.
    h = Harness(host_queue_limit=64)  # small, so the feeder is pushed back often
    h.wr(FCR, 0x01)
    data = bytes(i * 7 % 256 for i in range(5000))
    device_lock = threading.Lock()

    def feeder() -> None:
        sent = 0
        while sent < len(data):
            with device_lock:
                sent += h.uart.feed(data[sent : sent + 100])

    thread = threading.Thread(target=feeder)
    thread.start()
    received = bytearray()
    while len(received) < len(data):
        with device_lock:
            if h.rd(LSR) & LSR_DR:
                received.append(h.rd(RBR))
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert bytes(received) == data
    assert h.uart.rx_bytes == len(data)
    assert h.rd(LSR) == IDLE_LSR

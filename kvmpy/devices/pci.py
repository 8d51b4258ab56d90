"""PCI: a host bridge with configuration mechanism #1, and a generic PCI function.

The host bridge answers the ports a PC's chipset does (QEMU's i440FX/PIIX3):

=========== ====== =========================================================
port        width  register
=========== ====== =========================================================
0xcf8       dword  CONFIG_ADDRESS: enable (31), bus (23-16), device (15-11),
                   function (10-8), register (7-2).  Narrower accesses to
                   0xcf8-0xcfb (but 0xcf9) neither change nor read it: a
                   read gives all-ones, a write is dropped, so Linux's probe
                   (a byte written to 0xcfb) leaves it alone.
0xcf9       byte   PIIX reset control: writing bit 2 (RST_CPU) resets the
                   machine; bit 1 (SYS_RST) is kept and read back
0xcfc-0xcff any    CONFIG_DATA: the selected function's configuration space at
                   register + (port - 0xcfc), 1, 2 or 4 bytes
=========== ====== =========================================================

Functions that are not there (and any bus but 0, and any access while the
enable bit is clear) read all-ones; writes to them are dropped.

A ``PciFunction`` is a 256-byte configuration space with a write mask: what
the guest may change (command, cache line, latency, BARs, interrupt line) is
in the mask, everything else is read-only.  A BAR of size S decodes its
address bits only, so the usual size probe (write all-ones, read back)
answers ~(S - 1) plus the type bits (a 64-bit BAR's high register all
ones below 4 GiB).  Status bits are write-1-to-clear.  While the command
register enables I/O or memory decode, the host maps each BAR that lies in
its windows on the port or MMIO bus (see ``PciHost``).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from kvmpy.bus import BusError, DeviceSpaces
from kvmpy.devices.base import (
    U8,
    U32,
    DeviceStateError,
    IrqCallback,
    NoState,
    Stateless,
    access_fits,
    all_ones,
    bounded,
    check_state,
    flags,
    no_irq,
)
from kvmpy.records import Record, replace

CONFIG_ADDRESS_PORT = 0xCF8
RESET_CONTROL_PORT = 0xCF9
CONFIG_DATA_PORT = 0xCFC
CONFIG_DATA_PORTS = 4

CONFIG_ENABLE = 1 << 31
CONFIG_SPACE_SIZE = 256
MAX_DEVICES = 32
MAX_FUNCTIONS = 8

# Reset control register bits (PIIX3 datasheet, RCR).
RCR_SYS_RST = 1 << 1
RCR_RST_CPU = 1 << 2

# Configuration space header (type 0) offsets.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

HEADER_MULTIFUNCTION = 0x80
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = 0x0547  # I/O, memory, bus master, parity, SERR, INTx disable
STATUS_WRITE_ONE_TO_CLEAR = 0xF900  # the error bits

BAR_IO = 0x1  # bit 0 of an I/O BAR
BAR_MEM64 = 0x4
BAR_PREFETCHABLE = 0x8
COMMAND_IO = 1 << 0  # the function decodes its I/O BARs
COMMAND_MEMORY = 1 << 1  # ... and its memory BARs

# QEMU's PC: Intel 440FX host bridge and PIIX3 ISA bridge.
INTEL_VENDOR = 0x8086
I440FX_DEVICE = 0x1237
PIIX3_ISA_DEVICE = 0x7000
CLASS_HOST_BRIDGE = 0x060000
CLASS_ISA_BRIDGE = 0x060100

# PCI INTA-INTD reach IOAPIC pins 16-19, swizzled by slot, as on QEMU's q35.
PCI_IRQ_BASE = 16
PCI_IRQ_PINS = 4


class PciAddress(Record):
    bus: int
    device: int
    function: int

    def __post_init__(self) -> None:
        if not (0 <= self.bus < 256 and 0 <= self.device < 32 and 0 <= self.function < 8):
            raise ValueError(f"bad PCI address {self}")

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function}"


class PciBar(Record):
    """A base address register: ``size`` bytes (a power of two) of I/O or memory space.

    A memory BAR with ``address64`` takes two registers (the next holds the
    address's high half), as 64-bit BARs do.
    """

    size: int
    io: bool = False
    prefetchable: bool = False
    address64: bool = False

    def __post_init__(self) -> None:
        smallest = 4 if self.io else 16
        largest = 1 << 16 if self.io else 1 << (63 if self.address64 else 31)
        if not smallest <= self.size <= largest or self.size & (self.size - 1):
            raise ValueError(
                f"a PCI BAR is a power of two of {smallest} to {largest:#x} bytes, not {self.size}"
            )
        if self.io and (self.prefetchable or self.address64):
            raise ValueError("an I/O BAR is neither prefetchable nor 64-bit")

    @property
    def registers(self) -> int:
        """How many of the six BAR registers it takes."""
        return 2 if self.address64 else 1


def pci_interrupt_gsi(device: int, pin: int) -> int:
    """The IOAPIC pin that interrupt ``pin`` (1 = INTA) of slot ``device`` drives."""
    return PCI_IRQ_BASE + (device + pin - 1) % PCI_IRQ_PINS


class PciFunction:
    """One function's configuration space: identity, BARs, interrupt pin.

    Subclasses (a real device) answer accesses to their BARs in ``read_bar``
    and ``write_bar`` (``offset`` lies inside the BAR; a port access may run
    past its end), may override ``config_written`` to see what the guest
    changed, and raise their interrupt with ``set_interrupt``.  The host maps
    and unmaps the BARs (``PciHost``).  The board connects the pin
    (``connect_interrupt``), as firmware would, writing the IOAPIC pin to the
    interrupt line register.
    """

    def __init__(
        self,
        vendor: int,
        device: int,
        class_code: int,
        *,
        revision: int = 0,
        header_type: int = 0,
        subsystem_vendor: int = 0,
        subsystem: int = 0,
        bars: Sequence[PciBar] = (),
    ) -> None:
        registers = [sum(bar.registers for bar in bars[:i]) for i in range(len(bars) + 1)]
        if registers[-1] > BAR_COUNT:
            raise ValueError(f"a PCI function has {BAR_COUNT} BAR registers, not {registers[-1]}")
        self.bars = tuple(bars)
        # Where each BAR's (low) register is in configuration space.
        self.bar_offsets = tuple(BAR0 + 4 * register for register in registers[:-1])
        self._irq: IrqCallback = no_irq
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.write_mask = bytearray(CONFIG_SPACE_SIZE)
        struct.pack_into("<HH", self.config, VENDOR_ID, vendor, device)
        self.config[REVISION_ID] = revision
        self.config[CLASS_CODE : CLASS_CODE + 3] = class_code.to_bytes(3, "little")
        self.config[HEADER_TYPE] = header_type
        struct.pack_into("<HH", self.config, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        struct.pack_into("<H", self.write_mask, COMMAND, COMMAND_WRITABLE)
        self.write_mask[CACHE_LINE_SIZE] = 0xFF
        self.write_mask[LATENCY_TIMER] = 0xFF
        self.write_mask[INTERRUPT_LINE] = 0xFF
        # A BAR decodes only its address bits: the size probe reads ~(size - 1).
        for bar, at in zip(self.bars, self.bar_offsets, strict=True):
            if bar.io:
                flags, mask = BAR_IO, ~(bar.size - 1) & 0xFFFF_FFFC
            else:
                flags = (BAR_PREFETCHABLE if bar.prefetchable else 0) | (
                    BAR_MEM64 if bar.address64 else 0
                )
                mask = ~(bar.size - 1) & 0xFFFF_FFF0
            struct.pack_into("<I", self.config, at, flags)
            struct.pack_into("<I", self.write_mask, at, mask)
            if bar.address64:
                struct.pack_into("<I", self.write_mask, at + 4, ~(bar.size - 1) >> 32 & U32)
        self.power_on = bytes(self.config)

    def connect_interrupt(self, pin: int, line: int, irq: IrqCallback) -> None:
        """Give the function interrupt ``pin`` (1-4: INTA-INTD), routed to IOAPIC ``line``."""
        if not 1 <= pin <= PCI_IRQ_PINS:
            raise ValueError("interrupt pin is 1-4 (INTA-INTD)")
        self.config[INTERRUPT_PIN] = pin
        self.config[INTERRUPT_LINE] = line
        self.keep_as_power_on()
        self._irq = irq

    def keep_as_power_on(self) -> None:
        """What configuration space holds now is its power-on state: what firmware left
        there (interrupt line, BARs), which ``reset`` returns to."""
        self.power_on = bytes(self.config)

    def set_interrupt(self, level: bool) -> None:
        """Drive the function's interrupt pin (a no-op while INTx is disabled or unconnected)."""
        command = self.read_config(COMMAND, 2)
        self._irq(level and not command & COMMAND_INTX_DISABLE)

    @property
    def interrupt_pin(self) -> int:
        return self.config[INTERRUPT_PIN]

    @property
    def vendor(self) -> int:
        return int(struct.unpack_from("<H", self.config, VENDOR_ID)[0])

    def bar_address(self, index: int, config: bytes | bytearray | None = None) -> int:
        """Where the guest put BAR ``index`` (0 until it programs it).

        ``config``: read it from that configuration space (a saved one) instead.
        """
        space = self.config if config is None else config
        bar, at = self.bars[index], self.bar_offsets[index]
        value = int(struct.unpack_from("<I", space, at)[0])
        if bar.io:
            return value & ~0x3 & U32
        if bar.address64:
            value |= int(struct.unpack_from("<I", space, at + 4)[0]) << 32
        return value & ~0xF

    def decoded_bars(self, config: bytes | bytearray | None = None) -> list[tuple[int, int]]:
        """(index, address) of every BAR the command register lets decode (of ``config``)."""
        space = self.config if config is None else config
        command = int.from_bytes(space[COMMAND : COMMAND + 2], "little")
        return [
            (index, self.bar_address(index, space))
            for index, bar in enumerate(self.bars)
            if command & (COMMAND_IO if bar.io else COMMAND_MEMORY)
        ]

    def place_bar(self, index: int, address: int) -> None:
        """Program BAR ``index`` to ``address`` (its low register, and a 64-bit BAR's high one)."""
        at = self.bar_offsets[index]
        self.write_config(at, 4, address & U32)
        if self.bars[index].address64:
            self.write_config(at + 4, 4, address >> 32)

    def read_bar(self, index: int, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``offset`` into BAR ``index``'s range: a hook."""
        return all_ones(size)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        """A guest write into BAR ``index``'s range: a hook (dropped by default)."""
        return None

    def read_config(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            at = offset + i
            if at >= CONFIG_SPACE_SIZE:
                break
            byte = (value >> (8 * i)) & 0xFF
            if STATUS <= at < STATUS + 2:
                clear = byte & (STATUS_WRITE_ONE_TO_CLEAR >> (8 * (at - STATUS))) & 0xFF
                self.config[at] &= ~clear & 0xFF
                continue
            mask = self.write_mask[at]
            self.config[at] = (self.config[at] & ~mask & 0xFF) | (byte & mask)
        self.config_written(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        """The guest wrote ``size`` bytes at ``offset`` (after masking): a hook."""
        return None

    def reset(self) -> None:
        """Power-on state: configuration space (a subclass resets its device too)."""
        self.config[:] = self.power_on

    def state(self) -> Any:
        """The device behind the function, beyond configuration space (the host saves
        that): a frozen, versioned record, as a device's ``state()``.  A subclass
        whose BARs hold state overrides this, ``restore`` and ``reset``."""
        return NoState()

    def restore(self, state: Any) -> None:
        """Take a saved ``state()``, validated first (DeviceStateError if unacceptable)."""
        check_state(type(self).__name__, state, NoState)

    def config_problem(self, config: bytes) -> str | None:
        """Why ``config`` cannot be this function's (a saved state): None when it can.

        It must be 256 bytes that differ from power-on only where the guest
        may write: the write mask, and the status bits it clears.
        """
        if len(config) != CONFIG_SPACE_SIZE:
            return f"{len(config)} bytes, not {CONFIG_SPACE_SIZE}"
        for at in range(CONFIG_SPACE_SIZE):
            changeable = self.write_mask[at]
            if STATUS <= at < STATUS + 2:
                changeable |= (STATUS_WRITE_ONE_TO_CLEAR >> (8 * (at - STATUS))) & 0xFF
            if (config[at] ^ self.power_on[at]) & ~changeable & 0xFF:
                return f"byte {at:#x} is {config[at]:#x}, read-only there"
        return None


def _key(address: PciAddress) -> tuple[int, int, int]:
    return (address.bus, address.device, address.function)


def i440fx_host_bridge() -> PciFunction:
    """00:00.0 on QEMU's PC: the Intel 440FX host bridge."""
    return PciFunction(INTEL_VENDOR, I440FX_DEVICE, CLASS_HOST_BRIDGE, revision=0x02)


def piix3_isa_bridge() -> PciFunction:
    """00:01.0 on QEMU's PC: the PIIX3 PCI-to-ISA bridge (multi-function, as in QEMU)."""
    return PciFunction(
        INTEL_VENDOR, PIIX3_ISA_DEVICE, CLASS_ISA_BRIDGE, header_type=HEADER_MULTIFUNCTION
    )


class _Port:
    """One of the host's port ranges: checks the access, then calls the host."""

    def __init__(
        self,
        host: PciHost,
        length: int,
        read: Callable[[int, int], int],
        write: Callable[[int, int, int], None],
    ) -> None:
        self._host = host
        self._length = length
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, self._length):
            self._host.ignored_accesses += 1
            return all_ones(size)
        return self._read(offset, size) & all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, self._length):
            self._host.ignored_accesses += 1
            return
        self._write(offset, size, value & all_ones(size))


ALL_BARS = (1 << BAR_COUNT) - 1


class PciHostState(Record):
    VERSION: ClassVar[int] = 2
    config_address: int = bounded(0, U32)
    reset_control: int = flags(RCR_SYS_RST)
    # Every function's configuration space, in the order of their addresses.
    configs: tuple[bytes, ...] = bounded(0, U8, max_length=MAX_DEVICES * MAX_FUNCTIONS)
    # Per function, the same order: which BARs are on a bus (bit n: BAR n).  Saved,
    # not derived: a BAR that decodes may have been refused (put over a taken
    # range), and which of two overlapping BARs won depends on the guest's order.
    # Empty in a state upgraded from version 1, which did not say: restore then maps
    # what decodes, function by function and BAR by BAR, as the live rule would.
    mapped_bars: tuple[int, ...] = bounded(
        0, ALL_BARS, max_length=MAX_DEVICES * MAX_FUNCTIONS, mask=ALL_BARS
    )

    @staticmethod
    def upgrade(version: int, fields: dict[str, object]) -> dict[str, object]:
        """A saved version's fields, as this version's (the snapshot checks them after)."""
        if version == 1:
            return {**fields, "mapped_bars": []}
        return fields


class _BarRange(Stateless):
    """What the bus calls for one decoded BAR: the function's BAR hooks, with the index.

    Its state is the function's (the configuration space and the device behind).
    """

    def __init__(self, function: PciFunction, index: int) -> None:
        self._function = function
        self._index = index

    def read(self, offset: int, size: int) -> int:
        return self._function.read_bar(self._index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._function.write_bar(self._index, offset, size, value)


class BarPlacement(Record):
    """Where one BAR of a saved state goes on a bus."""

    where: PciAddress
    index: int
    io: bool
    address: int
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def label(self) -> str:
        return f"{self.where} BAR{self.index}"


class PciWindows(Record):
    """The address ranges the host bridge forwards to bus 0: a BAR decodes only inside them.

    ``io`` and ``memory`` are [start, end) ranges; the board's ACPI ``_CRS``
    says the same.
    """

    io: tuple[int, int]
    memory: tuple[int, int]


# Without a board's windows, BARs never decode.
NO_WINDOWS = PciWindows((0, 0), (0, 0))


class PciHost:
    """Bus 0 behind configuration mechanism #1, and the PIIX reset control register.

    ``functions`` maps addresses on bus 0 to their functions.  Map
    ``address_port`` at 0xcf8 (1 port: a dword there is the register),
    ``reset_port`` at 0xcf9, ``address_tail_port`` at 0xcfa (2 ports: the
    register's other bytes, which narrow accesses neither read nor change)
    and ``data_port`` at 0xcfc (4 ports).

    BARs: once the buses are attached (``attach``), a BAR whose decode bit
    (I/O or memory space in the command register) is set and whose address
    lies wholly inside ``windows`` is mapped on the port or MMIO bus, and
    routed to its function's ``read_bar``/``write_bar``; moving it or turning
    decode off unmaps it.  A BAR the guest puts over a range already taken
    (another device, another BAR) stays unmapped, counted in ``refused_bars``,
    until it moves somewhere free, as a hostile guest gets nothing from it.

    With ``firmware_bars``, the host does at power-on (and on every reset) what a
    PC's firmware does before the kernel runs: it places every BAR, in order of
    function address, at the next free address of its window aligned to its
    size, and turns the functions' decoding on, so that a kernel that expects
    firmware to have done so (as kvm-unit-tests does of SeaBIOS) finds them
    ready.  A BAR that does not fit is left at 0 and its decode bit off.

    Its state saves which BARs are mapped, and ``restore`` maps exactly those
    (see there); ``reset`` goes back to power-on, BARs included.  Each function's own ``state()``
    (the device behind its BARs) is saved beside the host's (``state_parts``).
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        functions: dict[PciAddress, PciFunction],
        request_reset: Callable[[], None],
        windows: PciWindows = NO_WINDOWS,
        *,
        firmware_bars: bool = False,
    ) -> None:
        for address in functions:
            if address.bus != 0:
                raise ValueError(f"PCI function {address}: only bus 0 is modelled")
        self.functions = dict(functions)
        if firmware_bars:
            self._place_bars_as_firmware(windows)
        self.request_reset = request_reset
        self.windows = windows
        self.config_address = 0
        self.reset_control = 0
        self.ignored_accesses = 0
        self.refused_bars = 0
        self._spaces: DeviceSpaces | None = None
        # (function address, BAR index) -> (address, its range object) of mapped BARs.
        self._mapped: dict[tuple[PciAddress, int], tuple[int, _BarRange]] = {}
        self._refused: dict[tuple[PciAddress, int], int] = {}  # and where it was refused
        self.address_port = _Port(self, 1, self._read_address, self._write_address)
        self.address_tail_port = _Port(self, 2, self._read_nothing, self._write_nothing)
        self.reset_port = _Port(self, 1, self._read_reset_control, self._write_reset_control)
        self.data_port = _Port(self, CONFIG_DATA_PORTS, self._read_data, self._write_data)

    # The device itself answers as CONFIG_DATA (for callers holding it directly).
    def read(self, offset: int, size: int) -> int:
        return self.data_port.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.data_port.write(offset, size, value)

    def state(self) -> PciHostState:
        addresses = sorted(self.functions, key=_key)
        configs = tuple(bytes(self.functions[a].config) for a in addresses)
        mapped = set(self._mapped)
        masks = tuple(
            sum(1 << index for index in range(BAR_COUNT) if (a, index) in mapped) for a in addresses
        )
        return PciHostState(self.config_address, self.reset_control, configs, masks)

    def restore(self, state: PciHostState) -> None:
        """Take a saved state, BARs included: checked whole before anything changes.

        The BARs the state says were on a bus are mapped again where its
        configuration spaces put them (``BarPlacement``); each must decode,
        lie in the windows, and overlap neither another such BAR nor any
        other range on the buses, or the state is refused.
        """
        checked = check_state("pci", state, PciHostState)
        addresses = sorted(self.functions, key=_key)
        functions = [self.functions[a] for a in addresses]
        if not checked.mapped_bars and functions:  # from a version-1 state
            checked = replace(checked, mapped_bars=self._live_masks(functions, checked.configs))
        for name, saved in (("configs", checked.configs), ("mapped_bars", checked.mapped_bars)):
            if len(saved) != len(functions):
                raise DeviceStateError("pci", name, f"{len(saved)} functions, not {len(functions)}")
        for function, config in zip(functions, checked.configs, strict=True):
            problem = function.config_problem(config)
            if problem:
                raise DeviceStateError("pci", "configs", problem)
        placements = self._saved_placements(addresses, checked)
        self.config_address = checked.config_address
        self.reset_control = checked.reset_control
        for function, config in zip(functions, checked.configs, strict=True):
            function.config[:] = config
        self._place_bars(placements)

    def reset(self) -> None:
        self.config_address = 0
        self.reset_control = 0
        for function in self.functions.values():
            function.reset()
        self._refused.clear()
        self._map_all_bars()

    def _place_bars_as_firmware(self, windows: PciWindows) -> None:
        """Place every BAR and enable decoding, as power-on state (see the class docstring)."""
        free = {True: windows.io[0], False: windows.memory[0]}
        ends = {True: windows.io[1], False: windows.memory[1]}
        for where in sorted(self.functions, key=_key):
            function = self.functions[where]
            command = 0
            for index, bar in enumerate(function.bars):
                address = -(-free[bar.io] // bar.size) * bar.size  # aligned to its size
                if address + bar.size > ends[bar.io]:
                    continue
                function.place_bar(index, address)
                free[bar.io] = address + bar.size
                command |= COMMAND_IO if bar.io else COMMAND_MEMORY
            if command:
                function.write_config(COMMAND, 2, function.read_config(COMMAND, 2) | command)
            function.keep_as_power_on()

    def state_parts(self) -> dict[str, PciFunction]:
        """Each function by address: a snapshot saves its own ``state()`` beside the host's."""
        return {str(a): self.functions[a] for a in sorted(self.functions, key=_key)}

    # -- BARs on the buses ---------------------------------------------------------------

    def attach(self, spaces: DeviceSpaces) -> None:
        """Map BARs through ``spaces`` from now on (the machine does this once)."""
        self._spaces = spaces
        self._map_all_bars()

    def mapped_bars(self) -> dict[tuple[PciAddress, int], int]:
        """(function address, BAR index) -> address of every BAR on a bus now."""
        return {key: address for key, (address, _) in self._mapped.items()}

    def _saved_placements(
        self, addresses: list[PciAddress], state: PciHostState
    ) -> list[BarPlacement]:
        """The BARs ``state`` has on a bus, checked; DeviceStateError if one cannot be."""
        placements = []
        for where, config, mask in zip(addresses, state.configs, state.mapped_bars, strict=True):
            function = self.functions[where]
            if mask >> len(function.bars):
                raise DeviceStateError(
                    "pci",
                    "mapped_bars",
                    f"{where} has {len(function.bars)} BARs, not BAR{mask.bit_length() - 1}",
                )
            decoded = dict(function.decoded_bars(config))
            for index, bar in enumerate(function.bars):
                if not mask >> index & 1:
                    continue
                address = decoded.get(index)
                label = f"{where} BAR{index}"
                if address is None:
                    raise DeviceStateError(
                        "pci",
                        "mapped_bars",
                        f"{label} is mapped, but its command register does not decode it",
                    )
                if not self._decodes(bar, address):
                    raise DeviceStateError(
                        "pci",
                        "mapped_bars",
                        f"{label} at {address:#x}+{bar.size:#x} is mapped outside the "
                        "host bridge's windows",
                    )
                placements.append(BarPlacement(where, index, bar.io, address, bar.size))
        for io in (True, False):
            ranges = sorted((p for p in placements if p.io == io), key=lambda p: p.address)
            for first, second in itertools.pairwise(ranges):
                if second.address < first.end:
                    raise DeviceStateError(
                        "pci",
                        "mapped_bars",
                        f"{first.label} and {second.label} are both mapped at {second.address:#x}",
                    )
        if self._spaces is not None:
            ours = {id(window) for _, window in self._mapped.values()}
            for placement in placements:
                bus = self._spaces.ports if placement.io else self._spaces.mmio
                if placement.end > bus.address_limit:
                    raise DeviceStateError(
                        "pci", "mapped_bars", f"{placement.label} runs past the {bus.name} space"
                    )
                for mapping in bus.mappings:
                    if id(mapping.device) in ours:
                        continue  # a BAR of this host's, unmapped before these are mapped
                    if placement.address < mapping.end and mapping.base < placement.end:
                        raise DeviceStateError(
                            "pci",
                            "mapped_bars",
                            f"{placement.label} at {placement.address:#x} overlaps {mapping.name}",
                        )
        return placements

    def _place_bars(self, placements: list[BarPlacement]) -> None:
        """Put exactly ``placements`` on the buses (checked by ``_saved_placements``)."""
        spaces = self._spaces
        if spaces is None:
            return
        # Everything off first: a BAR may take a place another BAR leaves.
        for (where, index), (address, window) in self._mapped.items():
            spaces.unregister(self.functions[where].bars[index].io, address, window)
        self._mapped.clear()
        self._refused.clear()
        for placement in placements:
            function = self.functions[placement.where]
            window = _BarRange(function, placement.index)
            spaces.register(
                placement.io, placement.address, placement.size, window, f"PCI {placement.label}"
            )
            self._mapped[(placement.where, placement.index)] = (placement.address, window)
        # A BAR that decodes in the windows but was left off had been refused there.
        for where, function in self.functions.items():
            for index, address in function.decoded_bars():
                key = (where, index)
                if key not in self._mapped and self._decodes(function.bars[index], address):
                    self._refused[key] = address

    def _live_masks(
        self, functions: list[PciFunction], configs: tuple[bytes, ...]
    ) -> tuple[int, ...]:
        """Which BARs the live rule would map for these configuration spaces, in order:
        each that decodes inside the windows, unless an earlier one took its place."""
        if len(configs) != len(functions):
            return ()  # restore reports the mismatch
        taken: list[tuple[bool, int, int]] = []
        masks = []
        for function, config in zip(functions, configs, strict=True):
            mask = 0
            for index, address in function.decoded_bars(config):
                bar = function.bars[index]
                end = address + bar.size
                clash = any(
                    io == bar.io and start < end and address < stop for io, start, stop in taken
                )
                if self._decodes(bar, address) and not clash:
                    taken.append((bar.io, address, end))
                    mask |= 1 << index
            masks.append(mask)
        return tuple(masks)

    def _map_all_bars(self) -> None:
        for address, function in self.functions.items():
            self._map_bars(address, function)

    def _decodes(self, bar: PciBar, address: int) -> bool:
        start, end = self.windows.io if bar.io else self.windows.memory
        return start <= address and address + bar.size <= end

    def _map_bars(self, where: PciAddress, function: PciFunction) -> None:
        """Bring the buses in line with ``function``'s BARs and command register."""
        spaces = self._spaces
        if spaces is None:
            return
        wanted = {
            index: address
            for index, address in function.decoded_bars()
            if self._decodes(function.bars[index], address)
        }
        for index, bar in enumerate(function.bars):
            key = (where, index)
            mapped = self._mapped.get(key)
            address = wanted.get(index)
            if mapped is not None and mapped[0] == address:
                continue
            if mapped is not None:
                spaces.unregister(bar.io, mapped[0], mapped[1])
                del self._mapped[key]
            if address is None:
                continue
            window = _BarRange(function, index)
            try:
                spaces.register(bar.io, address, bar.size, window, f"PCI {where} BAR{index}")
            except BusError:
                if self._refused.get(key) != address:  # count each refused placement once
                    self._refused[key] = address
                    self.refused_bars += 1
                continue
            self._refused.pop(key, None)
            self._mapped[key] = (address, window)

    def function_at(self, bus: int, device: int, function: int) -> PciFunction | None:
        if bus != 0:
            return None
        return self.functions.get(PciAddress(bus, device, function))

    # -- CONFIG_ADDRESS ----------------------------------------------------------------

    def _read_address(self, offset: int, size: int) -> int:
        if offset != 0 or size != 4:
            return (1 << (8 * size)) - 1
        return self.config_address

    def _write_address(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.config_address = value & 0xFFFF_FFFF

    @staticmethod
    def _read_nothing(offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    @staticmethod
    def _write_nothing(offset: int, size: int, value: int) -> None:
        return None

    # -- the PIIX reset control register --------------------------------------------

    def _read_reset_control(self, offset: int, size: int) -> int:
        return self.reset_control

    def _write_reset_control(self, offset: int, size: int, value: int) -> None:
        if value & RCR_RST_CPU:
            self.request_reset()
            return
        self.reset_control = value & RCR_SYS_RST

    # -- CONFIG_DATA -------------------------------------------------------------------

    def _selected(self, offset: int) -> tuple[PciFunction, int] | None:
        address = self.config_address
        if not address & CONFIG_ENABLE:
            return None
        function = self.function_at(
            (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        )
        if function is None:
            return None
        return function, (address & 0xFC) + offset

    def _read_data(self, offset: int, size: int) -> int:
        selected = self._selected(offset)
        if selected is None:
            return (1 << (8 * size)) - 1
        function, register = selected
        return function.read_config(register, size)

    def _write_data(self, offset: int, size: int, value: int) -> None:
        selected = self._selected(offset)
        if selected is not None:
            function, register = selected
            function.write_config(register, size, value)
            if register < BAR0 + 4 * BAR_COUNT and register + size > COMMAND:
                address = self.config_address
                self._map_bars(
                    PciAddress(0, (address >> 11) & 0x1F, (address >> 8) & 0x7), function
                )

"""What a vCPU's ``run()`` returns: generic exit kinds, and the exit record's fields.

Every backend produces these.  The KVM backend's C shim decodes
``struct kvm_run`` straight into the same numbers (it mirrors this table, and
the backend checks at import that the two agree), so the hot loop compares
plain integers; a CPU-emulator or a fake backend fills an ``ExitRecord``.

``run()`` returns an ``ExitKind`` value, or ``-errno``: ``-EINTR``/``-EAGAIN``
when the vCPU was kicked, anything else when the backend failed.
"""

from __future__ import annotations

import enum

from kvmpy.records import Record, field


class ExitKind(enum.IntEnum):
    """Why ``run()`` returned.  Port I/O is the second address space some
    architectures have; a backend for one without it never returns those."""

    PORT_OUT = 1  # one OUT: io_port, io_size, value
    PORT_IN = 2  # one IN: io_port, io_size; the result goes to io_buffer[data_offset:]
    PORT_STRING = 3  # rep ins/outs: io_count items of io_size at io_buffer[data_offset:]
    MMIO = 4  # mmio_addr, mmio_len, mmio_is_write, value; reads go to io_buffer[data_offset:]
    HLT = 5  # the vCPU halted and the backend cannot wake it itself
    SHUTDOWN = 6  # triple fault
    INTERNAL_ERROR = 7  # the backend could not run an instruction (see describe_exit)
    FAIL_ENTRY = 8  # the backend could not enter the guest
    SYSTEM_EVENT = 9  # power-off, reset or crash signalled by the platform (system_event)
    DEBUG = 10  # single-step or breakpoint: debug_exception, debug_pc, debug_dr6, debug_dr7
    SPURIOUS = 11  # nothing to do: run again (an interrupt window, a host interrupt)
    OTHER = 12  # anything else: the architecture hook decides (reason holds the raw code)


# In exit-statistics keys (kind << 40 | where): the backend answered these exits
# itself (ExitWindow), so the run loop never saw them.
ANSWERED_IN_BACKEND = 1 << 48

# ExitRecord.io_direction of a PORT_STRING exit that writes (OUT); 0 reads (IN).
IO_DIRECTION_OUT = 1


class SystemEvent(enum.IntEnum):
    """``system_event`` values of a SYSTEM_EVENT exit."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    OTHER = 4


class ExitRecord(Record, frozen=False):
    """The decoded exit, for backends written in Python (the shim has its own struct).

    Only the fields for the kind returned are meaningful.
    """

    reason: int = 0  # the backend's raw reason, for names and the arch hook
    io_direction: int = 0
    io_size: int = 0
    io_port: int = 0
    io_count: int = 0
    mmio_is_write: int = 0
    mmio_len: int = 0
    mmio_addr: int = 0
    value: int = 0
    data_offset: int = 0
    system_event: int = 0
    debug_exception: int = 0
    debug_pc: int = 0
    debug_dr6: int = 0
    debug_dr7: int = 0
    detail: list[int] = field(default_factory=list)


# The name each kind has in traces and statistics (KVM's names, as people know them).
EXIT_NAMES = {
    ExitKind.PORT_OUT: "IO_OUT",
    ExitKind.PORT_IN: "IO_IN",
    ExitKind.PORT_STRING: "IO_STRING",
    ExitKind.MMIO: "MMIO",
    ExitKind.HLT: "HLT",
    ExitKind.SHUTDOWN: "SHUTDOWN",
    ExitKind.INTERNAL_ERROR: "INTERNAL_ERROR",
    ExitKind.FAIL_ENTRY: "FAIL_ENTRY",
    ExitKind.SYSTEM_EVENT: "SYSTEM_EVENT",
    ExitKind.DEBUG: "DEBUG",
    ExitKind.SPURIOUS: "INTR",
    ExitKind.OTHER: "OTHER",
}


class ExitWindow(Record):
    """An address range whose accesses a backend may answer without ``run()`` returning.

    ``memory`` set: the range is plain memory; a read returns its bytes at the
    offset and a write stores them (for a port, bytes past the end read 0 and
    writes to them are dropped; an MMIO access must lie wholly inside, or it
    is returned).  ``memory`` None: nothing is there; reads are all-ones,
    writes are dropped, and the backend counts each access (``window_misses``).
    The buses publish these (``Bus.windows``), and a backend that answers them
    gives exactly the answers the bus would.
    """

    base: int
    length: int
    memory: bytearray | None = None

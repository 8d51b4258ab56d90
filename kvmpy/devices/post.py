"""Port 0x80: the POST-code port that firmware and kernels write progress (or delays) to."""

from __future__ import annotations

from typing import ClassVar

from kvmpy.records import Record

from .base import MAX_ACCESS_SIZE, U8, all_ones, bounded, check_state

POST_PORT = 0x80
POST_PORTS = 1  # one port: the only valid offset is 0


class PostCodeState(Record):
    VERSION: ClassVar[int] = 1
    last: int = bounded(0, U8)


class PostCode:
    """Keeps the last byte written, as a POST-code display would; reads return it too.

    Wider accesses write the low byte and read it zero-extended.  ``writes``
    counts writes (a host-side statistic, kept across reset and restore).
    """

    # Only the guest calls it: no host thread does (see Bus.register, only_caller).
    HOST_ENTRY_POINTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0
        self.ignored_accesses = 0

    # The checks are written out, not access_fits(): port 0x80 is the exit
    # round-trip benchmark's port, and a call costs as much as the write.
    def read(self, offset: int, size: int) -> int:
        if offset or not 0 < size <= MAX_ACCESS_SIZE:
            self.ignored_accesses += 1
            return all_ones(size)
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        if offset or not 0 < size <= MAX_ACCESS_SIZE:
            self.ignored_accesses += 1
            return
        self.last = value & 0xFF
        self.writes += 1

    def reset(self) -> None:
        self.last = 0

    def state(self) -> PostCodeState:
        return PostCodeState(self.last)

    def restore(self, state: PostCodeState) -> None:
        self.last = check_state("post", state, PostCodeState).last

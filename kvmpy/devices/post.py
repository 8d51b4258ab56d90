"""Port 0x80: the POST-code port that firmware and kernels write progress (or delays) to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import U8, access_fits, all_ones, bounded, check_state

POST_PORT = 0x80
POST_PORTS = 1


@dataclass(frozen=True)
class PostCodeState:
    VERSION: ClassVar[int] = 1
    last: int = bounded(0, U8)


class PostCode:
    """Keeps the last byte written, as a POST-code display would; reads return it too.

    Wider accesses write the low byte and read it zero-extended.  ``writes``
    counts writes (a host-side statistic, kept across reset and restore).
    """

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0
        self.ignored_accesses = 0

    def read(self, offset: int, size: int) -> int:
        if not access_fits(offset, size, POST_PORTS):
            self.ignored_accesses += 1
            return all_ones(size)
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        if not access_fits(offset, size, POST_PORTS):
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

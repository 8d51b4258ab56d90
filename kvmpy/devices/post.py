"""Port 0x80: the POST-code port that firmware and kernels write progress (or delays) to."""

from __future__ import annotations

POST_PORT = 0x80


class PostCode:
    """Keeps the last byte written, as a POST-code display would; reads return it too."""

    def __init__(self) -> None:
        self.last = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.last

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value & 0xFF
        self.writes += 1

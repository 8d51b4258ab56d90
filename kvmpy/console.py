"""The guest's serial output as a bounded log with absolute offsets.

A chatty guest must not grow the host without bound, so the log keeps at
most about ``limit`` bytes: when it holds twice that, it drops the oldest
half (amortised cost: a copy now and then, not per byte).  Offsets stay
absolute across drops, so a reader that remembers "byte 12345" can tell
whether that byte is still here; ``dropped`` counts what is gone.
"""

from __future__ import annotations

import re

DEFAULT_CONSOLE_LIMIT = 4 << 20


class ConsoleOverrun(LookupError):
    """A read position that the log has already dropped."""


class ConsoleLog:
    """Serial output: the last ``limit`` bytes (or more, up to twice that), addressed absolutely."""

    def __init__(self, limit: int = DEFAULT_CONSOLE_LIMIT) -> None:
        if limit <= 0:
            raise ValueError(f"the console limit must be positive, not {limit}")
        self.limit = limit
        self._data = bytearray()
        self.start = 0  # the absolute offset of the first byte kept

    @property
    def end(self) -> int:
        """The absolute offset just past the last byte written."""
        return self.start + len(self._data)

    @property
    def dropped(self) -> int:
        """How many of the oldest bytes are no longer kept."""
        return self.start

    def append(self, data: bytes) -> None:
        self._data += data
        excess = len(self._data) - self.limit
        if len(self._data) >= 2 * self.limit:
            del self._data[:excess]
            self.start += excess

    def __iadd__(self, data: bytes) -> ConsoleLog:
        self.append(data)
        return self

    def __bytes__(self) -> bytes:
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, needle: bytes) -> bool:
        return needle in self._data

    def count(self, needle: bytes) -> int:
        return self._data.count(needle)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._data.decode(encoding, errors)

    def since(self, position: int) -> bytes:
        """The bytes from absolute ``position`` on; ConsoleOverrun if some were dropped."""
        self._check(position)
        return bytes(self._data[max(position - self.start, 0) :])

    def search(self, regex: re.Pattern[bytes], position: int) -> tuple[re.Match[bytes], int] | None:
        """The first match at or after absolute ``position``, and the absolute offset of
        the match's start (the match's own offsets are relative to what is kept)."""
        self._check(position)
        relative = max(position - self.start, 0)
        if regex.search(self._data, relative) is None:  # no copy until there is a match
            return None
        match = regex.search(bytes(self._data), relative)
        assert match is not None
        return match, self.start + match.start()

    def _check(self, position: int) -> None:
        if position < self.start:
            raise ConsoleOverrun(
                f"the console no longer holds byte {position}: the oldest {self.start} bytes "
                f"were dropped (it keeps about {self.limit} bytes)"
            )

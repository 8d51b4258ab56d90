"""Image loaders: parse and validate an image, return a ``LoadPlan``.

A loader never touches guest memory or vCPUs; the machine applies the plan
after ``check_plan`` has confirmed that it fits.
"""

from __future__ import annotations

from kvmpy.memory import GuestMemory
from kvmpy.records import Record, field


class LoaderError(ValueError):
    """A malformed or unloadable image; the message names the file and the field."""


class LoadSegment(Record):
    """Bytes to place at ``gpa``, followed by zeros up to ``memsz``."""

    gpa: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsz


class LoadPlan(Record, frozen=False):
    """What to place where, and where to start."""

    source: str
    entry: int
    segments: list[LoadSegment] = field(default_factory=list)
    mode: str | None = None  # the CPU mode the image needs, if the format says
    # Initial general-purpose register values the image's boot protocol demands,
    # e.g. {"rax": 0x2BADB002, "rbx": mbi} for Multiboot.
    registers: dict[str, int] = field(default_factory=dict)
    # (start, end) ranges of segments holding loader-built boot data (e.g. the
    # Multiboot information); nothing else the machine places may overlap them.
    reserved: list[tuple[int, int]] = field(default_factory=list)
    # What the loader did beyond placing the image, for `kvmpy run -v`.
    detail: str = ""


def check_plan(plan: LoadPlan, memory: GuestMemory, reserved: list[tuple[int, int]]) -> None:
    """Raise LoaderError unless every segment lies in RAM and clear of ``reserved``,
    and the entry lies in the loaded bytes of a segment that is not boot data."""
    for seg in plan.segments:
        if seg.memsz < len(seg.data):
            raise LoaderError(f"{plan.source}: segment at {seg.gpa:#x} has memsz < filesz")
        if not memory.contains(seg.gpa, max(seg.memsz, 1)):
            raise LoaderError(
                f"{plan.source}: segment {seg.gpa:#x}-{seg.end - 1:#x} does not fit in guest RAM "
                f"({memory.size >> 20} MiB)"
            )
        for start, end in reserved:
            if seg.gpa < end and start < seg.end:
                raise LoaderError(
                    f"{plan.source}: segment {seg.gpa:#x}-{seg.end - 1:#x} overlaps the boot "
                    f"structures at {start:#x}-{end - 1:#x}"
                )
    boot_data = plan.reserved
    if not any(
        seg.gpa <= plan.entry < seg.gpa + len(seg.data)
        and not any(start <= seg.gpa < end for start, end in boot_data)
        for seg in plan.segments
    ):
        # The vCPU would start in memory nothing was loaded into (or outside RAM).
        raise LoaderError(
            f"{plan.source}: entry {plan.entry:#x} is not inside the loaded image "
            f"({_describe_segments(plan)})"
        )


def _describe_segments(plan: LoadPlan) -> str:
    ranges = [
        f"{seg.gpa:#x}-{seg.gpa + len(seg.data) - 1:#x}"
        for seg in plan.segments
        if seg.data and not any(start <= seg.gpa < end for start, end in plan.reserved)
    ]
    if not ranges:
        return "no bytes loaded"
    shown = ", ".join(ranges[:4])
    return f"loaded: {shown}" + (f" and {len(ranges) - 4} more" if len(ranges) > 4 else "")

"""Malformed images: whatever the bytes, loading ends in a plan or a LoaderError.

Each built kernel is damaged many ways (flipped bytes in its headers,
truncation) with a fixed seed, then detected and loaded as `kvmpy run` does.
Any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.loaders import LoaderError, check_plan
from kvmpy.loaders.detect import detect_format, load_image
from kvmpy.memory import GuestMemory
from tests.helpers import guest
from tests.images import IMAGES, elf32, xen_entry_note

RAM_SIZE = 16 << 20
ROUNDS = 150


def damaged(data: bytes, rng: random.Random) -> bytes:
    image = bytearray(data)
    if rng.random() < 0.2:
        return bytes(image[: rng.randrange(len(image))])
    hot = min(len(image), 0x1100)  # ELF and program headers, the multiboot header
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(hot)
        image[at] = rng.randrange(256)
    return bytes(image)


@pytest.mark.parametrize(
    "name", ["multiboot_hello.elf", "pvh_hello.elf", "toykernel.elf", "gdb_target.elf"]
)
def test_damaged_images_give_loader_errors(name: str, tmp_path: Path) -> None:
    stem, suffix = name.split(".")
    original = guest(stem, "." + suffix).read_bytes()
    rng = random.Random(name)
    outcomes = {"loaded": 0, "refused": 0}
    with GuestMemory.with_ram(RAM_SIZE) as memory:
        ram = [(region.gpa, region.size) for region in memory]
        for round_ in range(ROUNDS):
            path = tmp_path / f"{round_}.img"
            path.write_bytes(damaged(original, rng))
            try:
                plan = load_image(
                    path, ram=ram, image_format=detect_format(path), load_addr=0x100000,
                    cmdline="x",
                )  # fmt: skip
                check_plan(plan, memory, [])
                outcomes["loaded"] += 1
            except LoaderError as exc:
                assert str(path) in str(exc)  # the message names the file
                outcomes["refused"] += 1
    assert outcomes["refused"] > 0, outcomes
    assert outcomes["loaded"] > 0, outcomes  # not every damage is fatal: flat, or harmless bytes


# -- property-based: mutated images of every format -------------------------------------
#
# Small valid images of each format (tests/images.py) are mutated by hypothesis:
# bytes overwritten, integers of every width planted (where header fields are),
# truncated or extended.  Each result must be loaded (and then fit RAM, so that the
# machine's writes succeed) or refused with a LoaderError naming the image.  The
# normal suite runs a short, repeatable budget; `make fuzz` sets KVMPY_FUZZ=1 for a
# long random one (KVMPY_FUZZ_EXAMPLES per format, default 20,000).

LONG_FUZZ = bool(os.environ.get("KVMPY_FUZZ"))
FUZZ_EXAMPLES = int(os.environ.get("KVMPY_FUZZ_EXAMPLES", "20000")) if LONG_FUZZ else 200
FUZZ_RAM = 4 << 20


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    image = bytearray(original)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["byte", "int", "truncate", "extend"]))
        if kind == "truncate":
            del image[draw(st.integers(0, len(image))) :]
        elif kind == "extend":
            image += draw(st.binary(max_size=64))
        elif image and kind == "byte":
            image[draw(st.integers(0, len(image) - 1))] = draw(st.integers(0, 255))
        elif image:
            width = draw(st.sampled_from([2, 4, 8]))
            value = draw(
                st.one_of(
                    st.integers(0, (1 << (8 * width)) - 1),
                    st.sampled_from([0, 1, 0x1000, 0x100000, FUZZ_RAM, (1 << (8 * width)) - 1]),
                )
            )
            at = draw(st.integers(0, max(0, len(image) - width)))
            field = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            image[at : at + width] = field[: len(image) - at]
    return bytes(image)


def load_or_refuse(name: str, data: bytes, image_format: str | None = None) -> str:
    """Detect and load ``data`` as `kvmpy run` does; apply the plan to RAM as Machine.load
    does.  Returns "loaded" or "refused"; any other exception fails the test."""
    with GuestMemory.with_ram(FUZZ_RAM) as memory:
        try:
            plan = load_image(
                name, data=data, ram=[(r.gpa, r.size) for r in memory],
                image_format=image_format, load_addr=0x100000, cmdline="fuzz",
            )  # fmt: skip
            check_plan(plan, memory, [(0x500, 0x520), (0x1000, 0x7000)])
        except LoaderError as exc:
            assert str(exc).startswith(f"{name}: "), exc  # the message names the image
            return "refused"
        for segment in plan.segments:
            memory.write(segment.gpa, segment.data)
            memory.zero(segment.gpa + len(segment.data), segment.memsz - len(segment.data))
        return "loaded"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_the_unmutated_images_load(kind: str) -> None:
    data, image_format = IMAGES[kind]
    assert detect_format(kind, data) == image_format
    assert load_or_refuse(kind, data) == "loaded"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_mutated_images_load_or_give_a_loader_error(kind: str) -> None:
    original, image_format = IMAGES[kind]

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=not LONG_FUZZ)
    @given(data=mutated(original), forced=st.booleans())
    def check(data: bytes, forced: bool) -> None:
        # Detected, and also forced to the original's format (as --format does).
        load_or_refuse(f"{kind}.img", data, image_format if forced else None)

    check()


# Cases that found bugs, kept as plain tests: each must be refused with a LoaderError.
CORPUS = {
    # A PVH note whose entry points outside the kernel: was accepted, and the vCPU
    # would have started in unloaded memory (issue 9, item 9).
    "pvh-entry-outside": elf32(notes=xen_entry_note(0x5000)),
    # The same, pointing into the PVH start info that kvmpy builds at 0x9000.
    "pvh-entry-in-start-info": elf32(notes=xen_entry_note(0x9000)),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_is_refused(name: str) -> None:
    assert load_or_refuse(name, CORPUS[name]) == "refused"

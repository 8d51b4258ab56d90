"""Malformed images: whatever the bytes, loading ends in a plan or a LoaderError.

Each built kernel is damaged many ways (flipped bytes in its headers,
truncation) with a fixed seed, then detected and loaded as `kvmpy run` does.
Any other exception would reach the user as a traceback.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kvmpy.loaders import LoaderError, check_plan
from kvmpy.loaders.detect import detect_format, load_image
from kvmpy.memory import GuestMemory
from tests.helpers import guest

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

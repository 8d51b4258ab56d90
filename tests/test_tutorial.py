"""docs/tutorial.md stays true: every console block is run and its output compared.

A block is a ```console fence whose lines starting with "$ " are commands and
the lines after each command its expected output (stdout and stderr
together).  A line "..." matches any number of lines.  An HTML comment
"<!-- doctest: hardware-kvm -->" or "<!-- doctest: pvm -->" just before a block
says which kind of host it is for; on the other kind it is skipped, saying why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, host_kvm_module

TUTORIAL = ROOT / "docs" / "tutorial.md"


@dataclass
class Example:
    line: int
    command: str
    expected: list[str]
    host: str | None


def examples(path: Path) -> list[Example]:
    found: list[Example] = []
    host: str | None = None
    in_block = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        tag = re.fullmatch(r"<!-- doctest: ([\w-]+) -->", line.strip())
        if tag:
            host = tag.group(1)
        elif line.strip() == "```console":
            in_block = True
        elif in_block and line.strip() == "```":
            in_block, host = False, None
        elif in_block and line.startswith("$ "):
            found.append(Example(number, line[2:], [], host))
        elif in_block:
            found[-1].expected.append(line)
    return found


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line-by-line equality, where an expected "..." matches any run of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


def test_the_tutorial_has_examples() -> None:
    assert len(examples(TUTORIAL)) >= 10


@pytest.mark.kvm
@pytest.mark.parametrize("example", examples(TUTORIAL), ids=lambda e: f"line{e.line}")
def test_tutorial_example(example: Example) -> None:
    module = host_kvm_module()
    if example.host == "hardware-kvm" and module not in ("kvm_intel", "kvm_amd"):
        pytest.skip(f"this example needs VT-x or AMD-V; the host's KVM is {module or 'missing'}")
    if example.host == "pvm" and module != "kvm_pvm":
        pytest.skip(f"this example shows PVM's behaviour; the host's KVM is {module or 'missing'}")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        ["bash", "-c", example.command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120,
    )  # fmt: skip
    actual = result.stdout.splitlines()
    assert matches(example.expected, actual), (
        f"docs/tutorial.md line {example.line}: $ {example.command}\n"
        "expected:\n" + "\n".join(example.expected) + "\nactual:\n" + result.stdout
    )

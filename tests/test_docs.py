"""README.md's set-up commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import re

from tests.helpers import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quick_start)


def test_readme_gives_the_two_commands() -> None:
    run_command, test_command = readme_commands()
    assert run_command.endswith("&& make demo")
    assert test_command.endswith("&& make test")
    assert run_command.rsplit("&&", 1)[0] == test_command.rsplit("&&", 1)[0]


def test_ci_runs_the_readme_test_command_with_kvm_required() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    _, test_command = readme_commands()
    assert test_command in ci.splitlines()
    assert "export KVMPY_REQUIRE_KVM=1" in ci.splitlines()


def test_make_test_runs_ruff_mypy_and_pytest() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "\t$(BIN)/ruff check ." in makefile
    assert "\t$(BIN)/mypy" in makefile
    assert "\t$(BIN)/pytest" in makefile

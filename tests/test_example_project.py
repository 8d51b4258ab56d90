"""docs/example-project, a separate project, passes using only the installed plugin.

It is copied out of this repository and run by a pytest in a subprocess: it
finds kvmpy's plugin through the pytest11 entry point of the installed
package, not through this repository's conftest or sys.path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

EXAMPLE = ROOT / "docs" / "example-project"
EXAMPLE_TESTS = [
    "tests/test_kernel.py::test_boots_with_its_command_line PASSED",
    "tests/test_kernel.py::test_echoes_a_line PASSED",
    "tests/test_kernel.py::test_quit_exits_with_success PASSED",
    "tests/test_kernel.py::test_a_long_line_is_cut_not_overflowed PASSED",
    "tests/test_kernel.py::test_run_until_the_prompt PASSED",
    "guests/guests.toml::selftest PASSED",
    "guests/guests.toml::selftest-smp PASSED",
]


@pytest.fixture(scope="module")
def example_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built copy of the example project, outside this repository."""
    project = tmp_path_factory.mktemp("example") / "example-project"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("build", "__pycache__"))
    subprocess.run(["make", "-s", "-C", str(project)], check=True, capture_output=True)
    return project


@pytest.mark.kvm
@pytest.mark.parametrize("args", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_example_project_passes(example_project: Path, args: list[str]) -> None:
    # Nothing from this session's environment may load the plugin: only its entry point.
    hidden = ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *args],
        cwd=example_project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"rootdir: {example_project}" in output
    for line in EXAMPLE_TESTS:
        name, outcome = line.rsplit(" ", 1)
        assert any(name in row and outcome in row for row in output.splitlines()), output
    assert "7 passed" in output


def test_example_project_is_self_contained() -> None:
    # Nothing in it may reach into this repository.
    for path in EXAMPLE.rglob("*"):
        if path.is_file() and path.suffix in (".py", ".toml", ".S", ".ld", ""):
            text = path.read_text()
            assert "tests.helpers" not in text and "../../" not in text, path

"""``pip install kvmpy[soft]`` where the KVM shim cannot be built (no <linux/kvm.h>, no cc).

KVMPY_NO_SHIM=1 stands in for such a host: setup.py then skips the cffi
shim.  The venv built from this working tree must run a guest with
``--accel soft``, and ``--accel kvm`` must say, in one line, why KVM is
unavailable.  It builds a venv (about 30 s): slow, but the only test of
this path, so it stays in the suite.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, guest


def test_install_without_the_shim_runs_guests_on_the_soft_backend(tmp_path: Path) -> None:
    image = guest("real_hello")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "KVMPY_NO_SHIM": "1"}
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[soft]"],
        capture_output=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr.decode(errors="replace")[-3000:]
    site = next((venv / "lib").glob("python*/site-packages"))
    assert not list((site / "kvmpy" / "backends" / "kvm").glob("_kvm*")), "the shim was built"

    def kvmpy(*args: str) -> subprocess.CompletedProcess[bytes]:
        # Run from tmp_path so that the working tree's kvmpy/ is not imported instead.
        return subprocess.run(
            [str(venv / "bin" / "kvmpy"), *args],
            capture_output=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )

    soft = kvmpy("run", "--accel", "soft", str(image))
    assert (soft.returncode, soft.stdout[:21]) == (1, b"Hello from real mode!"), soft.stderr
    kvm = kvmpy("run", "--accel", "kvm", str(image))
    assert kvm.returncode == 2
    assert kvm.stderr.startswith(b"kvmpy: error: ")
    assert b"installed without its KVM shim" in kvm.stderr
    assert kvm.stderr.count(b"\n") == 1
    auto = kvmpy("run", "--accel", "auto", "-v", str(image))
    assert auto.returncode == 1
    assert b"kvmpy: accelerator: soft" in auto.stderr


def test_setup_py_names_why_it_skips_the_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    # The project's setup.py: its main() only runs as __main__.
    spec = importlib.util.spec_from_file_location("kvmpy_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    monkeypatch.setenv("KVMPY_NO_SHIM", "1")
    assert setup.shim_problem() == "KVMPY_NO_SHIM=1"
    monkeypatch.setenv("KVMPY_NO_SHIM", "0")
    monkeypatch.setattr(setup.sys, "platform", "darwin")
    assert setup.shim_problem() == "KVM is Linux-only (this is darwin)"

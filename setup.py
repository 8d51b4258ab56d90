"""Only here because setuptools takes ``cffi_modules`` from setup() alone.

The KVM shim (csrc/, built by cffi) needs <linux/kvm.h> and a C compiler.
Without them (macOS, a minimal container), or with KVMPY_NO_SHIM=1, kvmpy
installs without it: the software backend (``pip install kvmpy[soft]``)
still runs guests, and ``--accel kvm`` says why KVM is unavailable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup

NO_SHIM_ENV = "KVMPY_NO_SHIM"


def shim_problem() -> str | None:
    """Why the KVM shim cannot be built here (None: it can)."""
    if os.environ.get(NO_SHIM_ENV) == "1":
        return f"{NO_SHIM_ENV}=1"
    if not sys.platform.startswith("linux"):
        return f"KVM is Linux-only (this is {sys.platform})"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()
    if not compiler or shutil.which(compiler[0]) is None:
        return f"no C compiler ({compiler[0] if compiler else 'cc'} not found)"
    try:
        check = subprocess.run(
            [*compiler, "-E", "-x", "c", "-"],
            input=b"#include <linux/kvm.h>\n",
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the C compiler does not run ({exc})"
    if check.returncode != 0:
        return "<linux/kvm.h> is missing (install the Linux kernel headers)"
    return None


def main() -> None:
    problem = shim_problem()
    if problem is None:
        setup(cffi_modules=["kvmpy/backends/kvm/_build.py:ffibuilder"])
        return
    print(
        f"kvmpy: building without the KVM shim: {problem}; "
        "only the software backend (pip install 'kvmpy[soft]') will run guests",
        file=sys.stderr,
    )
    setup()


if __name__ == "__main__":  # setuptools runs this file as __main__
    main()

"""The software backend: guest code runs in the Unicorn CPU emulator, no /dev/kvm needed.

Install it with ``pip install kvmpy[soft]``.  Only this package imports Unicorn.
"""

from __future__ import annotations

from kvmpy.backends.soft.cpu import SoftBackend, SoftVcpu, SoftVm

__all__ = ["SoftBackend", "SoftVcpu", "SoftVm"]

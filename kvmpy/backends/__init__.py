"""Backends run guest code behind one small interface (``base.py``); see ``open_backend``."""

from kvmpy.backends.base import (
    KVM_PATH,
    Backend,
    BackendError,
    Capability,
    MpState,
    Vcpu,
    Vm,
    open_backend,
)
from kvmpy.backends.exits import ExitKind, ExitRecord

__all__ = [
    "KVM_PATH",
    "Backend",
    "BackendError",
    "Capability",
    "ExitKind",
    "ExitRecord",
    "MpState",
    "Vcpu",
    "Vm",
    "open_backend",
]

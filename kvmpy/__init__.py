"""kvmpy: a KVM micro-hypervisor in Python.

The layers, bottom up: ``kvm`` (ioctls), ``memory`` (guest RAM), ``x86``
(mode set-up as pure functions), ``loaders`` (images to load plans), ``bus``
and ``devices`` (port/MMIO dispatch and device models), ``runloop`` (exits to
bus calls), ``machine`` (all of it together) and ``cli``.
"""

__version__ = "0.1.0"

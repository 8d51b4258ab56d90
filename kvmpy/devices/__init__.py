"""Device models: plain state machines that never touch KVM.

A device sees register accesses as ``(offset, size, value)`` where ``offset``
is relative to the start of the range it was mapped at and ``value`` is the
little-endian integer of ``size`` bytes.  It raises interrupts through a
callable it was given, so every device can be unit-tested without /dev/kvm.
"""

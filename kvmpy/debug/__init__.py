"""Seeing inside the guest: disassembly and crash reports."""

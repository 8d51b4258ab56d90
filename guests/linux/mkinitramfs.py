"""Write a BusyBox initramfs as an uncompressed newc cpio archive.

Usage: mkinitramfs.py BUSYBOX OUT.cpio

Uncompressed on purpose: gunzip at emulated CPL0 costs about 20 s on PVM hosts.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

INIT_SCRIPT = b"""#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "kvmpy-initramfs: shell ready"
exec /bin/sh
"""

APPLETS = ("sh", "mount", "echo", "cat", "ls", "poweroff", "reboot", "uname")


class CpioWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.inode = 1

    def add(self, name: str, mode: int, body: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            len(body),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self.inode += 1
        self.data += b"070701" + b"".join(b"%08X" % field for field in fields)
        self.data += encoded
        self._pad()
        self.data += body
        self._pad()

    def _pad(self) -> None:
        self.data += b"\0" * (-len(self.data) % 4)

    def finish(self) -> bytes:
        self.inode = 0
        self.add("TRAILER!!!", 0)
        self.data += b"\0" * (-len(self.data) % 512)
        return bytes(self.data)


def main() -> int:
    busybox, out = Path(sys.argv[1]), Path(sys.argv[2])
    cpio = CpioWriter()
    for directory in ("bin", "dev", "proc", "sys"):
        cpio.add(directory, stat.S_IFDIR | 0o755)
    cpio.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    cpio.add("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    for applet in APPLETS:
        cpio.add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    cpio.add("init", stat.S_IFREG | 0o755, INIT_SCRIPT)
    out.write_bytes(cpio.finish())
    return 0


if __name__ == "__main__":
    sys.exit(main())

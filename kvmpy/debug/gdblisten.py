"""Where the gdb stub listens: the ``--gdb`` spec, the listening socket, the loopback check.

The stub can read and write all guest memory, so it listens on 127.0.0.1
unless told otherwise, and says so when it listens anywhere else.
"""

from __future__ import annotations

import ipaddress
import socket

DEFAULT_HOST = "127.0.0.1"
ACCEPT_POLL = 0.2  # how often the server thread looks up from accept()


def parse_gdb_spec(spec: str) -> tuple[str, int]:
    """``tcp::1234``, ``tcp:HOST:1234``, ``:1234`` or ``1234`` -> (host, port).

    An empty host means 127.0.0.1: the stub can read and write all guest
    memory, so it listens on all interfaces only when asked (``tcp:0.0.0.0:1234``).
    """
    text = spec.removeprefix("tcp:")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(
            f"bad --gdb address {spec!r}: expected tcp::PORT or tcp:HOST:PORT"
        ) from None
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"bad --gdb port {port} in {spec!r}")
    return host.strip("[]") or DEFAULT_HOST, port


def is_loopback(address: str) -> bool:
    """True for a numeric loopback address (127.0.0.0/8, ::1, ::ffff:127.x.x.x)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket whose accept() times out now and then; ValueError if it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ValueError(f"cannot listen for gdb on {host}:{port}: {exc.strerror or exc}") from None
    listener.settimeout(ACCEPT_POLL)
    return listener


def exposure_warning(listener: socket.socket, host: str) -> str | None:
    """The warning to print when ``listener`` is bound beyond loopback, else None."""
    address, port = listener.getsockname()[:2]
    if is_loopback(address):
        return None
    return (
        f"warning: listening on {host}:{port}, beyond loopback: anyone who can connect "
        "can read and write guest memory"
    )

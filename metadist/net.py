"""Whether anything answers at an address, asked before a client library would retry for minutes.

A leaf module (the standard library only), so that runtime/, submit and tracking all use this one probe.
"""

from __future__ import annotations

import socket
from typing import NamedTuple
from urllib.parse import urlparse


class Unanswered(NamedTuple):
    """A TCP connection that did not open: where, and why (for the caller's one-line error)."""

    host: str
    port: int
    why: str

    def __str__(self) -> str:
        return f"nothing answers at {self.host}:{self.port} ({self.why})"


def unreachable(address: str, default_port: int | None = None, timeout: float = 5.0) -> Unanswered | None:
    """None when a TCP connection to `address` opens, else where and why it did not.

    `address` is `host:port` or `scheme://host[:port][/path]`; without a port, https means 443 and any
    other scheme `default_port`. Raises ValueError when the address names no host or no port.
    """
    url = urlparse(address if "://" in address else f"//{address}")
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else default_port)
    except ValueError:  # a port that is not a number
        host, port = None, None
    if not host or port is None:
        raise ValueError(f"{address!r} names no host and port")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return Unanswered(host, port, str(err.strerror or err))
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago: nothing listens on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

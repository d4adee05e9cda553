"""Whether anything answers at host:port, asked before a client library would retry for minutes."""

from __future__ import annotations

import socket


def unreachable(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when a TCP connection opens, else why it did not (for the caller's one-line error)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return str(err.strerror or err)
    return None

"""A TCP probe: Ray and MLflow clients retry an unreachable server for minutes; this says so in seconds."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def unreachable(address: str, default_port: int, timeout: float = 5.0) -> str | None:
    """Why `host:port` (or a URL) cannot be connected to, or None when it can."""
    try:
        parsed = urlsplit(address if "://" in address else f"tcp://{address}")
        host, port = parsed.hostname, parsed.port or default_port
    except ValueError as error:  # a port that is not a number, a malformed IPv6 literal
        return f"not a host:port address ({error})"
    if not host:
        return "no host in the address"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return str(error)
    return None

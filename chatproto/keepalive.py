"""TCP keepalive for a connection, server's or client's.

The wire contract has no heartbeat frame, and a chat connection may rightly
stay silent for hours. Without keepalive, a peer whose network path died
(a laptop closed, a NAT that forgot the mapping, a cable pulled) stays
"online" on the server, with its messages written into a dead socket,
until the kernel's own timeout (two hours of silence, then more). With it,
the kernel probes a connection after ``IDLE`` seconds of silence, every
``INTERVAL`` seconds, and drops it after ``COUNT`` unanswered probes: a dead
peer is noticed within ``IDLE + INTERVAL * COUNT`` = 120 seconds, for a few
dozen bytes a minute on an idle connection.
"""

from __future__ import annotations

import socket

#: Seconds of silence on a connection before the first probe.
IDLE = 60
#: Seconds between unanswered probes.
INTERVAL = 10
#: Unanswered probes after which the connection is dropped.
COUNT = 6
#: The longest a dead peer goes unnoticed.
DEAD_AFTER = IDLE + INTERVAL * COUNT


def enable(transport) -> bool:
    """Turn keepalive on for ``transport``'s TCP socket (beneath TLS too); False if it has none."""
    sock = _tcp_socket(transport)
    if sock is None:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", IDLE), ("TCP_KEEPINTVL", INTERVAL), ("TCP_KEEPCNT", COUNT)):
            option = getattr(socket, name, None)  # Linux has all three; macOS the last two
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
        if not hasattr(socket, "TCP_KEEPIDLE") and hasattr(socket, "TCP_KEEPALIVE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPALIVE, IDLE)  # macOS's name for it
    except OSError:
        return False  # the connection is already gone
    return True


def _tcp_socket(transport) -> socket.socket | None:
    """The TCP socket under ``transport``: a TLS transport's is its own transport's."""
    for _ in range(4):
        if transport is None:
            return None
        handle = getattr(transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            if handle.family in (socket.AF_INET, socket.AF_INET6) and handle.type == socket.SOCK_STREAM:
                return handle
            return None  # a UNIX socket: no network path to die
        transport = getattr(transport, "transport", None)
    return None

"""A free TCP port on 127.0.0.1 for a server that binds it a little later (Serve's proxy, a Ray
head's ports, a gloo rendezvous).

    >>> port = free_port()   # e.g. 27114: free now, and outside the kernel's ephemeral range

Why not ``bind(("127.0.0.1", 0))``: the kernel answers with a port of its ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768–60999 by default), the range every other
process's ``bind(0)`` and outgoing connection draws from too — each Ray worker opens several. In the
seconds between choosing the port and the server binding it (Serve starting its proxy), another
process could take it: "Failed to bind to address '127.0.0.1:33705'". So the port is drawn at
random between Ray's worker ports (10002–19999 by default) and the ephemeral range, and checked free
by binding it once: only another explicit choice could take it meanwhile.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOW = 20000  # above Ray's default worker ports (--min-worker-port 10002 .. --max-worker-port 19999)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port on ``host`` nothing listens on, below the ephemeral range where there is room (else
    the kernel's own choice)."""
    high = ephemeral_start() - 1
    rng = random.SystemRandom()
    for _ in range(tries if high > LOW else 0):
        port = rng.randint(LOW, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

"""cluster/ports.py: a free port outside the kernel's ephemeral range, checked free."""

from __future__ import annotations

import socket

from cluster import ports


def test_the_port_is_free_and_below_the_ephemeral_range():
    start = ports.ephemeral_start()
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOW <= port < start
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # free: binds


def test_a_taken_port_is_never_returned(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        taken.listen()
        picks = iter([busy, busy, busy + 1 if busy + 1 < 61000 else busy - 1])
        monkeypatch.setattr(ports, "LOW", 1024)
        monkeypatch.setattr(ports, "ephemeral_start", lambda: 65535)
        monkeypatch.setattr(ports.random, "SystemRandom", lambda: type("R", (), {"randint": lambda self, a, b: next(picks)})())
        assert ports.free_port() != busy


def test_no_room_below_the_ephemeral_range_falls_back_to_the_kernels_choice(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_start", lambda: 1024)
    port = ports.free_port()
    assert 0 < port < 65536

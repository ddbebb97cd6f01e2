"""Ports for the listeners the tests start (drivers' metrics, control planes, Prometheus)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

#: ports handed out by free_port in this process (their listeners may not be up yet)
_HANDED_OUT: set[int] = set()
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _outside_ephemeral() -> list[range]:
    """The port ranges the kernel never picks for an outgoing connection."""
    try:
        low, high = (int(x) for x in _EPHEMERAL.read_text().split()[:2])
    except (OSError, ValueError):
        return []
    return [r for r in (range(10000, low), range(high + 1, 65536)) if len(r)]


def _bindable(port: int) -> bool:
    """Nobody listens on the port, on any address (a listener on one address would make a
    later bind on 0.0.0.0 fail)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))  # noqa: S104 (a probe, closed at once)
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port to listen on, free now and outside the kernel's ephemeral range: between the
    pick and the listener's bind (a process start later), no outgoing connection of the
    hundreds of processes a run starts can take it, as one took a driver's metrics port in a
    100-node scale run. Falls back to a port the kernel picks when no such range exists."""
    for ports in _outside_ephemeral():
        start = random.randrange(len(ports))  # noqa: S311 (spreads picks, no secret)
        for i in range(len(ports)):
            port = ports[(start + i) % len(ports)]
            if port not in _HANDED_OUT and _bindable(port):
                _HANDED_OUT.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))  # noqa: S104 (a probe, closed at once)
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port

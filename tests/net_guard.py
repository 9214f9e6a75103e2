"""A socket guard for tests: no connection leaves loopback.

Why: the worker fetches URLs its callers choose. A test that dialled a real
host by mistake (a public server, a DNS server, a cloud metadata service
when the suite runs on a cloud machine) would pass or fail with the network
of the machine it runs on, and could touch real services. Under the guard any
attempt to connect or send to an address outside loopback, and any name
lookup other than a numeric literal or ``localhost``, raises
``NetworkAccessBlocked`` before a packet is sent.

``NetworkAccessBlocked`` derives from BaseException, not OSError: the code
under test catches OSError (and Exception) and turns it into an ordinary
"could not be fetched" answer, which would let a test that expects a failure
pass for the wrong reason. Every blocked attempt is also kept in
``Guard.blocked``, so an attempt swallowed somewhere still shows.

Patched: ``socket.socket.connect``, ``connect_ex`` and ``sendto`` (the class
attributes, so every Python socket object and ssl.SSLSocket is covered,
whatever module created it), ``socket.create_connection`` and
``socket.getaddrinfo`` (module attributes: code that did ``from socket import
getaddrinfo`` before the guard keeps the original, but its connection still
goes through the patched ``connect``). Sockets of subprocesses, and C code
that opens its own sockets, are out of reach.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

_INET = (socket.AF_INET, socket.AF_INET6)
_LOCAL_NAMES = ("localhost", "localhost.")


class NetworkAccessBlocked(BaseException):
    """A test tried to reach beyond loopback."""


Attempt = Tuple[str, str, Optional[int]]     # (operation, host, port)


@dataclass
class Guard:
    blocked: List[Attempt] = field(default_factory=list)
    _recorders: List[List[Attempt]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def recording(self) -> Iterator[List[Attempt]]:
        """Every connection attempt made while the block runs, allowed or not."""
        seen: List[Attempt] = []
        with self._lock:
            self._recorders.append(seen)
        try:
            yield seen
        finally:
            with self._lock:
                self._recorders.remove(seen)

    def _note(self, attempt: Attempt) -> None:
        with self._lock:
            for seen in self._recorders:
                seen.append(attempt)


def _numeric(host: str, original_getaddrinfo) -> Optional[List[ipaddress._BaseAddress]]:
    """The addresses a numeric host stands for (no DNS), or None for a name.

    The C library also reads forms ipaddress does not ("2130706433",
    "0x7f.1", "127.1"), so it is asked, with AI_NUMERICHOST so it never
    sends a query.
    """
    try:
        infos = original_getaddrinfo(host, None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError, TypeError):
        return None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _is_loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


@contextlib.contextmanager
def block_network() -> Iterator[Guard]:
    """Install the guard for the duration of the block; yields the Guard."""
    guard = Guard()
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_sendto = socket.socket.sendto
    original_create_connection = socket.create_connection
    original_getaddrinfo = socket.getaddrinfo

    def refuse(operation: str, host: str, port: Optional[int]) -> None:
        attempt = (operation, host, port)
        guard.blocked.append(attempt)
        raise NetworkAccessBlocked(f"test tried to {operation} {host!r} port {port}: only "
                                   f"loopback may be reached (tests/net_guard.py)")

    def check_name(operation: str, host, port) -> None:
        """A host in a lookup or create_connection: a literal, or localhost."""
        if host is None:
            return                           # the local host (passive lookups)
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if host.lower() in _LOCAL_NAMES:
            return
        if _numeric(host, original_getaddrinfo) is None:
            refuse(operation, host, port)    # a DNS query would leave the machine

    def check_address(operation: str, family, address) -> None:
        """A socket address given to connect or sendto: loopback only."""
        if family not in _INET or not isinstance(address, tuple):
            return                           # AF_UNIX, netlink, ...: never leaves the machine
        host, port = address[0], address[1]
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        guard._note((operation, host, port))
        if host.lower() in _LOCAL_NAMES:
            return
        addresses = _numeric(host, original_getaddrinfo)
        if not addresses or not all(_is_loopback(ip) for ip in addresses):
            refuse(operation, host, port)

    def connect(self, address):
        check_address("connect to", self.family, address)
        return original_connect(self, address)

    def connect_ex(self, address):
        check_address("connect to", self.family, address)
        return original_connect_ex(self, address)

    def sendto(self, data, *args):
        check_address("send to", self.family, args[-1] if args else None)
        return original_sendto(self, data, *args)

    def create_connection(address, *args, **kwargs):
        check_name("connect to", address[0], address[1])
        return original_create_connection(address, *args, **kwargs)

    def getaddrinfo(host, port, *args, **kwargs):
        check_name("look up", host, port)
        return original_getaddrinfo(host, port, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.socket.sendto = sendto
    socket.create_connection = create_connection
    socket.getaddrinfo = getaddrinfo
    try:
        yield guard
    finally:
        socket.socket.connect = original_connect
        socket.socket.connect_ex = original_connect_ex
        socket.socket.sendto = original_sendto
        socket.create_connection = original_create_connection
        socket.getaddrinfo = original_getaddrinfo

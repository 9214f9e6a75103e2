"""Fetching reference audio from a URL, safe by construction.

``audio_url`` is chosen by whoever sends the job, so it may point anywhere the
worker can reach: the cloud's metadata service, the pod network, the worker's
own loopback. Unless ``ALLOW_PRIVATE_URLS`` is set, a URL is fetched only from
a global unicast address (``is_public_address``), and that is enforced on the
connection that is actually made:

1. The URL is parsed strictly first; a malformed one (bad port, unbalanced
   brackets, credentials, control characters, no host, not http(s)) is
   ``InvalidInput`` before any lookup or connection.
2. The host is resolved once and every address is checked; one non-public
   answer refuses the URL (``InvalidInput``, naming the host but not the
   address, so the answer is no oracle for internal DNS). A host that cannot
   be resolved is ``InvalidAudio``, like a server that does not answer: the
   URL is well formed, the audio just cannot be had (and a resolver failure
   may be transient).
3. The connection goes to one of those checked addresses (a urllib3 pool
   opened on the address itself) while the Host header, TLS SNI and the
   certificate check use the name. Nothing resolves the name a second time,
   so a DNS answer that changes after the check (DNS rebinding) has nothing
   to race. Proxy variables in the environment are ignored for the same
   reason: through a proxy the proxy would resolve the name.
4. Redirects are followed by hand, at most ``MAX_REDIRECTS``; every hop goes
   through 1-3 again, and a redirect to anything but http(s) is refused.
5. One deadline covers the whole download, redirects and DNS included: when
   it passes, a timer shuts down the download's sockets, which wakes a
   blocked connect, TLS handshake or read at once. Per-read timeouts alone let
   a server that sends one byte every few seconds hold the worker for as long
   as it likes. The body is capped at ``max_bytes``.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union
from urllib.parse import urljoin, urlsplit

from .errors import InvalidAudio, InvalidInput, excerpt

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0        # per connection attempt (one resolved address)
READ_TIMEOUT_S = 20.0          # per read; the deadline below bounds the sum
DOWNLOAD_DEADLINE_S = 30.0     # the whole download: DNS, connects, redirects, body
MAX_URL_CHARS = 8192           # long enough for presigned URLs with session tokens
_EXCERPT_CHARS = 60            # how much of a host or scheme an error message echoes
_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset((301, 302, 303, 307, 308))

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], List[str]]
AddressPolicy = Callable[[IPAddress], bool]

_net = ipaddress.ip_network

# --- What may be reached -------------------------------------------------------
# IANA's special-purpose registries, written out: Python's ``is_global`` alone
# is not enough (3.11 calls fec0::1, 2002::/16, 64:ff9b::/96, ff02::1,
# ::127.0.0.1 and 192.0.0.192 global) and its answer changes between patch
# releases. ``is_global`` is still consulted, as a second opinion.

_V4_REFUSED = (
    # "This network": connecting to 0.0.0.0 reaches the local host on Linux.
    _net("0.0.0.0/8"),
    # RFC 1918 private networks: the VPC, the pod network, the host's services.
    _net("10.0.0.0/8"), _net("172.16.0.0/12"), _net("192.168.0.0/16"),
    # Carrier-grade NAT shared space (RFC 6598): provider-internal, and home of
    # Alibaba Cloud's metadata service (100.100.100.200). Python 3.11 calls it
    # neither private nor global, so an is_private check lets it through.
    _net("100.64.0.0/10"),
    # Loopback: the worker itself and whatever listens beside it.
    _net("127.0.0.0/8"),
    # Link-local: the metadata services of AWS, GCP, Azure, OpenStack and
    # others (169.254.169.254), ECS task credentials (169.254.170.2).
    _net("169.254.0.0/16"),
    # IETF protocol assignments (RFC 6890), not routed on the internet; Oracle
    # Cloud's metadata is 192.0.0.192, which Python 3.11 calls global.
    _net("192.0.0.0/24"),
    # Documentation ranges (RFC 5737): no real server lives there.
    _net("192.0.2.0/24"), _net("198.51.100.0/24"), _net("203.0.113.0/24"),
    # 6to4 relay anycast (RFC 7526, deprecated): a hop into a tunnel.
    _net("192.88.99.0/24"),
    # Benchmarking (RFC 2544): lab networks, in practice internal.
    _net("198.18.0.0/15"),
    # Multicast, and class E (reserved) with the broadcast 255.255.255.255:
    # not unicast destinations.
    _net("224.0.0.0/4"), _net("240.0.0.0/4"),
)

# Global unicast IPv6 is 2000::/3 (RFC 4291); everything outside it is refused
# before this list is consulted. The entries outside 2000::/3 are repeated so
# the list reads as the complete policy.
_V6_GLOBAL_UNICAST = _net("2000::/3")
_V6_REFUSED = (
    # :: and ::1, and the deprecated IPv4-compatible form ::a.b.c.d (RFC 4291):
    # some stacks still deliver ::127.0.0.1 to IPv4 loopback.
    _net("::/96"),
    # NAT64, well-known and local-use prefixes (RFC 6052, RFC 8215): a NAT64
    # gateway in the VPC translates 64:ff9b::a00:1 to 10.0.0.1.
    _net("64:ff9b::/96"), _net("64:ff9b:1::/48"),
    # Discard-only prefix (RFC 6666).
    _net("100::/64"),
    # Teredo (RFC 4380): a tunnel whose far end is an embedded IPv4 address,
    # which can be private.
    _net("2001::/32"),
    # Benchmarking (RFC 5180) and documentation (RFC 3849, RFC 9637).
    _net("2001:2::/48"), _net("2001:db8::/32"), _net("3fff::/20"),
    # 6to4 (RFC 3056, deprecated by RFC 7526): 2002:7f00:1:: carries 127.0.0.1,
    # and a relay or the host's own 6to4 interface would deliver it there.
    _net("2002::/16"),
    # Unique local addresses (RFC 4193), AWS's IPv6 metadata fd00:ec2::254 too.
    _net("fc00::/7"),
    # Link-local, and site-local (RFC 3879, deprecated), which Python 3.11
    # calls global although stacks still route it as site-internal.
    _net("fe80::/10"), _net("fec0::/10"),
    # Multicast: not a unicast destination (Python 3.11 calls ff02::1 global).
    _net("ff00::/8"),
)

# Cloud metadata and host-agent addresses. All but one already lie in refused
# ranges; they are named so that editing a range can never reopen them.
_METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack, DigitalOcean, ... instance metadata
    "169.254.170.2",     # AWS ECS task metadata and credentials
    "169.254.0.23",      # Tencent Cloud metadata
    "100.100.100.200",   # Alibaba Cloud metadata (carrier-grade NAT space)
    "192.0.0.192",       # Oracle Cloud metadata
    "168.63.129.16",     # Azure WireServer: a public-range address only the Azure host answers
    "fd00:ec2::254",     # AWS instance metadata over IPv6
))


def is_public_address(ip: Union[IPAddress, str]) -> bool:
    """True only for a global unicast address that is no metadata service."""
    if isinstance(ip, str):
        try:
            ip = ipaddress.ip_address(ip)
        except ValueError:
            return False     # what cannot be judged is not public
    if ip.version == 6:
        if ip.scope_id:
            # A zone index ("%eth0") only means something on a local link.
            return False
        if ip.ipv4_mapped is not None:
            # The kernel connects ::ffff:a.b.c.d as IPv4 a.b.c.d: judge that.
            return is_public_address(ip.ipv4_mapped)
        if ip not in _V6_GLOBAL_UNICAST:
            return False
        refused = _V6_REFUSED
    else:
        refused = _V4_REFUSED
    if ip in _METADATA or any(ip in network for network in refused):
        return False
    return (ip.is_global and not ip.is_multicast and not ip.is_private
            and not ip.is_reserved and not ip.is_loopback and not ip.is_link_local
            and not ip.is_unspecified)


# --- Parsing ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str          # ASCII (IDNA), lower case, no brackets
    port: int
    literal: Optional[IPAddress]   # the host when it is an IP literal
    authority: str     # the Host header
    path: str          # the request target: path and query


_HOST_NAME = re.compile(r"[a-z0-9_.-]+")


def _excerpt(text: str) -> str:
    return excerpt(text, _EXCERPT_CHARS)


def _parse(url: object, what: str) -> _Target:
    """The parts of ``url``; ``InvalidInput`` for anything malformed (no network)."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{what} must be a non-empty string")
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"{what} is longer than {MAX_URL_CHARS} characters")
    # urlsplit silently drops tabs and newlines; refuse them so the URL that is
    # checked is the URL that is fetched.
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput(f"{what} contains spaces or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:       # "http://[::1/", "http://[not-an-ip]/"
        raise InvalidInput(f"{what} has a malformed host (brackets must enclose "
                           f"an IPv6 address)") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"{what} must be http or https, not "
                           f"{_excerpt(parts.scheme) or 'empty'!r}")
    if "@" in parts.netloc:
        raise InvalidInput(f"{what} must not carry credentials")
    if not parts.hostname:
        raise InvalidInput(f"{what} has no host")
    try:
        port = parts.port    # raises for "abc", "99999", "-1"
    except ValueError:
        port = 0
    if port == 0:
        raise InvalidInput(f"{what} has an invalid port; it must be a number from 1 to 65535")
    default_port = 443 if parts.scheme == "https" else 80
    port = port or default_port

    host = parts.hostname
    try:
        literal: Optional[IPAddress] = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is None:
        try:
            # The IDNA codec also checks label lengths, which getaddrinfo would
            # otherwise fail on with a UnicodeError.
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise InvalidInput(f"{what} host {_excerpt(host)!r} is not a valid host name") from None
        if not _HOST_NAME.fullmatch(host):
            raise InvalidInput(f"{what} host {_excerpt(host)!r} is not a valid host name")
    if "[" in parts.netloc or "]" in parts.netloc:
        # Brackets enclose an IPv6 address and only a port may follow them
        # ("[v1.x]" and "[::1]junk" pass urlsplit).
        after = parts.netloc.rpartition("]")[2]
        if literal is None or literal.version != 6 or (after and not after.startswith(":")):
            raise InvalidInput(f"{what} has a malformed host (brackets must enclose "
                               f"an IPv6 address)")

    shown = f"[{host.split('%')[0]}]" if literal is not None and literal.version == 6 else host
    authority = shown if port == default_port else f"{shown}:{port}"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url=url, scheme=parts.scheme, host=host, port=port, literal=literal,
                   authority=authority, path=path)


# --- Resolving and checking -----------------------------------------------------

def _resolve(host: str, port: int) -> List[str]:
    """Every address ``host`` resolves to, in the resolver's order of preference."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class _Deadline:
    """One clock for the whole download, and the sockets it must stop when it runs out.

    A timer thread shuts every watched socket down at the deadline. shutdown()
    acts on the connection, not on one descriptor, so it wakes a read blocked
    in another thread (plain or TLS) at once; each socket is watched through a
    dup() of its descriptor, which stays valid even after ssl wraps and
    detaches the original socket object.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def passed(self) -> bool:
        return self.expired or self.remaining() <= 0.0

    def error(self) -> InvalidAudio:
        return InvalidAudio(f"audio_url took longer than {self.seconds:g} s to download")

    def check(self) -> None:
        if self.passed():
            raise self.error()

    def watch(self, sock: socket.socket) -> None:
        watched = sock.dup()
        with self._lock:
            self._sockets.append(watched)
            if self.expired:
                _shutdown(watched)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    def __enter__(self) -> "_Deadline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass     # already closed by the other side: nothing left to stop


def _resolve_within(resolve: Resolver, target: _Target, deadline: _Deadline,
                    what: str) -> List[str]:
    """``resolve(host, port)``, given up on when the deadline passes.

    getaddrinfo cannot be interrupted, and a slow authoritative server (the
    URL's owner runs it) could otherwise spend the deadline several times over
    across redirects. The lookup runs in a daemon thread that is abandoned at
    the deadline; it ends when the system resolver gives up.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["addresses"] = resolve(target.host, target.port)
        except BaseException as exc:    # handed to the caller, who sorts it out
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="audio-url-resolve", daemon=True)
    thread.start()
    thread.join(deadline.remaining())
    if thread.is_alive():
        raise deadline.error()
    error = outcome.get("error")
    if isinstance(error, UnicodeError):
        raise InvalidInput(f"{what} host {_excerpt(target.host)!r} is not a valid host name")
    if isinstance(error, OSError):
        raise InvalidAudio(f"{what} host {_excerpt(target.host)!r} cannot be resolved")
    if error is not None:
        raise error
    addresses = outcome["addresses"]
    if not addresses:
        raise InvalidAudio(f"{what} host {_excerpt(target.host)!r} cannot be resolved")
    return addresses


def _checked_addresses(target: _Target, *, allow_private: bool, resolve: Resolver,
                       is_public: AddressPolicy, deadline: _Deadline, what: str) -> List[str]:
    """The addresses to connect to, every one of them allowed by the policy."""
    if target.literal is not None:
        addresses = [str(target.literal)]     # nothing to look up
    else:
        addresses = _resolve_within(resolve, target, deadline, what)
    if allow_private:
        return addresses
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        # One non-public answer refuses the host: a name that answers public
        # and private at once is either hostile or not worth the risk.
        if ip is None or not is_public(ip):
            raise InvalidInput(f"{what} host {_excerpt(target.host)!r} is a private or local "
                               f"address; only public URLs are fetched")
    return addresses


def check_url(url: str, *, allow_private: bool, resolve: Resolver = _resolve,
              is_public: AddressPolicy = is_public_address,
              deadline_s: float = DOWNLOAD_DEADLINE_S) -> List[str]:
    """The addresses ``url`` may be fetched from; ``InvalidInput`` if it may not be fetched."""
    target = _parse(url, "audio_url")
    with _Deadline(deadline_s) as deadline:
        return _checked_addresses(target, allow_private=allow_private, resolve=resolve,
                                  is_public=is_public, deadline=deadline, what="audio_url")


# --- Connecting to the checked address ------------------------------------------

@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    """Certificate check against certifi's roots, as requests did (the image may lack system CAs)."""
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


@functools.lru_cache(maxsize=1)
def _pool_classes():
    """urllib3 pools whose connections report their sockets to the download's deadline.

    Built on first use so that importing this module stays cheap.
    """
    from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.connection import HTTPConnection, HTTPSConnection

    class Watched:
        def __init__(self, *args, deadline: _Deadline, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline = deadline

        def _new_conn(self):
            # The one place a connection's socket exists before TLS and the
            # request: from here on the deadline can stop it.
            sock = super()._new_conn()
            self._deadline.watch(sock)
            return sock

    class WatchedHTTPConnection(Watched, HTTPConnection):
        pass

    class WatchedHTTPSConnection(Watched, HTTPSConnection):
        pass

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return HTTPPool, HTTPSPool


def _pool(target: _Target, address: str, deadline: _Deadline,
          ssl_context: Optional[ssl.SSLContext]):
    """A one-connection pool that dials ``address`` and speaks to ``target.host``."""
    from urllib3.util import Timeout

    http_pool, https_pool = _pool_classes()
    timeout = Timeout(connect=max(0.001, min(CONNECT_TIMEOUT_S, deadline.remaining())),
                      read=max(0.001, min(READ_TIMEOUT_S, deadline.remaining())))
    common = dict(port=target.port, timeout=timeout, maxsize=1, retries=False,
                  deadline=deadline)
    if target.scheme == "https":
        # server_hostname: SNI and the certificate's name are the URL's host,
        # not the address dialled; ssl_context has check_hostname on.
        return https_pool(address, server_hostname=target.host,
                          ssl_context=ssl_context or _default_ssl_context(), **common)
    return http_pool(address, **common)


def _failure(exc: BaseException, deadline: _Deadline, what: str) -> InvalidAudio:
    if deadline.passed():
        return deadline.error()
    return InvalidAudio(f"{what} could not be fetched ({type(exc).__name__})")


def _open(target: _Target, addresses: Sequence[str], deadline: _Deadline,
          ssl_context: Optional[ssl.SSLContext], what: str):
    """(response, pool) from the first checked address that accepts a connection."""
    from urllib3.exceptions import ConnectTimeoutError, HTTPError

    headers = {"Host": target.authority, "User-Agent": "chatterbox-worker",
               "Accept-Encoding": "identity"}
    last_error: Optional[BaseException] = None
    for address in addresses:
        deadline.check()
        pool = _pool(target, address, deadline, ssl_context)
        try:
            response = pool.urlopen("GET", target.path, headers=headers, redirect=False,
                                    retries=False, preload_content=False,
                                    assert_same_host=False)
        except ConnectTimeoutError as exc:     # refused or unreachable: try the next address
            pool.close()
            last_error = exc
            continue
        except (HTTPError, OSError, http.client.HTTPException) as exc:
            pool.close()
            raise _failure(exc, deadline, what) from None
        except BaseException:
            pool.close()
            raise
        return response, pool
    raise _failure(last_error, deadline, what)


def _read_body(response, max_bytes: int, deadline: _Deadline) -> bytes:
    from urllib3.exceptions import HTTPError

    if response.status != 200:
        raise InvalidAudio(f"audio_url answered HTTP {response.status}")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidAudio(f"audio_url is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    try:
        for block in response.stream(_CHUNK, decode_content=True):
            body += block
            if len(body) > max_bytes:
                raise InvalidAudio(f"audio_url is larger than the limit of {max_bytes} bytes")
            deadline.check()
    except (HTTPError, OSError, http.client.HTTPException) as exc:
        if deadline.passed():
            raise deadline.error() from None
        raise InvalidAudio(f"audio_url download failed ({type(exc).__name__})") from None
    # The deadline's shutdown reads as a clean end on a body without a length:
    # a cut body must not pass as the whole file.
    deadline.check()
    return bytes(body)


def fetch_audio(url: str, *, max_bytes: int, allow_private: bool,
                resolve: Resolver = _resolve, is_public: AddressPolicy = is_public_address,
                deadline_s: float = DOWNLOAD_DEADLINE_S,
                ssl_context: Optional[ssl.SSLContext] = None) -> bytes:
    """The body at ``url``.

    ``InvalidInput`` when the URL is malformed or leads (first or after a
    redirect) to an address the policy refuses; ``InvalidAudio`` when the body
    cannot be had in ``deadline_s`` or is larger than ``max_bytes``.
    ``resolve``, ``is_public`` and ``ssl_context`` exist so tests can stand in
    for DNS, name which loopback address plays "the internet", and trust their
    own certificate authority.
    """
    target = _parse(url, "audio_url")
    what = "audio_url"
    with _Deadline(deadline_s) as deadline:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = _checked_addresses(target, allow_private=allow_private,
                                           resolve=resolve, is_public=is_public,
                                           deadline=deadline, what=what)
            response, pool = _open(target, addresses, deadline, ssl_context, what)
            try:
                if response.status not in _REDIRECT_STATUSES:
                    return _read_body(response, max_bytes, deadline)
                location = response.headers.get("Location")
                if not location:
                    raise InvalidAudio("audio_url redirected without a Location header")
            finally:
                response.close()
                pool.close()
            what = "audio_url redirect"
            try:
                next_url = urljoin(target.url, location)
            except ValueError:
                # urljoin chokes on what _parse refuses (brackets): let it say why.
                _parse(location, what)
                raise InvalidInput(f"{what} is not a valid URL") from None
            target = _parse(next_url, what)
    raise InvalidAudio(f"audio_url redirected more than {MAX_REDIRECTS} times")

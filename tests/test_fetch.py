"""audio_url fetching: the address policy, malformed URLs, DNS rebinding, redirects, the
total deadline and size caps, over real HTTP(S) servers on loopback.

Nothing here leaves loopback (tests/net_guard.py fails any test that tries). To test
"public first hop, private redirect target" with private addresses NOT allowed, the
tests hand fetch_audio an address policy under which exactly 127.0.0.2 counts as
public (``LOOPBACK_PLAYS_PUBLIC``); every other address is judged by the production
policy. Names ending in .test are answered by an injected resolver, never by DNS.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from chatterbox_worker.errors import InvalidAudio, InvalidInput
from chatterbox_worker.fetch import check_url, fetch_audio, is_public_address

PLAYS_PUBLIC = "127.0.0.2"


def LOOPBACK_PLAYS_PUBLIC(ip) -> bool:
    """The production policy, except that 127.0.0.2 stands in for the internet."""
    return ip == ipaddress.ip_address(PLAYS_PUBLIC) or is_public_address(ip)


def public(host, port):
    return ["93.184.216.34"]


def make_resolver(names):
    """A resolver for tests: ``names`` for *.test hosts, numeric forms via the C library
    with AI_NUMERICHOST (no DNS query), anything else an error."""
    def resolve(host, port):
        if host in names:
            return list(names[host])
        if host == "localhost":     # /etc/hosts, no query leaves the machine
            return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
        return [info[4][0] for info in infos]
    return resolve


# --- The address policy -------------------------------------------------------------

REFUSED = [
    # IPv4: loopback, RFC 1918, link-local and metadata, CGNAT, this-network
    "127.0.0.1", "127.255.255.254", "10.1.2.3", "172.16.4.4", "172.31.255.1", "192.168.0.9",
    "169.254.169.254", "169.254.170.2", "169.254.0.23", "100.64.0.1", "100.127.255.254",
    "100.100.100.200", "0.0.0.0", "0.1.2.3",
    # IPv4: protocol assignments (Oracle metadata), documentation, benchmarking, 6to4 relay
    "192.0.0.192", "192.0.0.8", "192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1",
    "198.19.255.1", "192.88.99.1",
    # IPv4: multicast, class E, broadcast; Azure's WireServer (a public-range address)
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255", "168.63.129.16",
    # IPv6: unspecified, loopback, IPv4-compatible, IPv4-mapped non-global
    "::", "::1", "::127.0.0.1", "::10.0.0.1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
    "::ffff:169.254.169.254", "::ffff:100.100.100.200", "::ffff:0.0.0.0",
    # IPv6: NAT64 (well-known and local-use), discard, Teredo, benchmarking, documentation
    "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::5db8:d822", "64:ff9b:1::1", "100::1",
    "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:2::1", "2001:db8::1", "3fff::1",
    # IPv6: 6to4 of loopback, of private and of public IPv4
    "2002:7f00:1::1", "2002:a00:1::", "2002:5db8:d822::1",
    # IPv6: unique local (incl. AWS metadata), link-local (also with a zone), site-local,
    # multicast, outside 2000::/3
    "fc00::1", "fd00::1", "fd00:ec2::254", "fe80::1", "fe80::1%eth0", "fec0::1", "feff::1",
    "ff02::1", "ff0e::1", "4000::1", "::ffff:7f00:1",
]

PUBLIC = ["93.184.216.34", "1.1.1.1", "8.8.8.8", "100.63.255.255", "100.128.0.1",
          "172.32.0.1", "169.255.0.1", "2606:4700::1", "2001:4860:4860::8888",
          "2a00:1450:4001:82b::200e", "::ffff:93.184.216.34"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_global_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))
    # ... and the refusal is what check_url does with a name that resolves there.
    with pytest.raises(InvalidInput, match="private or local"):
        check_url("http://innocent.test/a.wav", allow_private=False,
                  resolve=lambda host, port: [address])


@pytest.mark.parametrize("address", PUBLIC)
def test_global_unicast_addresses_pass(address):
    assert is_public_address(ipaddress.ip_address(address))
    assert check_url("https://innocent.test/a.wav", allow_private=False,
                     resolve=lambda host, port: [address]) == [address]


def test_one_private_answer_among_public_ones_refuses_the_host():
    with pytest.raises(InvalidInput, match="private or local"):
        check_url("http://mixed.test/", allow_private=False,
                  resolve=lambda host, port: ["93.184.216.34", "10.0.0.1"])


def test_unparseable_addresses_are_not_public():
    assert not is_public_address("not-an-address")
    with pytest.raises(InvalidInput, match="private or local"):
        check_url("http://odd.test/", allow_private=False, resolve=lambda h, p: ["garbage"])


@pytest.mark.parametrize("url", [
    "http://2130706433/", "http://0x7f000001/", "http://0x7f.1/", "http://127.1/",
    "http://017700000001/", "http://[::ffff:127.0.0.1]/", "http://[::127.0.0.1]/",
    "http://[fe80::1%25eth0]/", "http://[2002:7f00:1::1]/", "http://[64:ff9b::a9fe:a9fe]/",
])
def test_numeric_spellings_of_internal_addresses_are_refused(url):
    """The C library reads 2130706433 and 0x7f.1 as 127.0.0.1: judged after resolution."""
    with pytest.raises(InvalidInput, match="private or local"):
        check_url(url, allow_private=False, resolve=make_resolver({}))


def test_public_address_passes_and_private_is_allowed_when_asked():
    check_url("https://example.test/a.wav", allow_private=False, resolve=public)
    check_url("http://127.0.0.1:9/a.wav", allow_private=True)


# --- Malformed URLs: InvalidInput before any lookup or connection -------------------

MALFORMED = [
    ("http://public.test:99999/a.wav", "invalid port"),
    ("http://public.test:abc/a.wav", "invalid port"),
    ("http://public.test:0/a.wav", "invalid port"),
    ("http://public.test:-1/a.wav", "invalid port"),
    ("http://[::1/a.wav", "malformed host"),
    ("http://::1]/a.wav", "malformed host"),
    ("http://[not-an-ip]/a.wav", "malformed host"),
    ("http://[v1.fe]/a.wav", "malformed host"),
    ("http://[::1]junk/a.wav", "malformed host"),
    ("http://[127.0.0.1]/a.wav", "malformed host"),
    ("http://public.test:80:80/a.wav", "invalid port"),
    ("http://public.test:+80/a.wav", "invalid port"),
    ("http://public.test\\@evil.test/a.wav", "credentials"),
    ("ftp://public.test/a.wav", "http or https"),
    ("file:///etc/passwd", "http or https"),
    ("gopher://public.test/", "http or https"),
    ("javascript:alert(1)", "http or https"),
    ("//public.test/a.wav", "http or https, not 'empty'"),
    ("public.test/a.wav", "http or https"),
    ("", "non-empty"),
    ("http:///nohost", "no host"),
    ("http://", "no host"),
    ("http://user:pass@public.test/a.wav", "credentials"),
    ("http://user@public.test/a.wav", "credentials"),
    ("http://@public.test/a.wav", "credentials"),
    ("http://pub lic.test/a.wav", "control characters"),
    ("http://public.test/a\nb.wav", "control characters"),
    ("http://public.test\t/a.wav", "control characters"),
    ("http://public.test/a\x00.wav", "control characters"),
    ("http://a..test/", "not a valid host name"),
    ("http://" + "a" * 64 + ".test/", "not a valid host name"),
    ("http://pub$lic.test/", "not a valid host name"),
    ("http://public.test/" + "x" * 9000, "longer than"),
]


@pytest.mark.parametrize("url,reason", MALFORMED)
def test_malformed_urls_are_invalid_input_before_any_connection(url, reason, network_guard):
    looked_up = []

    def resolve(host, port):
        looked_up.append(host)
        return [PLAYS_PUBLIC]

    with network_guard.recording() as attempts:
        with pytest.raises(InvalidInput, match=reason) as caught:
            fetch_audio(url, max_bytes=10_000, allow_private=True, resolve=resolve)
    assert caught.value.as_item()["error"].startswith("invalid_input: audio_url ")
    assert looked_up == [] and attempts == []


def test_error_messages_echo_only_a_short_excerpt_of_the_host():
    host = ".".join(["a" * 60] * 4) + ".test"
    with pytest.raises(InvalidInput) as caught:
        check_url(f"http://{host}/", allow_private=False, resolve=lambda h, p: ["10.0.0.1"])
    message = caught.value.message
    assert "…" in message and host not in message
    assert "more characters]" in message  # the marker says how much was cut
    assert len(message) <= 60 + len("… [999 more characters]") + len(
        "audio_url host '' is a private or local address; only public URLs are fetched")


def test_an_unresolvable_host_is_invalid_audio():
    def resolve(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InvalidAudio, match="'nowhere.test' cannot be resolved"):
        fetch_audio("http://nowhere.test/a.wav", max_bytes=10, allow_private=False,
                    resolve=resolve)


# --- Servers on loopback ------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    body = b"RIFF" + b"\0" * 5000
    seen: list = []     # (server address, path, Host header) of every request answered

    def do_GET(self):
        Handler.seen.append((self.server.server_address[0], self.path, self.headers.get("Host")))
        path, _, query = self.path.partition("?")
        special = getattr(self, "route_" + path.strip("/").replace("-", "_"), None)
        if special is not None:
            return special(parse_qs(query))
        routes = {
            "/ok.wav": (200, {}, self.body),
            "/big.wav": (200, {}, b"x" * 300_000),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-ok": (302, {"Location": "/ok.wav"}, b""),
            "/to-nowhere": (302, {}, b""),
            "/to-malformed": (302, {"Location": "http://[::1/a.wav"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        status, headers, body = routes.get(path, (404, {}, b"no"))
        self.answer(status, headers, body)

    def answer(self, status, headers, body):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_redirect(self, query):
        self.answer(302, {"Location": query["to"][0]}, b"")

    def route_big_nolength(self, query):
        # No Content-Length: only the running count can stop it.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(10):
            self.wfile.write(b"x" * 50_000)

    def route_slow_redirect(self, query):
        # Each hop is well within the per-read timeout; only a deadline over the
        # whole chain sees that together they are too slow.
        hop = int(query["hop"][0])
        time.sleep(0.9)
        if hop >= 3:
            return self.answer(200, {}, self.body)
        self.answer(302, {"Location": f"/slow-redirect?hop={hop + 1}"}, b"")

    def trickle(self, data: bytes):
        """One byte every 0.5 s, until the client goes away (or 30 s, whichever first)."""
        for i in range(min(len(data), 60)):
            try:
                self.wfile.write(data[i:i + 1])
            except OSError:
                return      # the client hung up: what the deadline is for
            time.sleep(0.5)

    def route_trickle_body(self, query):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.trickle(b"x" * 1000)

    def route_trickle_nolength(self, query):
        # Without a length, the deadline's shutdown looks like a clean end of body.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.trickle(b"x" * 1000)

    def route_trickle_headers(self, query):
        self.trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nRIFF")

    def log_message(self, *args):
        pass


class V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def serving(host: str, port: int = 0, tls: ssl.SSLContext | None = None):
    """A real HTTP(S) server with ``Handler`` on ``host``; yields its port."""
    server_class = V6Server if ":" in host else http.server.ThreadingHTTPServer
    httpd = server_class((host, port), Handler)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


class Trap:
    """A listener that counts the connections reaching it and hangs up at once.

    Hanging up (rather than never answering) makes a fetch that wrongly got here
    fail fast instead of waiting out its deadline."""

    def __init__(self, host: str, port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, port))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return          # closed
            self.connections += 1
            conn.close()

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def server():
    with serving("127.0.0.1") as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def public_server():
    """A server on the address the tests' policy treats as public."""
    with serving(PLAYS_PUBLIC) as port:
        yield f"http://{PLAYS_PUBLIC}:{port}"


# --- Plain fetching ------------------------------------------------------------------

def test_fetches_the_body(server):
    assert fetch_audio(server + "/ok.wav", max_bytes=10_000, allow_private=True) == Handler.body


def test_loopback_is_refused_without_allow_private(server, network_guard):
    with network_guard.recording() as attempts:
        with pytest.raises(InvalidInput, match="private or local"):
            fetch_audio(server + "/ok.wav", max_bytes=10_000, allow_private=False)
    assert attempts == []


def test_the_stand_in_for_public_is_refused_by_the_production_policy(public_server):
    with pytest.raises(InvalidInput, match="private or local"):
        fetch_audio(public_server + "/ok.wav", max_bytes=10_000, allow_private=False)
    assert fetch_audio(public_server + "/ok.wav", max_bytes=10_000, allow_private=False,
                       is_public=LOOPBACK_PLAYS_PUBLIC) == Handler.body


def test_size_cap(server):
    with pytest.raises(InvalidAudio, match="limit"):
        fetch_audio(server + "/big.wav", max_bytes=100_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="larger than the limit"):
        fetch_audio(server + "/big-nolength", max_bytes=100_000, allow_private=True)


def test_redirects_are_checked_and_bounded(server):
    assert fetch_audio(server + "/to-ok", max_bytes=10_000, allow_private=True) == Handler.body
    with pytest.raises(InvalidInput, match="redirect must be http or https, not 'file'"):
        fetch_audio(server + "/to-file", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidInput, match="redirect has a malformed host"):
        fetch_audio(server + "/to-malformed", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="without a Location"):
        fetch_audio(server + "/to-nowhere", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="redirected more than 3 times"):
        fetch_audio(server + "/loop", max_bytes=10_000, allow_private=True)


def test_http_errors_and_dead_hosts(server):
    with pytest.raises(InvalidAudio, match="HTTP 404"):
        fetch_audio(server + "/missing.wav", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="could not be fetched"):
        fetch_audio("http://127.0.0.1:9/a.wav", max_bytes=10_000, allow_private=True)


def test_a_dead_address_falls_back_to_the_next_checked_one(public_server):
    """Dual-stack names often list an unreachable address first."""
    port = urlsplit(public_server).port     # nothing listens on 127.0.0.3: refused at once
    body = fetch_audio(f"http://two.test:{port}/ok.wav", max_bytes=10_000, allow_private=True,
                       resolve=lambda h, p: ["127.0.0.3", PLAYS_PUBLIC])
    assert body == Handler.body


def test_proxy_variables_are_ignored(server, monkeypatch):
    """Through a proxy the proxy would resolve the name, and pinning would mean nothing."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://proxy.test:3128")
    assert fetch_audio(server + "/ok.wav", max_bytes=10_000, allow_private=True) == Handler.body


# --- DNS rebinding ---------------------------------------------------------------------

def test_dns_rebinding_cannot_move_the_connection(monkeypatch, network_guard):
    """The name answers 127.0.0.2 ("public") once, then 127.0.0.1 ever after, the way a
    rebinding attacker's DNS server does. The system resolver itself is stood in for, so
    anything that looked the name up a second time (as requests does after a separate
    check) would get 127.0.0.1 and reach the trap listening there on the same port."""
    with contextlib.ExitStack() as stack:
        for _ in range(20):       # a port free on both addresses
            trap = Trap("127.0.0.1")
            try:
                port = stack.enter_context(serving(PLAYS_PUBLIC, trap.port))
                break
            except OSError:
                trap.close()
        else:
            pytest.fail("no port free on both 127.0.0.1 and 127.0.0.2")
        stack.callback(trap.close)

        answers = []
        system_getaddrinfo = socket.getaddrinfo     # the guarded one

        def rebinding_getaddrinfo(host, port_, *args, **kwargs):
            if host != "rebind.test":
                return system_getaddrinfo(host, port_, *args, **kwargs)
            answers.append(PLAYS_PUBLIC if not answers else "127.0.0.1")
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                     (answers[-1], port_))]

        monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
        with network_guard.recording() as attempts:
            body = fetch_audio(f"http://rebind.test:{port}/ok.wav", max_bytes=10_000,
                               allow_private=False, is_public=LOOPBACK_PLAYS_PUBLIC)
    assert body == Handler.body
    assert answers == [PLAYS_PUBLIC]                 # looked up once, by the check
    assert {host for _, host, _ in attempts} == {PLAYS_PUBLIC}   # dialled what was checked
    assert trap.connections == 0
    assert Handler.seen[-1] == (PLAYS_PUBLIC, "/ok.wav", f"rebind.test:{port}")  # Host kept


# --- The total deadline ---------------------------------------------------------------

@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-nolength", "/trickle-headers"])
def test_a_trickling_server_is_stopped_by_the_total_deadline(server, path):
    """One byte every 0.5 s never trips a per-read timeout (1000 bytes: over 8 minutes)."""
    start = time.monotonic()
    with pytest.raises(InvalidAudio, match="took longer than 2 s"):
        fetch_audio(server + path, max_bytes=10_000, allow_private=True, deadline_s=2.0)
    elapsed = time.monotonic() - start
    assert 1.9 <= elapsed < 8.0, elapsed


def test_the_deadline_covers_the_whole_redirect_chain(server):
    """Four answers of 0.9 s each: every one far inside the read timeout, 3.6 s together."""
    assert fetch_audio(server + "/slow-redirect?hop=2", max_bytes=10_000, allow_private=True,
                       deadline_s=10.0) == Handler.body
    start = time.monotonic()
    with pytest.raises(InvalidAudio, match="took longer than 2 s"):
        fetch_audio(server + "/slow-redirect?hop=0", max_bytes=10_000, allow_private=True,
                    deadline_s=2.0)
    assert 1.9 <= time.monotonic() - start < 8.0


# --- Redirects from a public URL inwards (the promise of issue #15) ----------------------

@pytest.fixture(scope="module")
def traps():
    """Listeners on 127.0.0.1 and ::1 that count what reaches them."""
    v4 = Trap("127.0.0.1")
    try:
        v6 = Trap("::1")
    except OSError:
        v6 = None
    yield v4, v6
    v4.close()
    if v6 is not None:
        v6.close()


RESOLVER = make_resolver({"public.test": [PLAYS_PUBLIC], "internal.test": ["10.0.0.1"],
                          "metadata.test": ["169.254.169.254"], "home.test": ["127.0.0.1"],
                          "mixed.test": [PLAYS_PUBLIC, "127.0.0.1"]})

INWARD = [
    "http://127.0.0.1:{v4}/a.wav",
    "http://localhost:{v4}/a.wav",
    "http://home.test:{v4}/a.wav",
    "http://mixed.test:{v4}/a.wav",
    "http://0.0.0.0:{v4}/a.wav",
    "http://2130706433:{v4}/a.wav",
    "http://[::ffff:127.0.0.1]:{v4}/a.wav",
    "http://[::1]:{v6}/a.wav",
    "http://10.0.0.1/a.wav",
    "http://192.168.1.1/a.wav",
    "https://internal.test/a.wav",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://metadata.test/computeMetadata/v1/",
    "http://100.100.100.200/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
]


def test_a_public_redirect_to_a_public_host_is_followed(public_server):
    """The control for the test below: redirects themselves work under this policy."""
    port = urlsplit(public_server).port
    url = f"{public_server}/redirect?to=" + quote(f"http://public.test:{port}/ok.wav", safe="")
    assert fetch_audio(url, max_bytes=10_000, allow_private=False, resolve=RESOLVER,
                       is_public=LOOPBACK_PLAYS_PUBLIC) == Handler.body
    assert Handler.seen[-1] == (PLAYS_PUBLIC, "/ok.wav", f"public.test:{port}")


@pytest.mark.parametrize("target", INWARD)
def test_a_public_url_redirecting_inwards_is_refused(target, public_server, traps,
                                                     network_guard):
    v4, v6 = traps
    if "{v6}" in target and v6 is None:
        pytest.skip("no IPv6 loopback here")
    target = target.format(v4=v4.port, v6=v6.port if v6 else 0)
    before = (v4.connections, v6.connections if v6 else 0)
    url = f"{public_server}/redirect?to=" + quote(target, safe="")
    with network_guard.recording() as attempts:
        with pytest.raises(InvalidInput,
                           match="^audio_url redirect host .* is a private or local address"):
            fetch_audio(url, max_bytes=10_000, allow_private=False, resolve=RESOLVER,
                        is_public=LOOPBACK_PLAYS_PUBLIC, deadline_s=5.0)
    # The first hop was fetched (the refusal is the redirect's), and nothing else dialled.
    assert {host for _, host, _ in attempts} == {PLAYS_PUBLIC}
    assert (v4.connections, v6.connections if v6 else 0) == before


# --- TLS: the pinned address, the URL's name ----------------------------------------------

def _certificates(directory):
    """A test CA and a server certificate for audio.test signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def builder(subject, issuer, key):
        return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (builder("fetch test CA", "fetch test CA", ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (builder("audio.test", "fetch test CA", key)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("audio.test")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: directory / f"{n}.pem" for n in ("ca", "leaf", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["leaf"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_https_dials_the_checked_address_and_verifies_the_name(tmp_path):
    paths = _certificates(tmp_path)
    server_names = []
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(paths["leaf"], paths["key"])
    server_tls.sni_callback = lambda sock, name, ctx: server_names.append(name)
    client_tls = ssl.create_default_context(cafile=str(paths["ca"]))
    resolve = make_resolver({"audio.test": [PLAYS_PUBLIC], "other.test": [PLAYS_PUBLIC]})
    options = dict(max_bytes=10_000, allow_private=False, resolve=resolve,
                   is_public=LOOPBACK_PLAYS_PUBLIC, deadline_s=10.0)

    with serving(PLAYS_PUBLIC, tls=server_tls) as port:
        assert fetch_audio(f"https://audio.test:{port}/ok.wav", ssl_context=client_tls,
                           **options) == Handler.body
        assert server_names[-1] == "audio.test"                                  # SNI
        assert Handler.seen[-1] == (PLAYS_PUBLIC, "/ok.wav", f"audio.test:{port}")  # Host
        # The same address under another name: the certificate does not name it.
        with pytest.raises(InvalidAudio, match=r"could not be fetched \(SSLError\)"):
            fetch_audio(f"https://other.test:{port}/ok.wav", ssl_context=client_tls, **options)
        # Without the test CA (certifi's roots, the default) the server is not trusted.
        with pytest.raises(InvalidAudio, match=r"could not be fetched \(SSLError\)"):
            fetch_audio(f"https://audio.test:{port}/ok.wav", **options)


# --- The socket guard itself ----------------------------------------------------------------

def test_the_guard_stops_what_would_leave_loopback(monkeypatch):
    """The guard is checked against a stand-in for the kernel, installed under it, so
    that even a broken guard sends nothing: what gets past it is only recorded."""
    from tests.net_guard import NetworkAccessBlocked, block_network

    reached = []

    def kernel_connect(sock, address):
        reached.append(("connect", address[0]))
        raise ConnectionRefusedError

    def kernel_sendto(sock, data, *args):
        reached.append(("sendto", args[-1][0]))
        return len(data)

    def kernel_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        if flags & socket.AI_NUMERICHOST:       # parsing only, never a query
            return socket._socket.getaddrinfo(host, port, family, type, proto, flags)
        reached.append(("lookup", host))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port or 0))]

    monkeypatch.setattr(socket.socket, "connect", kernel_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", kernel_connect)
    monkeypatch.setattr(socket.socket, "sendto", kernel_sendto)
    monkeypatch.setattr(socket, "getaddrinfo", kernel_getaddrinfo)
    with block_network() as guard:
        for address in ["93.184.216.34", "192.0.2.1", "10.0.0.1", "169.254.169.254",
                        "0.0.0.0", "2606:4700::1", "::"]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                with pytest.raises(NetworkAccessBlocked):
                    sock.connect((address, 80))
                with pytest.raises(NetworkAccessBlocked):
                    sock.connect_ex((address, 80))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            with pytest.raises(NetworkAccessBlocked):
                sock.connect(("example.com", 80))       # the C library would resolve it
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            with pytest.raises(NetworkAccessBlocked):
                sock.sendto(b"x", ("8.8.8.8", 53))
        for name in ["example.com", "metadata.google.internal", "rebind.test"]:
            with pytest.raises(NetworkAccessBlocked):
                socket.getaddrinfo(name, 80)
            with pytest.raises(NetworkAccessBlocked):
                socket.create_connection((name, 80))
        assert len(guard.blocked) == 7 * 2 + 1 + 1 + 3 * 2
        assert reached == []
        # Loopback, numeric spellings of it and localhost pass through to the "kernel".
        for address in ["127.0.0.1", "127.0.0.2", "2130706433", "localhost"]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                with pytest.raises(ConnectionRefusedError):
                    sock.connect((address, 9))
        assert [host for _, host in reached] == ["127.0.0.1", "127.0.0.2", "2130706433",
                                                 "localhost"]
        socket.getaddrinfo("127.0.0.1", 80)
        socket.getaddrinfo("localhost", 80)
        assert reached[-2:] == [("lookup", "127.0.0.1"), ("lookup", "localhost")]

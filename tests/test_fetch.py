"""audio_url fetching: schemes, private addresses, redirects, size caps, over real HTTP on loopback."""

import http.server
import threading

import pytest

from chatterbox_worker.errors import InvalidAudio, InvalidInput
from chatterbox_worker.fetch import check_url, fetch_audio


def public(host, port):
    return ["93.184.216.34"]


@pytest.mark.parametrize("url", [
    "ftp://example.com/a.wav", "file:///etc/passwd", "gopher://x/", "http:///nohost",
    "http://user:pass@example.com/a.wav",
])
def test_only_plain_http_urls(url):
    with pytest.raises(InvalidInput):
        check_url(url, allow_private=False, resolve=public)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "192.168.0.9", "172.16.4.4",
                                     "169.254.169.254", "::1", "fd00::1", "0.0.0.0"])
def test_private_loopback_link_local_and_metadata_addresses_are_refused(address):
    with pytest.raises(InvalidInput, match="private or local"):
        check_url("http://innocent.example/a.wav", allow_private=False,
                  resolve=lambda host, port: [address])


def test_public_address_passes_and_private_is_allowed_when_asked():
    check_url("https://example.com/a.wav", allow_private=False, resolve=public)
    check_url("http://127.0.0.1:9/a.wav", allow_private=True)


class Handler(http.server.BaseHTTPRequestHandler):
    body = b"RIFF" + b"\0" * 5000

    def do_GET(self):
        routes = {
            "/ok.wav": (200, {}, self.body),
            "/big.wav": (200, {}, b"x" * 300_000),
            "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
            "/to-ok": (302, {"Location": "/ok.wav"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
        }
        status, headers, body = routes.get(self.path, (404, {}, b"no"))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetches_the_body(server):
    assert fetch_audio(server + "/ok.wav", max_bytes=10_000, allow_private=True) == Handler.body


def test_loopback_is_refused_without_allow_private(server):
    with pytest.raises(InvalidInput, match="private or local"):
        fetch_audio(server + "/ok.wav", max_bytes=10_000, allow_private=False)


def test_size_cap(server):
    with pytest.raises(InvalidAudio, match="limit"):
        fetch_audio(server + "/big.wav", max_bytes=100_000, allow_private=True)


def test_redirects_are_checked_and_bounded(server):
    assert fetch_audio(server + "/to-ok", max_bytes=10_000, allow_private=True) == Handler.body
    with pytest.raises(InvalidInput, match="http or https"):
        fetch_audio(server + "/to-file", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="redirected more than"):
        fetch_audio(server + "/loop", max_bytes=10_000, allow_private=True)


def test_http_errors_and_dead_hosts(server):
    with pytest.raises(InvalidAudio, match="HTTP 404"):
        fetch_audio(server + "/missing.wav", max_bytes=10_000, allow_private=True)
    with pytest.raises(InvalidAudio, match="could not be fetched"):
        fetch_audio("http://127.0.0.1:9/a.wav", max_bytes=10_000, allow_private=True)

"""Fetching reference audio from a URL, safely.

Only http and https; the response is read up to a size cap with connect and
read timeouts; redirects are followed by hand (at most 3) so each hop is
checked again. Hosts that resolve to private, loopback, link-local,
multicast or reserved addresses (which covers cloud metadata services at
169.254.169.254) are refused, unless ``ALLOW_PRIVATE_URLS`` is set. The check
is made on the resolved addresses before connecting; a host whose DNS answer
changes between the check and the connection could still slip through, so
the worker should also run without access to anything sensitive.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, List
from urllib.parse import urljoin, urlsplit

from .errors import InvalidAudio, InvalidInput

MAX_REDIRECTS = 3
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0

Resolver = Callable[[str, int], List[str]]


def _resolve(host: str, port: int) -> List[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def check_url(url: str, *, allow_private: bool, resolve: Resolver = _resolve) -> None:
    """``InvalidInput`` unless ``url`` is http(s) to a public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise InvalidInput(f"audio_url must be http or https, not {parts.scheme or 'empty'!r}")
    if not parts.hostname:
        raise InvalidInput("audio_url has no host")
    if parts.username or parts.password:
        raise InvalidInput("audio_url must not carry credentials")
    if allow_private:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname, port)
    except OSError:
        raise InvalidAudio(f"audio_url host {parts.hostname!r} cannot be resolved") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified):
            raise InvalidInput(f"audio_url host {parts.hostname!r} is a private or local address; "
                               f"only public URLs are fetched")


def fetch_audio(url: str, *, max_bytes: int, allow_private: bool,
                resolve: Resolver = _resolve) -> bytes:
    """The body at ``url`` (``InvalidAudio`` when it cannot be had or is too large)."""
    import requests

    current = url
    # One session for the whole chain, closed at the end: its pool owns the
    # connections that streamed responses hand back.
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(current, allow_private=allow_private, resolve=resolve)
            try:
                response = session.get(current, stream=True, allow_redirects=False,
                                       timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                       headers={"User-Agent": "chatterbox-worker"})
            except requests.RequestException as exc:
                raise InvalidAudio(f"audio_url could not be fetched ({type(exc).__name__})") from None
            with response:
                if response.is_redirect:
                    current = urljoin(current, response.headers.get("Location", ""))
                    continue
                return _read_body(response, max_bytes)
    raise InvalidAudio(f"audio_url redirected more than {MAX_REDIRECTS} times")


def _read_body(response, max_bytes: int) -> bytes:
    import requests

    if response.status_code != 200:
        raise InvalidAudio(f"audio_url answered HTTP {response.status_code}")
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidAudio(f"audio_url is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    try:
        for block in response.iter_content(64 * 1024):
            body += block
            if len(body) > max_bytes:
                raise InvalidAudio(f"audio_url is larger than the limit of {max_bytes} bytes")
    except requests.RequestException as exc:
        raise InvalidAudio(f"audio_url download failed ({type(exc).__name__})") from None
    return bytes(body)

"""How uvicorn serves the app: its configuration, and HTTP/1.1 with a deadline on request headers.

uvicorn bounds an idle keep-alive connection, a request body (through the
app's ``REQUEST_TIMEOUT_S``) and a WebSocket's messages, but not the time a
client may take to send a request's line and headers: a connection that
sends nothing, or drips a header a byte at a time, is held for as long as
the client likes. Each holds a socket and a file descriptor (no synthesis
slot), so a few thousand of them lock every client out of a bare Pod.
``HeaderDeadline`` closes a connection whose request headers are not
complete within ``HEADER_TIMEOUT_S`` of its first byte being awaited: when
the connection opens, and when a keep-alive connection starts its next
request. And a request answered before its body was read (401, 404, 413, a
504 at the deadline) leaves the client ``HEADER_TIMEOUT_S`` to finish
sending that body: uvicorn would otherwise wait for the rest for ever,
since the body's first byte cancels its keep-alive timer. A reverse proxy
with its own header timeout (RunPod's proxy in front of a load-balancing
endpoint) makes this a second line, not the only one.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import Settings
from .app import MAX_JSON_BODY

GRACE_S = 30  # SIGTERM: how long running requests may finish


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take too long."""

    header_timeout_s: float = 15.0  # set per server by ``protocol_with_header_timeout``

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._leftover_timer: Optional[asyncio.TimerHandle] = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # h11 reports the client IDLE until a request's headers are complete
        # (and again once a keep-alive connection starts its next request).
        # A WebSocket upgrade hands the transport to another protocol: the
        # client is then past IDLE here and the timer is cancelled.
        if self.conn.their_state is h11.IDLE:
            self._arm()
        else:
            self._disarm()
        if not self._answered_with_body_left():
            self._forget_leftover()  # the answered request's body is all in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (self._answered_with_body_left() and self._leftover_timer is None
                and not self.transport.is_closing()):
            self._leftover_timer = self.loop.call_later(self.header_timeout_s, self._body_too_slow)

    def handle_websocket_upgrade(self, event) -> None:
        # The transport goes to the WebSocket protocol; this one's ``connection_lost``
        # will not run, so its timers stop here.
        self._stop_timers()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._stop_timers()
        super().connection_lost(exc)

    def _stop_timers(self) -> None:
        self._disarm()
        self._forget_leftover()

    def _answered_with_body_left(self) -> bool:
        """Our response is complete while the client still sends that request's body (h11
        says SEND_BODY for a next request too, but then our side is not DONE)."""
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.SEND_BODY

    def _forget_leftover(self) -> None:
        if self._leftover_timer is not None:
            self._leftover_timer.cancel()
            self._leftover_timer = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info("closed a connection from %s whose request headers took longer "
                             "than HEADER_TIMEOUT_S (%g s)", self._peer(), self.header_timeout_s)
            self.transport.close()

    def _peer(self) -> str:
        return "%s:%d" % tuple(self.client[:2]) if self.client else "an unknown address"

    def _body_too_slow(self) -> None:
        self._leftover_timer = None
        if self._answered_with_body_left() and not self.transport.is_closing():
            self.logger.info("closed a connection from %s still sending the body of a request "
                             "answered %g s ago", self._peer(), self.header_timeout_s)
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type:
    """``HeaderDeadline`` with its deadline (a class: uvicorn makes one protocol per connection)."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": float(seconds)})


def uvicorn_config(app, settings: Settings, **overrides):
    """The uvicorn configuration the server runs with (tests serve the app with it too)."""
    import uvicorn

    options = dict(log_level=settings.log_level.lower(), ws_max_size=MAX_JSON_BODY,
                   timeout_graceful_shutdown=GRACE_S, proxy_headers=False,
                   http=protocol_with_header_timeout(settings.header_timeout_s))
    options.update(overrides)
    return uvicorn.Config(app, **options)


__all__ = ["GRACE_S", "HeaderDeadline", "protocol_with_header_timeout", "uvicorn_config"]

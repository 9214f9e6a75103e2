"""Misbehaving S3 endpoints on loopback for tests: real TCP listeners on 127.0.0.1, no mocks.

``SilentEndpoint`` accepts every connection and never answers, the way a hung
server, a black-holing proxy or a wrong port behind a load balancer looks to
a client: connect succeeds at once, then nothing. With ``drain=True`` (the
default) it also reads and throws away what it is sent, so the client gets
its whole request out and then waits for an answer (the read timeout path);
with ``drain=False`` it never reads either, so a large body stalls the
client's send once the socket buffers are full (the send path).
"""

from __future__ import annotations

import socket
import threading


class SilentEndpoint:
    def __init__(self, *, drain: bool = True):
        self.drain = drain
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections = 0  # how many connections it has accepted (the client did reach it)
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-endpoint", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed by stop()
                return
            with self._lock:
                if self._stopped.is_set():
                    conn.close()
                    return
                self.connections += 1
                # Kept open (never closed, never written to) until stop(): closing it would
                # be an answer of sorts (the client would see a reset, not silence).
                self._open.append(conn)
            if self.drain:
                threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass

    def stop(self) -> None:
        self._stopped.set()
        # shutdown() wakes the accept() blocked in the thread; close() alone may not.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()
        self._thread.join(timeout=5)

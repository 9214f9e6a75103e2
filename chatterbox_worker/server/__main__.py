"""``python -m chatterbox_worker.server``: listen at once, load the model in the background.

Listens on ``HOST``:``PORT`` (and ``PORT_HEALTH`` when set and different, for
``/ping`` and ``/health`` only). On SIGTERM it stops accepting, lets running
requests finish for up to ``protocol.GRACE_S``, then exits.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import List, Optional

from ..config import Settings, load_settings
from ..errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> Optional[str]:
    """Why the server must not start as configured, or ``None``."""
    if settings.api_key is None and not is_loopback(settings.host) and not settings.allow_no_api_key:
        return (f"HOST={settings.host} is reachable from other machines and API_KEY is not set; "
                f"set API_KEY, listen on 127.0.0.1, or set ALLOW_NO_API_KEY=1 if a gateway in "
                f"front checks keys (RunPod load-balancing endpoints do)")
    return None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


def main(argv: Optional[List[str]] = None) -> int:
    import uvicorn

    from .app import create_app
    from .protocol import uvicorn_config

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"chatterbox-server: cannot start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = check_exposure(settings)
    if problem:
        print(f"chatterbox-server: cannot start: {problem}", file=sys.stderr)
        return 2
    try:
        sockets = [bind(settings.host, settings.port)]
        separate_health = settings.port_health not in (None, settings.port)
        if separate_health:
            sockets.append(bind(settings.host, settings.port_health))
    except OSError as exc:
        print(f"chatterbox-server: cannot start: cannot listen on {settings.host}: {exc.strerror}",
              file=sys.stderr)
        return 2
    app = create_app(settings)
    if separate_health:
        app.state.core.health_port = settings.port_health
    config = uvicorn_config(app, settings)
    logging.getLogger("chatterbox_worker.server").info(
        "listening on %s port %s%s; loading the model", settings.host, settings.port,
        f" (health on {settings.port_health})" if separate_health else "")
    uvicorn.Server(config).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())

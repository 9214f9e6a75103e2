"""The HTTP adapter's frame: the app, its life cycle, keys, limits and the error mapping.

The model loads on a background thread while the port already answers:
``/ping`` says 204 until it is ready (RunPod load-balancing endpoints wait
for 200), ``/health`` says ``loading``, every other route 503. Errors of the
one exception tree become ``{"detail": message, "code": code}`` with the
status of ``STATUS``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import logging
import re
import threading
import uuid
from typing import Callable, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import Settings
from ..errors import InternalError, ModelUnavailable, WorkerError, reason
from ..service import Service
from .metrics import Metrics

log = logging.getLogger("chatterbox_worker.server")

STATUS = {
    "invalid_input": 400,
    "voice_not_found": 404,
    "voice_exists": 409,
    "output_too_large": 413,
    "invalid_audio": 422,
    "invalid_voice_file": 422,
    "storage_unavailable": 503,
    "model_unavailable": 503,
    "internal_error": 500,
}
# Codes of the errors the router itself answers (see on_http).
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
OPEN_PATHS = ("/health", "/ping")  # no key, answered while loading, served on PORT_HEALTH
# Request bodies: JSON requests carry at most MAX_TEXT_CHARS of text (4 bytes a
# character, escapes included, fit); an upload at most 10 clips of 25 MiB.
MAX_JSON_BODY = 2 * 1024 * 1024
MAX_UPLOAD_BODY = 10 * 25 * 1024 * 1024 + 1024 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Busy(Exception):
    """Every slot runs and the wait queue is full."""


class RequestTimeout(Exception):
    """The request ran past ``REQUEST_TIMEOUT_S`` before its first bytes."""


async def read_in_time(settings: Settings, reading):
    """``await reading`` (a request body, a form), or ``RequestTimeout`` when it is still
    arriving after ``REQUEST_TIMEOUT_S``: a client dripping bytes holds no slot, but should
    not hold on either."""
    try:
        async with asyncio.timeout(settings.request_timeout_s):
            return await reading
    except TimeoutError:
        raise RequestTimeout() from None


class StreamAborted(Exception):
    """A response that had begun stops early (a failure or its deadline, already logged under
    the request id). ``Gate`` drops the connection without the final chunk, so the client
    sees an incomplete transfer; no second traceback is logged."""


class Slots:
    """At most ``running`` syntheses at once and ``queue`` more waiting; beyond that ``Busy``.

    Concurrent requests then go through the engine's scheduler together, as
    concurrent RunPod jobs do."""

    def __init__(self, running: int, queue: int):
        self.limit = running
        self.queue = queue
        self.running = 0
        self.waiting = 0
        self._free: Optional[asyncio.Semaphore] = None

    async def acquire(self) -> "Slot":
        if self._free is None:
            self._free = asyncio.Semaphore(self.limit)
        if self.running >= self.limit and self.waiting >= self.queue:
            raise Busy()
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return Slot(self)

    def _release(self) -> None:
        self.running -= 1
        self._free.release()


class Slot:
    def __init__(self, slots: Slots):
        self._slots = slots
        self._held = True

    def release(self) -> None:
        """Idempotent; call on the event loop."""
        if self._held:
            self._held = False
            self._slots._release()


class State:
    """What the routes share: the service once loaded, the slots, the worker threads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.service: Optional[Service] = None
        self.failure: Optional[str] = None
        self.ready = threading.Event()
        self.slots = Slots(settings.concurrency, settings.max_queue)
        # One decode/encode step of a stream at a time per running request,
        # plus room for closing streams that are being cancelled.
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency + 4, thread_name_prefix="http")
        self.health_port: Optional[int] = None
        self.metrics = Metrics()
        # Voice uploads read their files into memory (up to 10 x 25 MiB) one request at a
        # time; the engine builds voices one at a time anyway. Made on the event loop.
        self._uploads: Optional[asyncio.Semaphore] = None

    @property
    def uploads(self) -> asyncio.Semaphore:
        if self._uploads is None:
            self._uploads = asyncio.Semaphore(1)
        return self._uploads

    def batch_size(self) -> int:
        """Requests in the engine's current decode step (0 before the first one)."""
        engine = self.service.engine if self.service is not None else None
        if engine is None:
            return 0
        return engine.scheduler.active

    @property
    def phase(self) -> str:
        if self.service is not None:
            return "ready"
        return "failed" if self.failure else "loading"

    def require_service(self) -> Service:
        if self.service is None:
            if self.failure:
                raise ModelUnavailable(f"the model could not be loaded: {self.failure}")
            raise ModelUnavailable("the model is loading; retry shortly")
        return self.service

    def load(self, loader: Callable[[Settings], Service]) -> None:
        try:
            self.service = loader(self.settings)
            log.info("model ready: serving requests")
        except BaseException as exc:  # the server stays up to say why in /health
            self.failure = reason(exc, 300)
            log.error("model could not be loaded: %s", self.failure)
        finally:
            self.ready.set()


def error_response(exc: WorkerError, request_id: str = "-") -> JSONResponse:
    status = STATUS.get(exc.code, 500)
    headers = {"Retry-After": "5"} if exc.code == "model_unavailable" else None
    return JSONResponse({"detail": exc.message, "code": exc.code, "request_id": request_id},
                        status_code=status, headers=headers)


def request_id(request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def check_key(settings: Settings, given: Optional[str]) -> bool:
    """Constant-time comparison with ``API_KEY``; true when no key is configured."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value().encode("utf-8")
    return given is not None and hmac.compare_digest(given.encode("utf-8"), expected)


def key_from_headers(headers, *, bearer: bool) -> Optional[str]:
    key = headers.get("x-api-key")
    if key is None and bearer:
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
    return key


class Unauthorized(Exception):
    def __init__(self, openai: bool = False):
        super().__init__()
        self.openai = openai  # answer in OpenAI's error shape too (its clients read that)


def require_key(request: Request) -> None:
    """Dependency of every keyed route: ``X-API-Key``."""
    if not check_key(request.app.state.core.settings, key_from_headers(request.headers, bearer=False)):
        raise Unauthorized()


def require_key_or_bearer(request: Request) -> None:
    """Dependency of the OpenAI routes: ``X-API-Key`` or ``Authorization: Bearer``."""
    if not check_key(request.app.state.core.settings, key_from_headers(request.headers, bearer=True)):
        raise Unauthorized(openai=True)


class BodyTooLarge(Exception):
    pass


class Gate:
    """Pure ASGI middleware: request ids, the loading gate, the health port, body size limits."""

    def __init__(self, app, state: State):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        path = scope["path"]
        server = scope.get("server") or (None, None)
        if (self.state.health_port is not None and server[1] == self.state.health_port
                and path not in OPEN_PATHS):
            return await self._plain(scope, send, 404, {"detail": "Not Found"}, rid)
        if path not in OPEN_PATHS and self.state.service is None:
            try:
                self.state.require_service()
            except ModelUnavailable as exc:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1013,
                                       "reason": "model unavailable"})
                response = error_response(exc, rid)
                response.headers["x-request-id"] = rid
                return await _send_response(response, scope, send)
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        limit = MAX_UPLOAD_BODY if path.rstrip("/") == "/voices" else MAX_JSON_BODY
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._too_large(scope, send, limit, rid)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                route = scope.get("route")
                self.state.metrics.count_request(scope["method"],
                                                 getattr(route, "path", "unmatched"),
                                                 message["status"])
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._too_large(scope, send, limit, rid)
        except StreamAborted:
            if not started:  # cannot happen (it is raised after the first bytes); be loud if so
                raise
            # Returning without the final chunk makes the server close the connection.

    async def _too_large(self, scope, send, limit, rid):
        body = {"detail": f"the request body is larger than {limit} bytes",
                "code": "request_too_large", "request_id": rid}
        await self._plain(scope, send, 413, body, rid)

    @staticmethod
    async def _plain(scope, send, status, body, rid):
        response = JSONResponse(body, status_code=status, headers={"x-request-id": rid})
        await _send_response(response, scope, send)


async def _send_response(response: Response, scope, send) -> None:
    async def no_receive():
        return {"type": "http.disconnect"}

    await response(scope, no_receive, send)


def create_app(settings: Settings, loader: Optional[Callable[[Settings], Service]] = None, *,
               load_in_background: bool = True) -> FastAPI:
    """The app; ``loader`` makes the service (default: load and warm the real engine)."""
    from contextlib import asynccontextmanager

    from . import routes_speech, routes_voices
    from ..service import create_service

    state = State(settings)
    loader = loader or create_service

    @asynccontextmanager
    async def lifespan(app):
        if load_in_background:
            threading.Thread(target=state.load, args=(loader,), name="model-load",
                             daemon=True).start()
        else:
            state.load(loader)
        try:
            yield
        finally:
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Chatterbox TTS", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.core = state

    @app.exception_handler(WorkerError)
    async def on_worker_error(request: Request, exc: WorkerError):
        return error_response(exc, request_id(request))

    @app.exception_handler(Unauthorized)
    async def on_unauthorized(request: Request, exc: Unauthorized):
        message = "missing or wrong API key"
        body = {"detail": message, "code": "unauthorized", "request_id": request_id(request)}
        if exc.openai:
            body["error"] = {"message": message, "type": "invalid_request_error", "param": None,
                             "code": "invalid_api_key"}
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Busy)
    async def on_busy(request: Request, exc: Busy):
        return JSONResponse({"detail": "the server is busy: every slot runs and the wait queue "
                             "is full; retry shortly", "code": "busy",
                             "request_id": request_id(request)},
                            status_code=429, headers={"Retry-After": "2"})

    @app.exception_handler(RequestTimeout)
    async def on_timeout(request: Request, exc: RequestTimeout):
        return JSONResponse({"detail": f"the request took longer than REQUEST_TIMEOUT_S "
                             f"({settings.request_timeout_s:g} s)", "code": "timeout",
                             "request_id": request_id(request)}, status_code=504)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
        return JSONResponse({"detail": "; ".join(parts), "code": "invalid_input",
                             "request_id": request_id(request)}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        # The router's own answers (no such route, wrong method, a malformed body Starlette
        # refused): every error carries a code, as the contract says.
        code = HTTP_CODES.get(exc.status_code,
                              "invalid_input" if exc.status_code < 500 else "internal_error")
        return JSONResponse({"detail": exc.detail, "code": code, "request_id": request_id(request)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        rid = request_id(request)
        log.error("request=%s failed", rid, exc_info=exc)
        return error_response(InternalError(
            "the request failed unexpectedly; the server logged the details under this "
            "request id"), rid)

    @app.get("/ping")
    async def ping():
        if state.phase == "ready":
            return JSONResponse({"status": "healthy"})
        if state.phase == "loading":
            return Response(status_code=204)
        return JSONResponse({"status": "unavailable", "detail": state.failure}, status_code=503)

    @app.get("/health")
    async def health():
        counts = {"running": state.slots.running, "queued": state.slots.waiting}
        if state.phase != "ready":
            body = {"status": state.phase if state.phase == "loading" else "unavailable", **counts}
            if state.failure:
                body["detail"] = state.failure
            return JSONResponse(body, status_code=503)
        body = await asyncio.get_running_loop().run_in_executor(None, state.service.health)
        return JSONResponse({**body, **counts})

    @app.get("/metrics", dependencies=[Depends(require_key)])
    async def metrics():
        text = state.metrics.render(running=state.slots.running, queued=state.slots.waiting,
                                    batch=state.batch_size())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(routes_speech.router)
    app.include_router(routes_voices.router)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-ID"])
    app.add_middleware(Gate, state=state)
    return app

"""Speech routes: ``POST /tts/generate``, OpenAI's ``POST /v1/audio/speech`` and
``GET /v1/audio/voices``, and ``WS /tts/stream``.

Every route streams: the first bytes go out as soon as the first chunk is
encoded, with chunked transfer. Problems found before that (a bad field, an
unknown voice, a full queue) are proper HTTP errors; a failure after it ends
the response without its final chunk, so the client sees an incomplete
transfer, and is logged under the request id. A client that goes away
cancels its synthesis; one that stops reading holds its slot no longer than
``REQUEST_TIMEOUT_S`` (every send has the request's deadline too).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Callable, Optional, Tuple

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse

from ..audio import CONTENT_TYPES
from ..errors import InvalidInput, VoiceNotFound, WorkerError, excerpt
from ..schemas import GenerateRequest, is_voice_id, parse_request
from ..service import JobSummary, Service
from .app import (STATUS, Busy, RequestTimeout, Slot, State, StreamAborted, check_key,
                  key_from_headers, read_in_time, request_id, require_key,
                  require_key_or_bearer)
from .streaming import LiveStream

log = logging.getLogger("chatterbox_worker.server")
router = APIRouter()

# OpenAI's model names (and this one's) all mean the served model.
OPENAI_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "chatterbox")
# OpenAI's voice names mean the built-in voice unless a stored voice has that id.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage",
                 "shimmer", "verse", "marin", "cedar")
OPENAI_FORMATS = {"mp3": "mp3", "opus": "opus", "aac": "aac", "flac": "flac", "wav": "wav",
                  "pcm": "pcm_s16le"}
OPENAI_CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                        "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
# Chatterbox's own generate fields the OpenAI route also takes (extra_body in OpenAI's clients).
SPEECH_EXTRAS = ("seed", "exaggeration", "cfg_weight", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "language")
# How long a WebSocket's closing error message may take to go out: its client may not be reading.
WS_FAIL_TIMEOUT_S = 5.0


def parse_json_object(raw) -> dict:
    """A request body (or WebSocket message) as a JSON object, else ``InvalidInput``.

    ``RecursionError``: a body of thousands of nested brackets exhausts the parser's stack."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("the request body must be a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidInput("the request body must be a JSON object")
    return data


async def json_body(request: Request) -> dict:
    return parse_json_object(await read_in_time(request.app.state.core.settings, request.body()))


def strip_pth(voice_id):
    """``narrator.pth`` names the voice ``narrator`` on the HTTP routes."""
    if isinstance(voice_id, str) and voice_id.endswith(".pth"):
        return voice_id[:-4]
    return voice_id


def parse_generate(data: dict, max_text_chars: int) -> GenerateRequest:
    """The generate fields of the job contract; the audio is always the response itself."""
    data = dict(data)
    action = data.pop("action", None)
    if action not in (None, "generate"):  # absent or null means generate, as in the job contract
        raise InvalidInput(f"action: this route only generates (got '{excerpt(action, 40)}')")
    if data.get("output", "auto") != "auto":
        raise InvalidInput("output: over HTTP the audio is the response body; 'inline' and 's3' "
                           "apply to RunPod jobs")
    data.pop("stream", None)  # always streamed here
    if "voice_id" in data:
        data["voice_id"] = strip_pth(data["voice_id"])
    request = parse_request({**data, "action": "generate"}, max_text_chars=max_text_chars)
    assert isinstance(request, GenerateRequest)
    return request


async def start_stream(core: State, service: Service, generate: GenerateRequest, rid: str,
                       action: str) -> Tuple[LiveStream, Optional[bytes], Slot]:
    """A slot, the voice loaded, the first bytes made: everything that can still fail cleanly.

    ``RequestTimeout`` when ``REQUEST_TIMEOUT_S`` passes first (queue wait included)."""
    summary = JobSummary(rid, action=action, voice=generate.voice_id or "builtin")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + core.settings.request_timeout_s
    slot: Optional[Slot] = None
    live: Optional[LiveStream] = None
    try:
        async with asyncio.timeout_at(deadline):
            slot = await core.slots.acquire()
            live = await LiveStream.open(service, generate, core.executor, summary,
                                         core.metrics.observe)
            live.deadline = deadline
            first = await live.next()
        return live, first, slot
    except BaseException as exc:
        outcome = exc.code if isinstance(exc, WorkerError) else (
            "cancelled" if isinstance(exc, asyncio.CancelledError) else
            "timeout" if isinstance(exc, TimeoutError) else
            "busy" if isinstance(exc, Busy) else "internal_error")
        release = slot.release if slot is not None else (lambda: None)
        if live is not None:
            live.close(outcome, then=lambda: loop.call_soon_threadsafe(release))
        else:
            release()
            summary.outcome = outcome
            log.info(summary.line())
            core.metrics.observe(summary)
        if isinstance(exc, TimeoutError):
            raise RequestTimeout() from None
        raise


def deadline_or_none(deadline: float) -> Optional[float]:
    return None if deadline == float("inf") else deadline


async def next_in_time(live: LiveStream) -> Optional[bytes]:
    """``live.next()``, or ``TimeoutError`` once the request's deadline has passed."""
    async with asyncio.timeout_at(deadline_or_none(live.deadline)):
        return await live.next()


async def audio_body(live: LiveStream, first: Optional[bytes], slot: Slot, rid: str,
                     frame: Callable[[bytes], bytes] = lambda data: data,
                     end: Optional[Callable[[dict], bytes]] = None):
    """The response body: the first bytes, then each chunk as it is made.

    A failure after the first bytes is logged here and raised as ``StreamAborted``."""
    loop = asyncio.get_running_loop()
    outcome = "ok"
    try:
        data = first
        while data is not None:
            yield frame(data)
            data = await next_in_time(live)
        if end is not None:
            yield end(live.stream.result())
    except (asyncio.CancelledError, GeneratorExit):
        # Closed by AudioResponse when its client stopped reading past the deadline, or
        # cancelled because the client went away.
        outcome = "timeout" if loop.time() >= live.deadline else "cancelled"
        raise
    except TimeoutError:
        outcome = "timeout"
        log.error("request=%s stopped at REQUEST_TIMEOUT_S after its first bytes", rid)
        raise StreamAborted() from None
    except WorkerError as exc:
        outcome = exc.code
        log.error("request=%s failed after its first bytes: %s: %s", rid, exc.code, exc.message)
        raise StreamAborted() from None
    except Exception:
        outcome = "internal_error"
        log.exception("request=%s failed after its first bytes", rid)
        raise StreamAborted() from None
    finally:
        live.close(outcome, then=lambda: loop.call_soon_threadsafe(slot.release))


class _SendTimeout(Exception):
    pass


class AudioResponse(StreamingResponse):
    """``audio_body`` as a response whose every send must finish by the request's deadline.

    The server's send waits while the client's socket is full, so a client that stops
    reading would otherwise keep its synthesis (and its slot) for as long as it likes."""

    def __init__(self, live: LiveStream, first: Optional[bytes], slot: Slot, rid: str, *,
                 frame: Callable[[bytes], bytes] = lambda data: data,
                 end: Optional[Callable[[dict], bytes]] = None, **kwargs):
        super().__init__(audio_body(live, first, slot, rid, frame, end), **kwargs)
        self._live = live
        self._rid = rid

    async def stream_response(self, send) -> None:
        async def send_in_time(message) -> None:
            try:
                async with asyncio.timeout_at(deadline_or_none(self._live.deadline)):
                    await send(message)
            except TimeoutError:
                raise _SendTimeout() from None

        try:
            await super().stream_response(send_in_time)
        except _SendTimeout:
            log.error("request=%s stopped at REQUEST_TIMEOUT_S: its client stopped reading",
                      self._rid)
            await self.body_iterator.aclose()  # stops the synthesis, frees the slot
            raise StreamAborted() from None


@router.post("/tts/generate", dependencies=[Depends(require_key)])
async def generate(request: Request):
    core: State = request.app.state.core
    service = core.require_service()
    generate = parse_generate(await json_body(request), core.settings.max_text_chars)
    rid = request_id(request)
    live, first, slot = await start_stream(core, service, generate, rid, "generate")
    return AudioResponse(live, first, slot, rid, media_type=CONTENT_TYPES[generate.format],
                         headers={"X-Seed": str(live.stream.seed)})


# -- OpenAI ---------------------------------------------------------------------


def openai_voice(service: Service, voice) -> Optional[str]:
    """A stored voice id, or ``None`` for the built-in voice."""
    if isinstance(voice, dict):
        voice = voice.get("id")
    voice = strip_pth(voice)
    if voice is None or voice == "default":
        return None
    if not isinstance(voice, str):
        raise InvalidInput("voice: must be a voice id")
    if voice.lower() in OPENAI_VOICES and not (is_voice_id(voice) and service.voices.exists(voice)):
        return None
    if not is_voice_id(voice):
        raise VoiceNotFound(excerpt(voice, 64))
    return voice


def openai_request(data: dict, service: Service, max_text_chars: int
                   ) -> Tuple[GenerateRequest, str, bool]:
    """OpenAI's speech body as a generate request; its response format and whether SSE."""
    known = {"model", "input", "voice", "response_format", "speed", "instructions",
             "stream_format", *SPEECH_EXTRAS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInput(f"{excerpt(unknown[0], 40)}: unknown field")
    model = data.get("model")
    served = service.engine.model.variant
    if model not in OPENAI_MODELS and model != served:
        raise InvalidInput(f"model: '{excerpt(model, 40)}' is not served; use one of "
                           f"{', '.join(OPENAI_MODELS)} or {served}")
    response_format = data.get("response_format", "mp3")
    if not isinstance(response_format, str) or response_format not in OPENAI_FORMATS:
        raise InvalidInput(f"response_format: '{excerpt(response_format, 20)}' is not one of "
                           f"{', '.join(OPENAI_FORMATS)}")
    speed = data.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.25 <= speed <= 4.0:
        raise InvalidInput("speed: must be a number from 0.25 to 4.0")
    if speed != 1.0:
        raise InvalidInput("speed: only 1.0 is supported (no pitch-preserving time stretch)")
    stream_format = data.get("stream_format", "audio")
    if not isinstance(stream_format, str) or stream_format not in ("audio", "sse"):
        raise InvalidInput("stream_format: must be 'audio' or 'sse'")
    if not isinstance(data.get("input"), str):
        raise InvalidInput("input: must be a string")
    fmt = OPENAI_FORMATS[response_format]
    # AAC is not a format of the job contract: validate as MP3 (same rates), then encode AAC.
    fields = {"text": data["input"], "format": "mp3" if fmt == "aac" else fmt,
              "voice_id": openai_voice(service, data.get("voice")),
              **{name: data[name] for name in SPEECH_EXTRAS if name in data}}
    request = parse_request({**fields, "action": "generate"}, max_text_chars=max_text_chars)
    if fmt == "aac":
        request = request.model_copy(update={"format": "aac"})
    return request, response_format, stream_format == "sse"


def openai_error(exc: WorkerError, rid: str, status: Optional[int] = None) -> JSONResponse:
    """OpenAI's error shape (what its clients read), with this server's ``detail`` and ``code``."""
    kind = "invalid_request_error" if STATUS.get(exc.code, 500) < 500 else "server_error"
    return JSONResponse({"error": {"message": exc.message, "type": kind, "param": None,
                                   "code": exc.code},
                         "detail": exc.message, "code": exc.code, "request_id": rid},
                        status_code=status or STATUS.get(exc.code, 500))


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode("ascii")


@router.post("/v1/audio/speech", dependencies=[Depends(require_key_or_bearer)])
async def speech(request: Request):
    core: State = request.app.state.core
    rid = request_id(request)
    try:
        service = core.require_service()
        generate, response_format, sse = openai_request(await json_body(request), service,
                                                         core.settings.max_text_chars)
        live, first, slot = await start_stream(core, service, generate, rid, "speech")
    except WorkerError as exc:
        return openai_error(exc, rid)
    if not sse:
        return AudioResponse(live, first, slot, rid,
                             media_type=OPENAI_CONTENT_TYPES[response_format])
    characters = len(generate.text)

    def delta(data: bytes) -> bytes:
        return sse_event({"type": "speech.audio.delta",
                          "audio": base64.b64encode(data).decode("ascii")})

    def done(result: dict) -> bytes:
        # Speech tokens made, at 25 a second, stand in for OpenAI's output tokens.
        output_tokens = round(result["duration_s"] * 25)
        return sse_event({"type": "speech.audio.done",
                          "usage": {"input_tokens": characters, "output_tokens": output_tokens,
                                    "total_tokens": characters + output_tokens}})

    return AudioResponse(live, first, slot, rid, frame=delta, end=done,
                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/v1/audio/voices", dependencies=[Depends(require_key_or_bearer)])
async def openai_voices(request: Request):
    core: State = request.app.state.core
    service = core.require_service()
    loop = asyncio.get_running_loop()
    stored = await loop.run_in_executor(None, service.voice_ids)
    builtin = service.engine.builtin_voice is not None
    return {"voices": (["default"] if builtin else []) + stored,
            "builtin_aliases": list(OPENAI_VOICES) if builtin else []}


# -- WebSocket ------------------------------------------------------------------


async def _ws_fail(websocket: WebSocket, code: str, detail: str, close_code: int) -> None:
    """The error message, then the close; given up after ``WS_FAIL_TIMEOUT_S``, since a client
    that stopped reading would never take them."""
    try:
        async with asyncio.timeout(WS_FAIL_TIMEOUT_S):
            await websocket.send_json({"type": "error", "code": code, "detail": detail})
            await websocket.close(close_code)
    except (TimeoutError, WebSocketDisconnect, OSError):
        pass


async def _ws_request(websocket: WebSocket, timeout_s: float) -> Optional[dict]:
    """The first message as a JSON object (a text frame, or UTF-8 in a binary one); ``None``
    when nothing came in time; ``WebSocketDisconnect`` when the client left."""
    try:
        async with asyncio.timeout(timeout_s):
            message = await websocket.receive()
    except TimeoutError:
        return None
    if message["type"] != "websocket.receive":
        raise WebSocketDisconnect()
    raw = message.get("text")
    return parse_json_object(raw if raw is not None else message.get("bytes") or b"")


@router.websocket("/tts/stream")
async def ws_stream(websocket: WebSocket):
    """One JSON generate request in (``api_key`` may ride in it), binary audio chunks out,
    then one JSON ``result`` message (or one ``error`` message).

    Every send has the request's deadline: a client that stops reading does not keep its
    slot past ``REQUEST_TIMEOUT_S``."""
    core: State = websocket.app.state.core
    rid = websocket.scope.get("state", {}).get("request_id", "-")
    await websocket.accept()
    # A socket whose headers carry the key may be opened ahead of its request (a voice
    # agent saving the handshake); one that has shown no key yet gets HEADER_TIMEOUT_S
    # to send it, as a request's headers do.
    opened_with_key = check_key(core.settings, key_from_headers(websocket.headers, bearer=False))
    wait, setting = ((core.settings.request_timeout_s, "REQUEST_TIMEOUT_S") if opened_with_key
                     else (min(core.settings.header_timeout_s, core.settings.request_timeout_s),
                           "HEADER_TIMEOUT_S"))
    try:
        message = await _ws_request(websocket, wait)
    except WebSocketDisconnect:
        return
    except InvalidInput:
        return await _ws_fail(websocket, "invalid_input", "send one JSON object", 1008)
    if message is None:
        return await _ws_fail(websocket, "timeout", f"no request arrived within {setting}"
                              + ("" if opened_with_key else " (a socket opened with the key "
                                 "in X-API-Key may wait up to REQUEST_TIMEOUT_S)"), 1008)
    key = message.pop("api_key", None) or key_from_headers(websocket.headers, bearer=False)
    if not check_key(core.settings, key if isinstance(key, str) else None):
        return await _ws_fail(websocket, "unauthorized", "missing or wrong API key", 1008)
    try:
        service = core.require_service()
        generate = parse_generate(message, core.settings.max_text_chars)
        live, first, slot = await start_stream(core, service, generate, rid, "ws_stream")
    except WorkerError as exc:
        return await _ws_fail(websocket, exc.code, exc.message,
                              1011 if STATUS.get(exc.code, 500) >= 500 else 1008)
    except Busy:
        return await _ws_fail(websocket, "busy", "the server is busy; retry shortly", 1013)
    except RequestTimeout:
        return await _ws_fail(websocket, "timeout", "the request took longer than "
                              "REQUEST_TIMEOUT_S", 1011)
    loop = asyncio.get_running_loop()
    deadline = deadline_or_none(live.deadline)
    outcome = "ok"
    failure: Optional[Tuple[str, str, int]] = None
    chunks = 0
    # Reads what the client sends while audio goes out: its close stops the synthesis at
    # once, instead of at the next chunk the server fails to send.
    watcher = asyncio.ensure_future(websocket.receive())
    try:
        data = first
        while data is not None:
            async with asyncio.timeout_at(deadline):
                await websocket.send_bytes(data)
            chunks += 1
            step = asyncio.ensure_future(next_in_time(live))
            while not step.done():
                await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher.done():
                    if watcher.result()["type"] == "websocket.disconnect":
                        step.cancel()
                        raise WebSocketDisconnect()
                    watcher = asyncio.ensure_future(websocket.receive())  # ignored
            data = step.result()
        async with asyncio.timeout_at(deadline):
            await websocket.send_json(live.stream.result(chunks=chunks))
            await websocket.close(1000)
    except (WebSocketDisconnect, asyncio.CancelledError, OSError):
        # A send cut off at the deadline may surface as the connection's failure instead.
        outcome = "timeout" if loop.time() >= live.deadline else "cancelled"
    except TimeoutError:
        outcome = "timeout"
        failure = ("timeout", "the request took longer than REQUEST_TIMEOUT_S", 1011)
    except WorkerError as exc:
        outcome = exc.code
        failure = (exc.code, exc.message, 1011)
    except Exception:
        outcome = "internal_error"
        log.exception("request=%s failed", rid)
        failure = ("internal_error", "the request failed unexpectedly; the server logged the "
                   "details under this request id", 1011)
    finally:
        watcher.cancel()
        # The slot goes first: telling the client may take up to WS_FAIL_TIMEOUT_S.
        live.close(outcome, then=lambda: loop.call_soon_threadsafe(slot.release))
    if failure is not None:
        await _ws_fail(websocket, *failure)

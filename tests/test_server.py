"""HTTP server mode over real HTTP: uvicorn on a loopback port, httpx, OpenAI's client, a WebSocket."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile

from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.tiny_model import synthetic_reference
from tests.http_server import ServedApp, service_loader

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}
TEXT = "Hello there, streaming now."


@pytest.fixture(scope="module")
def served(engine, settings_env, tmp_path_factory):
    voices = tmp_path_factory.mktemp("http-voices")
    app = ServedApp({**settings_env, "VOICES_DIR": str(voices), "API_KEY": KEY},
                    service_loader(engine))
    app.wait_ready()
    yield app
    app.stop()


@pytest.fixture
def client(served):
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=120) as c:
        yield c


def decode_seconds(data: bytes) -> float:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


def job_stream_bytes(served, job_input: dict) -> bytes:
    """The same request as a RunPod job with stream: true: its chunks' audio."""
    service = served.core.service
    runner = JobRunner(service.settings, service.engine, service.voices)
    items = list(runner.run({"id": "same", "input": {**job_input, "stream": True}}))
    assert items[-1]["type"] == "result", items[-1]
    return b"".join(base64.b64decode(i["audio_base64"]) for i in items[:-1])


def wav_bytes(seconds: float, seed: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, synthetic_reference(seconds=seconds, seed=seed), 24000, format="WAV")
    return buffer.getvalue()


# -- generate -------------------------------------------------------------------


@pytest.mark.parametrize("fmt,content_type", [("wav", "audio/wav"), ("mp3", "audio/mpeg"),
                                              ("opus", "audio/ogg"), ("flac", "audio/flac"),
                                              ("pcm_s16le", "audio/L16")])
def test_generate_streams_the_same_bytes_as_a_streamed_job(served, client, fmt, content_type):
    body = {"text": TEXT, "seed": 4, "format": fmt}
    with client.stream("POST", "/tts/generate", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == content_type
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["x-seed"] == "4"
        data = response.read()
    assert data == job_stream_bytes(served, body)
    if fmt == "pcm_s16le":
        assert len(data) % 2 == 0 and len(data) > 24000
    else:
        assert decode_seconds(data) > 1.0


def test_generate_is_deterministic_with_a_seed_and_reports_a_picked_seed(client):
    a = client.post("/tts/generate", json={"text": "Same again.", "seed": 9})
    b = client.post("/tts/generate", json={"text": "Same again.", "seed": 9})
    assert a.status_code == b.status_code == 200 and a.content == b.content
    picked = client.post("/tts/generate", json={"text": "Same again."})
    again = client.post("/tts/generate", json={"text": "Same again.",
                                               "seed": int(picked.headers["x-seed"])})
    assert again.content == picked.content


def test_first_bytes_arrive_before_the_take_is_made(served, client, monkeypatch):
    """The second chunk is held until the client has the first bytes: no buffering of the take."""
    engine = served.core.service.engine
    original = engine.stream
    release = threading.Event()

    def held(request, **kwargs):
        chunks = original(request, **kwargs)
        yield next(chunks)
        assert release.wait(60), "the client never got the first bytes"
        yield from chunks

    monkeypatch.setattr(engine, "stream", held)
    with client.stream("POST", "/tts/generate", json={"text": TEXT, "seed": 1}) as response:
        raw = response.iter_raw()
        first = next(raw)
        assert first[:4] == b"RIFF"
        release.set()
        rest = b"".join(raw)
    assert len(rest) > 0


@pytest.mark.parametrize("body,status,code", [
    ({"text": "hi", "voice_id": "ghost"}, 404, "voice_not_found"),
    ({"text": ""}, 400, "invalid_input"),
    ({"text": "hi", "volume": 3}, 400, "invalid_input"),
    ({"text": "hi", "output": "s3"}, 400, "invalid_input"),
    ({"text": "hi", "format": "ogg"}, 400, "invalid_input"),
    ({"text": "hi", "language": "fr"}, 400, "invalid_input"),
])
def test_generate_errors_map_to_statuses(client, body, status, code):
    response = client.post("/tts/generate", json=body)
    assert response.status_code == status
    assert response.json()["code"] == code


def test_unknown_voice_is_404_with_the_contract_message(client):
    response = client.post("/tts/generate", json={"text": "hi", "voice_id": "ghost.pth"})
    assert response.status_code == 404
    assert response.json()["detail"] == "Voice 'ghost' not found."


def test_a_body_that_is_not_json_is_400(client):
    response = client.post("/tts/generate", content=b"{nope",
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"


def test_deeply_nested_json_is_400_not_a_crash(client):
    """Thousands of nested brackets exhaust json's parser stack (RecursionError)."""
    nested = b'{"text": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/tts/generate", "/v1/audio/speech"):
        response = client.post(path, content=nested, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, path
        assert response.json()["code"] == "invalid_input"


def test_a_null_action_means_generate_as_in_the_job_contract(client):
    response = client.post("/tts/generate", json={"text": "hi", "action": None, "seed": 1})
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    response = client.post("/tts/generate", json={"text": "hi", "action": "list_voices"})
    assert response.status_code == 400 and "only generates" in response.json()["detail"]


def test_a_body_over_the_limit_is_413_before_it_is_read(client):
    big = b'{"text": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    response = client.post("/tts/generate", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"text": "'
        for _ in range(30):
            yield b"a" * 100_000
        yield b'"}'

    response = client.post("/tts/generate", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 413


# -- keys -----------------------------------------------------------------------


def test_keys(served, monkeypatch):
    from chatterbox_worker.server import app as server_app

    compared = []
    real = server_app.hmac.compare_digest
    monkeypatch.setattr(server_app.hmac, "compare_digest",
                        lambda a, b: compared.append(1) or real(a, b))
    with httpx.Client(base_url=served.url, timeout=60) as plain:
        assert plain.get("/voices").status_code == 401
        assert plain.get("/voices", headers={"X-API-Key": "wrong"}).status_code == 401
        assert plain.get("/voices", headers={"X-API-Key": KEY}).status_code == 200
        # Bearer only on the OpenAI routes.
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert plain.get("/voices", headers=bearer).status_code == 401
        assert plain.get("/v1/audio/voices", headers=bearer).status_code == 200
        assert plain.get("/v1/audio/voices").status_code == 401
        assert plain.post("/tts/generate", json={"text": "hi"}).status_code == 401
        # No key on health and ping.
        assert plain.get("/ping").status_code == 200
        assert plain.get("/health").status_code == 200
    # Every key given (wrong, right, as a bearer) went through the constant-time compare.
    assert len(compared) == 3


def test_openai_clients_read_why_a_key_was_refused(served):
    import openai

    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    assert "missing or wrong API key" in str(caught.value)
    assert caught.value.code == "invalid_api_key"


# -- health ---------------------------------------------------------------------


def test_health_reports_the_service_and_the_load(client, engine):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"]["signature"] == engine.model.signature
    assert body["storage"]["voices"] == "ok"
    assert body["running"] == 0 and body["queued"] == 0


def test_ping_and_health_while_loading_then_ready(engine, settings_env, tmp_path):
    gate = threading.Event()
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path)},
                    service_loader(engine, gate), health_port=True)
    try:
        with httpx.Client(base_url=app.url, timeout=30) as c:
            assert c.get("/ping").status_code == 204
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            loading = c.post("/tts/generate", json={"text": "hi"})
            assert loading.status_code == 503 and loading.json()["code"] == "model_unavailable"
            assert "retry-after" in loading.headers and loading.headers["x-request-id"]
            gate.set()
            app.wait_ready()
            assert c.get("/ping").status_code == 200
            assert c.get("/health").json()["status"] == "ok"
            assert c.post("/tts/generate", json={"text": "hi", "seed": 1}).status_code == 200
        with httpx.Client(base_url=app.health_url, timeout=30) as h:  # PORT_HEALTH
            assert h.get("/ping").status_code == 200
            assert h.get("/health").status_code == 200
            assert h.post("/tts/generate", json={"text": "hi"}).status_code == 404
    finally:
        gate.set()
        app.stop()


def test_a_model_that_fails_to_load_is_unavailable(settings_env, tmp_path):
    def broken(settings):
        raise RuntimeError("t3_cfg.safetensors is truncated")

    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path)}, broken)
    try:
        app.wait_ready()
        with httpx.Client(base_url=app.url, timeout=30) as c:
            assert c.get("/ping").status_code == 503
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "unavailable"
            assert "truncated" in health.json()["detail"]
            response = c.post("/tts/generate", json={"text": "hi"})
            assert response.status_code == 503 and response.json()["code"] == "model_unavailable"
    finally:
        app.stop()


# -- voices ---------------------------------------------------------------------


def test_voice_life_cycle_over_multipart(served, client, engine):
    clip = wav_bytes(5, seed=3)
    files = {"file": ("ref.wav", clip, "audio/wav")}
    created = client.post("/voices", data={"voice_id": "narrator.pth"}, files=files)
    assert created.status_code == 201, created.text
    assert created.json()["voice_id"] == "narrator"
    assert created.json()["message"] == "Voice uploaded successfully."
    again = client.post("/voices", data={"voice_id": "narrator"}, files=files)
    assert again.status_code == 409 and again.json()["code"] == "voice_exists"
    assert client.post("/voices", data={"voice_id": "narrator", "overwrite": "true"},
                       files=files).status_code == 201
    assert "narrator" in client.get("/voices").json()["voices"]
    meta = client.get("/voices/narrator.pth").json()
    assert meta["voice_id"] == "narrator" and meta["reference_s"] > 3
    exported = client.get("/voices/narrator", params={"export": "true"})
    assert exported.status_code == 200 and exported.content[:2] == b"PK"
    copy = client.post("/voices", data={"voice_id": "copy"},
                       files={"file": ("narrator.pth", exported.content)})
    assert copy.status_code == 201, copy.text
    # Two clips make one voice.
    two = client.post("/voices", data={"voice_id": "two"},
                      files=[("file", ("a.wav", clip)), ("file", ("b.wav", wav_bytes(4, seed=5)))])
    assert two.status_code == 201, two.text
    mine = client.post("/tts/generate", json={"text": "Hi.", "seed": 2, "voice_id": "copy"})
    same = client.post("/tts/generate", json={"text": "Hi.", "seed": 2, "voice_id": "narrator"})
    builtin = client.post("/tts/generate", json={"text": "Hi.", "seed": 2})
    assert mine.content == same.content != builtin.content
    deleted = client.delete("/voices/copy.pth")
    assert deleted.json() == {"message": "Voice 'copy' deleted successfully."}
    gone = client.get("/voices/copy")
    assert gone.status_code == 404 and gone.json()["detail"] == "Voice 'copy' not found."
    assert client.delete("/voices/copy").status_code == 404
    # The voices are this model's own: a rebuild has nothing to do.
    rebuilt = client.post("/voices/rebuild")
    assert rebuilt.status_code == 200, rebuilt.text
    answer = rebuilt.json()
    assert (answer["model"], answer["rebuilt"], answer["failed"]) == (engine.model.signature, [], [])
    assert {"narrator", "two"} <= set(answer["current"])


@pytest.mark.parametrize("data,files,status,code", [
    ({"voice_id": "bad"}, {"file": ("x.wav", b"not audio at all")}, 422, "invalid_audio"),
    ({"voice_id": "bad"}, {"file": ("x.pth", b"PK\x03\x04broken")}, 422, "invalid_voice_file"),
    ({"voice_id": "bad id"}, {"file": ("x.wav", b"RIFF")}, 400, "invalid_input"),
    ({"voice_id": "bad"}, None, 400, "invalid_input"),
])
def test_voice_upload_errors(client, data, files, status, code):
    response = client.post("/voices", data=data, files=files)
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


def test_malformed_multipart_and_oversized_files_are_400_with_a_code(client):
    eleven = [("file", (f"{i}.wav", b"RIFF")) for i in range(11)]
    response = client.post("/voices", data={"voice_id": "many"}, files=eleven)
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    assert "Too many files" in response.json()["detail"]
    response = client.post("/voices", content=b"--x\r\n",
                           headers={"Content-Type": "multipart/form-data"})  # no boundary
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    # Larger than any reference recording or voice file: refused before it is read.
    huge = b"\0" * (33 * 1024 * 1024)
    response = client.post("/voices", data={"voice_id": "huge"}, files={"file": ("a.wav", huge)})
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    assert "file is 34603008 bytes" in response.json()["detail"]
    assert client.get("/voices/huge").status_code == 404


def test_the_routers_own_errors_carry_a_code(client):
    response = client.get("/no/such/route")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    response = client.put("/tts/generate", json={"text": "hi"})
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"


def test_voice_uploads_read_their_files_one_request_at_a_time(served, client, monkeypatch):
    """Each upload may hold 10 x 25 MiB in memory: concurrent ones wait for each other."""
    service = served.core.service
    original = service.upload_voice_files
    inside, most = [0], [0]
    lock = threading.Lock()

    def counted(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.3)
            return original(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(service, "upload_voice_files", counted)
    wav = wav_bytes(4.0, seed=9)

    def upload(i):
        with httpx.Client(base_url=served.url, headers=AUTH, timeout=120) as c:
            return c.post("/voices", data={"voice_id": f"one-at-a-time-{i}"},
                          files={"file": ("a.wav", wav)}).status_code

    threads = [threading.Thread(target=lambda i=i: results.append(upload(i))) for i in range(3)]
    results = []
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [201, 201, 201] and most[0] == 1


# -- OpenAI ---------------------------------------------------------------------


@pytest.fixture
def openai_client(served):
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_whole_and_streamed(client, openai_client):
    whole = openai_client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT,
                                              response_format="wav", extra_body={"seed": 6})
    ours = client.post("/tts/generate", json={"text": TEXT, "seed": 6})
    assert whole.content == ours.content
    with openai_client.audio.speech.with_streaming_response.create(
            model="tts-1-hd", voice="default", input=TEXT, extra_body={"seed": 6}) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        parts = list(response.iter_bytes())
    mp3 = b"".join(parts)
    assert mp3 == client.post("/tts/generate", json={"text": TEXT, "seed": 6, "format": "mp3"}).content
    assert decode_seconds(mp3) > 1.0


@pytest.mark.parametrize("fmt", ["opus", "aac", "flac", "pcm"])
def test_openai_formats(openai_client, fmt):
    audio = openai_client.audio.speech.create(model="chatterbox", voice="nova", input="Hello.",
                                              response_format=fmt, extra_body={"seed": 1})
    if fmt == "pcm":
        assert len(audio.content) % 2 == 0 and len(audio.content) > 4800
    else:
        assert decode_seconds(audio.content) > 0.5


@pytest.mark.parametrize("kwargs,fragment", [
    ({"speed": 1.5}, "speed"),
    ({"response_format": "m4a"}, "response_format"),
    ({"model": "whisper-1"}, "model"),
])
def test_openai_refusals_are_400(openai_client, kwargs, fragment):
    import openai

    args = {"model": "tts-1", "voice": "alloy", "input": "Hello.", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.audio.speech.create(**args)
    assert fragment in str(caught.value)


@pytest.mark.parametrize("field,value", [("response_format", ["mp3"]),
                                         ("stream_format", {"sse": True})])
def test_openai_fields_of_the_wrong_type_are_400(client, field, value):
    body = {"model": "tts-1", "input": "Hello.", "voice": "alloy", field: value}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"
    assert field in response.json()["error"]["message"]


def test_openai_unknown_voice_is_404(openai_client):
    import openai

    with pytest.raises(openai.NotFoundError):
        openai_client.audio.speech.create(model="tts-1", voice="nobody", input="Hello.")


def test_openai_sse_deltas_are_the_audio(client):
    body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm",
            "stream_format": "sse", "seed": 3}
    with client.stream("POST", "/v1/audio/speech", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["usage"]["output_tokens"] > 0
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
    assert audio == client.post("/tts/generate", json={"text": TEXT, "seed": 3,
                                                       "format": "pcm_s16le"}).content


def test_openai_voices_lists_the_builtin_and_stored(client):
    body = client.get("/v1/audio/voices").json()
    assert body["voices"][0] == "default" and "alloy" in body["builtin_aliases"]


# -- WebSocket ------------------------------------------------------------------


def test_websocket_streams_chunks_then_the_result(served, client):
    from websockets.sync.client import connect

    url = served.url.replace("http://", "ws://") + "/tts/stream"
    with connect(url) as ws:
        ws.send(json.dumps({"text": TEXT, "seed": 5, "format": "mp3", "api_key": KEY}))
        chunks = []
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, str):
                result = json.loads(message)
                break
            chunks.append(message)
    assert result["type"] == "result" and result["seed"] == 5 and result["chunks"] == len(chunks)
    assert b"".join(chunks) == client.post("/tts/generate", json={"text": TEXT, "seed": 5,
                                                                  "format": "mp3"}).content
    with connect(url) as ws:
        ws.send(json.dumps({"text": TEXT}))  # no key
        assert json.loads(ws.recv(timeout=30))["code"] == "unauthorized"
    with connect(url, additional_headers=AUTH) as ws:
        ws.send(json.dumps({"text": "hi", "voice_id": "ghost"}))
        error = json.loads(ws.recv(timeout=30))
        assert error == {"type": "error", "code": "voice_not_found",
                         "detail": "Voice 'ghost' not found."}


def test_websocket_takes_json_in_a_binary_frame_and_refuses_what_is_not_json(served):
    from websockets.sync.client import connect

    url = served.url.replace("http://", "ws://") + "/tts/stream"
    with connect(url, additional_headers=AUTH) as ws:
        ws.send(json.dumps({"text": "hi", "seed": 5}).encode())
        messages = []
        while not isinstance(messages[-1] if messages else None, str):
            messages.append(ws.recv(timeout=120))
        assert json.loads(messages[-1])["type"] == "result" and len(messages) > 1
    for junk in (b"\xff\xfe not json", b"[" * 100_000 + b"]" * 100_000, "[1, 2]"):
        with connect(url, additional_headers=AUTH, max_size=None) as ws:
            ws.send(junk)
            assert json.loads(ws.recv(timeout=30))["code"] == "invalid_input"
            with pytest.raises(Exception):  # then closed, policy violation
                ws.recv(timeout=30)
            assert ws.close_code == 1008


# -- load -----------------------------------------------------------------------


@pytest.fixture
def held_after_first_chunk(engine, monkeypatch):
    """Streams whose text starts with "Held" stop after their first chunk until the event is set."""
    original = engine.stream
    release = threading.Event()

    def held(request, **kwargs):
        chunks = original(request, **kwargs)
        yield next(chunks)
        if request.text.startswith("Held"):
            assert release.wait(60)
        yield from chunks

    monkeypatch.setattr(engine, "stream", held)
    yield release
    release.set()


def test_a_client_that_goes_away_frees_the_engine(served, client, held_after_first_chunk,
                                                  monkeypatch, caplog):
    from chatterbox_worker.server.streaming import LiveStream

    caplog.set_level("INFO", logger="chatterbox_worker.server")
    closed = []
    original_close = LiveStream.close
    monkeypatch.setattr(LiveStream, "close",
                        lambda self, *a, **k: closed.append(a) or original_close(self, *a, **k))
    with client.stream("POST", "/tts/generate", json={"text": "Held narration. " * 10,
                                                      "seed": 1}) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    # Leaving the block closes the connection mid-take; the server notices at once.
    deadline = time.monotonic() + 60
    while not closed:
        assert time.monotonic() < deadline, "the server did not notice the disconnect"
        time.sleep(0.01)
    assert closed[0][0] == "cancelled"
    held_after_first_chunk.set()  # the step in progress ends; the stream is closed after it
    served.wait_idle()
    assert any("outcome=cancelled" in m for m in caplog.messages)
    assert client.post("/tts/generate", json={"text": "Next.", "seed": 1}).status_code == 200


def test_beyond_the_queue_is_429(engine, settings_env, tmp_path, held_after_first_chunk):
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path), "MAX_CONCURRENCY": "1",
                     "MAX_QUEUE": "0"}, service_loader(engine))
    try:
        app.wait_ready()
        with httpx.Client(base_url=app.url, timeout=60) as c:
            with c.stream("POST", "/tts/generate", json={"text": "Held, and long."}) as r:
                raw = r.iter_raw()
                next(raw)  # holds the only slot
                busy = c.post("/tts/generate", json={"text": "hi"})
                assert busy.status_code == 429 and busy.headers["retry-after"]
                assert busy.json()["code"] == "busy"
                held_after_first_chunk.set()
                assert b"".join(raw)
            app.wait_idle()
            assert c.post("/tts/generate", json={"text": "hi", "seed": 1}).status_code == 200
    finally:
        app.stop()


def test_a_request_past_its_deadline_stops(engine, settings_env, tmp_path, monkeypatch):
    """REQUEST_TIMEOUT_S: 504 before the first bytes, an incomplete transfer after them;
    either way the synthesis stops and the slot is freed."""
    original = engine.stream
    hold_first, hold_second = threading.Event(), threading.Event()

    def held(request, **kwargs):
        chunks = original(request, **kwargs)
        if request.text.startswith("Slow start"):
            hold_first.wait(60)
        yield next(chunks)
        if request.text.startswith("Slow middle"):
            hold_second.wait(60)
        yield from chunks

    monkeypatch.setattr(engine, "stream", held)
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path), "REQUEST_TIMEOUT_S": "1"},
                    service_loader(engine))
    try:
        app.wait_ready()
        with httpx.Client(base_url=app.url, timeout=60) as c:
            late = c.post("/tts/generate", json={"text": "Slow start, please."})
            assert late.status_code == 504 and late.json()["code"] == "timeout"
            hold_first.set()
            app.wait_idle()
            with c.stream("POST", "/tts/generate", json={"text": "Slow middle, please."}) as r:
                assert r.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):  # no final chunk
                    r.read()
            hold_second.set()
            app.wait_idle()
    finally:
        hold_first.set()
        hold_second.set()
        app.stop()


def test_metrics_in_prometheus_text_format(served, client):
    assert client.post("/tts/generate", json={"text": "Count me.", "seed": 1}).status_code == 200
    client.post("/tts/generate", json={"text": "hi", "voice_id": "ghost"})
    served.wait_idle()
    with httpx.Client(base_url=served.url, timeout=30) as plain:
        assert plain.get("/metrics").status_code == 401
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['chatterbox_http_requests_total{method="POST",route="/tts/generate",status="200"}'] >= 1
    assert samples['chatterbox_http_requests_total{method="POST",route="/tts/generate",status="404"}'] >= 1
    assert samples['chatterbox_syntheses_total{outcome="ok"}'] >= 1
    assert samples['chatterbox_syntheses_total{outcome="voice_not_found"}'] >= 1
    assert samples["chatterbox_running_requests"] == 0 and samples["chatterbox_queued_requests"] == 0
    assert "chatterbox_batch_size" in samples
    assert samples["chatterbox_time_to_first_audio_seconds_count"] >= 1
    assert samples['chatterbox_real_time_factor_bucket{le="+Inf"}'] == \
        samples["chatterbox_real_time_factor_count"] >= 1


def test_cors_is_off_unless_origins_are_set(served, engine, settings_env, tmp_path):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        assert "access-control-allow-origin" not in c.options("/tts/generate", headers=preflight).headers
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path),
                     "CORS_ORIGINS": "https://app.example"}, service_loader(engine))
    try:
        app.wait_ready()
        with httpx.Client(base_url=app.url, timeout=30) as c:
            answer = c.options("/tts/generate", headers=preflight)
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
            other = c.options("/tts/generate", headers={**preflight, "Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
    finally:
        app.stop()


def test_a_websocket_that_goes_away_frees_the_engine(served, held_after_first_chunk, monkeypatch,
                                                     caplog):
    from websockets.sync.client import connect

    from chatterbox_worker.server.streaming import LiveStream

    caplog.set_level("INFO", logger="chatterbox_worker.server")
    closed = []
    original_close = LiveStream.close
    monkeypatch.setattr(LiveStream, "close",
                        lambda self, *a, **k: closed.append(a) or original_close(self, *a, **k))
    url = served.url.replace("http://", "ws://") + "/tts/stream"
    with connect(url, additional_headers=AUTH) as ws:
        ws.send(json.dumps({"text": "Held narration. " * 10, "seed": 2}))
        assert isinstance(ws.recv(timeout=120), bytes)
    deadline = time.monotonic() + 60
    while not closed:  # noticed while the chunk in progress is still being made
        assert time.monotonic() < deadline, "the server did not notice the close"
        time.sleep(0.01)
    assert closed[0][0] == "cancelled"
    held_after_first_chunk.set()
    served.wait_idle()
    assert any("action=ws_stream" in m and "outcome=cancelled" in m for m in caplog.messages)


@pytest.fixture
def endless_after_first_chunk(engine, monkeypatch):
    """Streams whose text starts with "Endless" go on, after their real first chunk, with
    10 s chunks of noise for far longer than any socket buffers hold (480 kB each as pcm)."""
    original = engine.stream
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 24000 * 10).astype(np.float32)

    def endless(request, **kwargs):
        chunks = original(request, **kwargs)
        yield next(chunks)
        if not request.text.startswith("Endless"):
            yield from chunks
            return
        chunks.close()
        for _ in range(1000):
            yield noise

    monkeypatch.setattr(engine, "stream", endless)


@pytest.fixture
def deadline_app(engine, settings_env, tmp_path):
    """One slot, REQUEST_TIMEOUT_S of 3 s."""
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path), "MAX_CONCURRENCY": "1",
                     "REQUEST_TIMEOUT_S": "3"}, service_loader(engine))
    app.wait_ready()
    yield app
    app.stop()


def test_a_client_that_stops_reading_loses_its_slot_at_the_deadline(
        deadline_app, endless_after_first_chunk, caplog):
    """It reads the status line and then nothing: the server's sends wait on its full socket.
    At REQUEST_TIMEOUT_S the synthesis stops and the slot is free for the next request, while
    that client is still connected."""
    caplog.set_level("INFO", logger="chatterbox_worker.server")
    body = json.dumps({"text": "Endless narration.", "format": "pcm_s16le"}).encode()
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", deadline_app.port))
    try:
        stalled.sendall(b"POST /tts/generate HTTP/1.1\r\nHost: test\r\n"
                        b"Content-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert stalled.recv(64).startswith(b"HTTP/1.1 200 ")
        deadline_app.wait_idle(timeout=60)  # before the fix: held until the client left
        assert any("outcome=timeout" in m for m in caplog.messages)
        with httpx.Client(base_url=deadline_app.url, timeout=60) as c:
            assert c.post("/tts/generate", json={"text": "Next.", "seed": 1}).status_code == 200
    finally:
        stalled.close()


def test_a_websocket_that_stops_reading_loses_its_slot_at_the_deadline(
        deadline_app, endless_after_first_chunk, caplog):
    from websockets.sync.client import connect

    caplog.set_level("INFO", logger="chatterbox_worker.server")
    url = deadline_app.url.replace("http://", "ws://") + "/tts/stream"
    # max_queue=1: the client stops reading its socket once one frame waits unread.
    with connect(url, max_queue=1, max_size=None) as ws:
        ws.send(json.dumps({"text": "Endless narration.", "format": "pcm_s16le"}))
        assert isinstance(ws.recv(timeout=60), bytes)
        deadline_app.wait_idle(timeout=60)
        assert any("action=ws_stream" in m and "outcome=timeout" in m for m in caplog.messages)
        with httpx.Client(base_url=deadline_app.url, timeout=60) as c:
            assert c.post("/tts/generate", json={"text": "Next.", "seed": 1}).status_code == 200


@pytest.mark.parametrize("path,content_type,start", [
    ("/tts/generate", "application/json", b'{"text": "Hel'),
    ("/voices", "multipart/form-data; boundary=x",
     b'--x\r\nContent-Disposition: form-data; name="voice_id"\r\n\r\nnar'),
])
def test_a_body_that_never_finishes_arriving_is_504_at_the_deadline(deadline_app, path,
                                                                    content_type, start):
    """Headers promise 1000 bytes, a few come, then nothing: the answer comes at
    REQUEST_TIMEOUT_S instead of the connection waiting for as long as the client likes."""
    with socket.create_connection(("127.0.0.1", deadline_app.port)) as dripping:
        dripping.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: 1000\r\n\r\n".encode() + start)
        dripping.settimeout(30)
        started = time.monotonic()
        answer = dripping.recv(4096)
    assert answer.startswith(b"HTTP/1.1 504 "), answer[:200]
    assert b'"code":"timeout"' in answer and time.monotonic() - started < 25


@pytest.fixture(scope="module")
def header_app(engine, settings_env, tmp_path_factory):
    """HEADER_TIMEOUT_S of 2 s; REQUEST_TIMEOUT_S of 60 s, far from any step of these tests."""
    app = ServedApp({**settings_env, "VOICES_DIR": str(tmp_path_factory.mktemp("header-voices")),
                     "REQUEST_TIMEOUT_S": "60", "HEADER_TIMEOUT_S": "2", "API_KEY": KEY},
                    service_loader(engine))
    app.wait_ready()
    yield app
    app.stop()


def closed_after(sock: socket.socket, drip: bytes = b"", every_s: float = 0.2,
                 limit_s: float = 20) -> float:
    """Seconds until the server closes ``sock``, sending ``drip`` one byte every ``every_s``."""
    started = time.monotonic()
    sock.settimeout(every_s)
    sent = 0
    while time.monotonic() - started < limit_s:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except socket.timeout:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if sent < len(drip):
            try:
                sock.send(drip[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            sent += 1
    raise AssertionError(f"still open after {limit_s} s")


@pytest.mark.parametrize("drip", [b"", b"GET /ping HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200],
                         ids=["silent", "dripping"])
def test_request_headers_that_do_not_arrive_in_time_close_the_connection(header_app, drip):
    """A client that connects and sends nothing, or drips its headers a byte at a time, is
    dropped at HEADER_TIMEOUT_S (2 s here): before, uvicorn held it for as long as it liked,
    one file descriptor each, until a bare Pod could accept no one."""
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        assert 1.5 < closed_after(sock, drip) < 10


def test_the_header_deadline_applies_to_a_keep_alive_connections_next_request(header_app):
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert 1.5 < closed_after(sock, b"GET /ping HTTP/1.1\r\nHost: te") < 10


def test_the_header_deadline_spares_slow_bodies_and_open_websockets(header_app):
    """Once the headers are in, the deadline is REQUEST_TIMEOUT_S's (60 s here), not the
    header deadline's (2 s): a body that takes 3 s is served, and so is a WebSocket opened
    with the key whose request comes 3 s after it opened."""
    from websockets.sync.client import connect

    body = json.dumps({"text": "Slow body.", "seed": 3, "format": "wav"}).encode()
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        sock.sendall(b"POST /tts/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nX-API-Key: %s\r\nContent-Length: %d\r\n\r\n" % (KEY.encode(), len(body)))
        for i in range(0, len(body), 8):
            time.sleep(3 / (len(body) / 8))
            sock.sendall(body[i:i + 8])
        sock.settimeout(30)
        assert sock.recv(64).startswith(b"HTTP/1.1 200 ")
    with connect(f"ws://127.0.0.1:{header_app.port}/tts/stream", open_timeout=10,
                 additional_headers=AUTH) as ws:
        time.sleep(3)
        ws.send(json.dumps({"text": "Late request.", "seed": 4, "format": "pcm_s16le"}))
        messages = []
        while True:
            message = ws.recv(timeout=60)
            messages.append(message)
            if isinstance(message, str):
                break
    assert json.loads(messages[-1])["type"] == "result" and len(messages) > 1


def test_a_body_still_coming_after_its_answer_gets_the_header_deadline_to_finish(header_app):
    """Answered early (401 here; 404 and 413 alike), a client that keeps sending the body it
    announced is closed HEADER_TIMEOUT_S later: uvicorn waited for the rest for ever, past
    every deadline, since the body's first byte cancels its keep-alive timer. One that
    finishes its body in time keeps its connection."""
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        sock.sendall(b"POST /tts/generate HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")  # no key: answered at once
        assert 1.5 < closed_after(sock, b"a" * 1000, every_s=0.1) < 10
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        sock.sendall(b"POST /tts/generate HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")
        sock.sendall(b"0123456789")  # all in: the answered request is done
        time.sleep(0.3)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
    # The body's tail and a WebSocket upgrade in one send: the socket is the WebSocket's
    # now, and the answered request's deadline must not close it.
    with socket.create_connection(("127.0.0.1", header_app.port)) as sock:
        sock.sendall(b"POST /tts/generate HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(4096).startswith(b"HTTP/1.1 401 ")
        sock.sendall(b"0123456789GET /tts/stream HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\nX-API-Key: %s\r\n\r\n" % KEY.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
        sock.settimeout(3.5)  # past the 2 s deadline; the socket waits for its request
        with pytest.raises(socket.timeout):
            sock.recv(4096)


def test_a_websocket_without_the_key_has_the_header_deadline_to_send_its_request(header_app):
    """Opened without the key (it may come in the message), a socket gets HEADER_TIMEOUT_S
    for its request, not REQUEST_TIMEOUT_S (330 s by default): an unauthenticated client
    cannot park sockets for minutes."""
    from websockets.sync.client import connect

    started = time.monotonic()
    with connect(f"ws://127.0.0.1:{header_app.port}/tts/stream", open_timeout=10) as ws:
        message = json.loads(ws.recv(timeout=20))
    assert message["code"] == "timeout" and "HEADER_TIMEOUT_S" in message["detail"]
    assert 1.8 < time.monotonic() - started < 15

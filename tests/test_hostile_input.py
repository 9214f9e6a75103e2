"""Hostile input, as an attacker would send it to a public endpoint, through the job runner.

Each case is answered with its documented error code, within bounded time and
memory (the worker's peak RSS rises by at most 400 MB), with the voices
directory byte-identical afterwards and the next valid job succeeding.
Payloads are built on the fly: a voice file that would expand to gigabytes, a
tiny WAV claiming a 1 Hz rate, FFmpeg playlists and session descriptions, the
address forms audio_url must refuse. The socket guard of ``tests/net_guard.py``
(installed for the whole session) makes any connection beyond loopback fail
the test before it happens.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import stat
import struct
import threading
import time
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from chatterbox_worker.config import load_settings
from chatterbox_worker.jobs import JobRunner
from chatterbox_worker.voices import voice_file_bytes
from tests.speech import SENTENCES, speech_wav

MAX_RSS_RISE = 400 * 1024 * 1024
MAX_CASE_SECONDS = 60.0


# -- measuring a job ------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """The largest RSS this process reaches inside the block, above where it started.

    Linux keeps the high-water mark (VmHWM) and lets a process reset it
    (``clear_refs`` 5), so the peak is exact, not sampled; where that is not
    allowed a thread samples RSS every 2 ms instead.
    """

    def __enter__(self):
        self.start = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._sampler = None
        except OSError:
            self._peak = self.start
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)

    def __exit__(self, *exc):
        if self._sampler is None:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = self._peak
        self.rise = max(0, self.peak - self.start)
        return False


def snapshot(directory: Path) -> dict:
    """Every entry of the voices directory with its kind and content hash."""
    if not directory.exists():
        return {}
    out = {}
    for entry in sorted(directory.iterdir()):
        info = entry.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_size <= 64 * 1024 * 1024:
            out[entry.name] = hashlib.sha256(entry.read_bytes()).hexdigest()
        else:  # a FIFO must not be opened; a huge sparse file is not worth reading
            out[entry.name] = (stat.filemode(info.st_mode), info.st_size, info.st_mtime_ns)
    return out


@pytest.fixture
def runner(engine, tmp_path):
    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices"), "CHATTERBOX_WARMUP": "0"})
    from chatterbox_worker.voices import VoiceStore

    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant=engine.model.variant)
    return JobRunner(settings, engine, store)


def answer(runner, job_input, job_id="hostile"):
    """The items of one job, with the peak memory rise and the seconds it took."""
    with PeakMemory() as memory:
        started = time.monotonic()
        items = list(runner.run({"id": job_id, "input": job_input}))
        seconds = time.monotonic() - started
    return items, memory.rise, seconds


def assert_worker_still_serves(runner):
    items = list(runner.run({"id": "after", "input": {"text": "Still here.", "seed": 1}}))
    assert len(items) == 1 and items[0]["type"] == "result", items
    assert base64.b64decode(items[0]["audio_base64"])[:4] == b"RIFF"


# Every figure one hostile case reached, for the session's report (-s shows it).
FIGURES = []


def refuse(runner, job_input, code, needle=""):
    """Run one hostile job; check its one error item and every bound; return the message."""
    before = snapshot(runner.voices.directory)
    items, rise, seconds = answer(runner, job_input)
    FIGURES.append((code, needle[:30], rise, seconds))
    assert len(items) == 1 and set(items[0]) == {"error"}, items
    error = items[0]["error"]
    assert error.startswith(f"{code}: "), error
    assert needle in error, error
    assert len(error) < 1000, len(error)
    assert "\x1b" not in error
    assert rise <= MAX_RSS_RISE, f"peak RSS rose by {rise / 2**20:.0f} MiB"
    assert seconds <= MAX_CASE_SECONDS, f"answered after {seconds:.1f} s"
    assert snapshot(runner.voices.directory) == before
    assert_worker_still_serves(runner)
    return error


@pytest.fixture(scope="module", autouse=True)
def report_worst_case():
    """With ``-s``: how many hostile cases ran, and the worst memory and time any reached."""
    yield
    if FIGURES:
        rise = max(FIGURES, key=lambda f: f[2])
        slow = max(FIGURES, key=lambda f: f[3])
        print(f"\nhostile cases: {len(FIGURES)}; worst peak RSS rise {rise[2] / 2**20:.0f} MiB "
              f"({rise[0]} {rise[1]!r}); slowest {slow[3]:.2f} s ({slow[0]} {slow[1]!r})")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- payloads ---------------------------------------------------------------------

def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.asarray(samples, dtype="<i2").tobytes())
    return buffer.getvalue()


def wav_claiming(rate: int = 24000, channels: int = 1, format_tag: int = 1,
                 data_bytes: int = 20_000) -> bytes:
    """A WAV whose header says whatever a test wants, followed by plausible noise."""
    noise = np.random.default_rng(0).integers(-3000, 3000, data_bytes // 2, dtype=np.int16)
    block = 2 * channels
    fmt = struct.pack("<HHIIHH", format_tag, channels, rate, (rate * block) & 0xFFFFFFFF,
                      block & 0xFFFF, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_bytes)
    return b"RIFF" + struct.pack("<I", len(body) + data_bytes) + body + noise.tobytes()


def long_mp3(seconds_wanted: float) -> bytes:
    """A valid MP3 of many minutes: the same 10 s of frames repeated (each copy decodes)."""
    from chatterbox_worker.audio import encode_audio

    tone = (0.3 * np.sin(np.arange(8000 * 10) * 0.05)).astype(np.float32)
    piece = encode_audio(tone, 8000, "mp3", 8000)
    assert piece[:3] == b"ID3"  # drop the tag (its size: four 7-bit bytes): frames only
    size = 0
    for b in piece[6:10]:
        size = size << 7 | b
    frames = piece[10 + size:]
    return frames * int(seconds_wanted / 10 + 1)


SMALL_NUMEL = 123457  # an unusual length, easy to find in the pickle
BOMB_NUMEL = 1_000_000_000  # int16: 2 GB once expanded


def voice_bomb(engine) -> bytes:
    """A voice file of a few MB whose reference-audio entry inflates to 2 GB.

    Made from a real voice file: its pickle is patched so the reference audio
    claims 10^9 samples, and that tensor's storage entry is replaced by 2 GB
    of zeros stored with deflate. torch.load would inflate and allocate all of
    it; the worker must refuse it from the zip directory alone.
    """
    real = voice_file_bytes("bomb", engine.builtin_voice, model=engine.model.signature,
                            variant="original", reference_audio=np.zeros(SMALL_NUMEL, np.float32),
                            reference_sample_rate=24000)
    small = b"J" + struct.pack("<i", SMALL_NUMEL)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(real)) as source, \
            zipfile.ZipFile(out, "w", allowZip64=True) as bomb:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith("data.pkl"):
                assert small in data
                data = data.replace(small, b"J" + struct.pack("<i", BOMB_NUMEL))
            if len(data) == 2 * SMALL_NUMEL:  # the reference audio's storage
                info = zipfile.ZipInfo(entry.filename)
                info.compress_type = zipfile.ZIP_DEFLATED
                with bomb.open(info, "w", force_zip64=True) as sink:
                    block = bytes(1 << 22)
                    for _ in range(2 * BOMB_NUMEL // len(block)):
                        sink.write(block)
                    sink.write(bytes(2 * BOMB_NUMEL % len(block)))
                continue
            bomb.writestr(entry, data, compress_type=zipfile.ZIP_DEFLATED)
    data = out.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as check:
        assert sum(e.file_size for e in check.infolist()) >= 2 * BOMB_NUMEL  # a real bomb
    return data


def rewrite_voice(data: bytes, **changes) -> bytes:
    raw = torch.load(io.BytesIO(data), weights_only=True)
    raw.update(changes)
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def foreign_voice(engine):
    """A valid voice file of this model, for tampering with."""
    return voice_file_bytes("foreign", engine.builtin_voice, model=engine.model.signature,
                            variant="original",
                            reference_audio=np.zeros(24000 * 4, np.float32),
                            reference_sample_rate=24000)


FFCONCAT = b"ffconcat version 1.0\nfile '/etc/hostname'\nfile 'file:/proc/self/environ'\n"
SDP = (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=hostile\nc=IN IP4 127.0.0.1\nt=0 0\n"
       b"m=audio 5004 RTP/AVP 0\na=rtpmap:0 PCMU/8000\n")
HLS = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n#EXT-X-ENDLIST\n"


# -- the cases ----------------------------------------------------------------------

# name -> (payload maker, expected text in the invalid_audio message); made per test, not at import.
UPLOAD_AUDIO_CASES = {
    "sample rate of 1 Hz": (lambda: wav_claiming(rate=1), "sample rate of 1 Hz"),
    "sample rate of 4 GHz": (lambda: wav_claiming(rate=0xFFFFFFF0), ""),
    "2000 channels": (lambda: wav_claiming(channels=2000, data_bytes=64_000), ""),
    "mp3 codec inside wav": (lambda: wav_claiming(format_tag=0x55), ""),
    "ffconcat playlist of local files": (lambda: FFCONCAT, "not a wav, flac, mp3 or ogg"),
    "SDP session (binds UDP)": (lambda: SDP, "not a wav, flac, mp3 or ogg"),
    "HLS playlist": (lambda: HLS, "not a wav, flac, mp3 or ogg"),
    "AAC ADTS": (lambda: b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(4000), "not a wav"),
    "truncated wav": (lambda: wav_bytes(np.zeros(100), 24000)[:30], ""),
    "25 minutes of 8 kHz wav (24 MB)": (lambda: wav_bytes(np.full(8000 * 1500, 1000), 8000),
                                        "longer than 120 s"),
    "40 minutes of mp3 (19 MB)": (lambda: long_mp3(2400), "longer than 120 s"),
}


@pytest.mark.parametrize("name", list(UPLOAD_AUDIO_CASES))
def test_hostile_reference_audio(runner, name):
    make, needle = UPLOAD_AUDIO_CASES[name]
    refuse(runner, {"action": "upload_voice", "voice_id": "victim", "audio_base64": b64(make())},
           "invalid_audio", needle)


def test_decompression_bomb_voice_file_is_refused_unread(runner, engine):
    bomb = voice_bomb(engine)
    assert len(bomb) < 8 * 1024 * 1024
    refuse(runner, {"action": "upload_voice", "voice_id": "victim", "voice_base64": b64(bomb)},
           "invalid_voice_file", "compressed entries")


def test_zero_stride_tensor_cannot_claim_gigabytes(runner, foreign_voice):
    raw = torch.load(io.BytesIO(foreign_voice), weights_only=True)
    conditionals = dict(raw["conditionals"])
    # 100 M mel frames that are all one stored value: a NaN check alone would allocate 8 GB.
    conditionals["prompt_feat"] = torch.zeros(1, 1, 80).expand(1, 100_000_000, 80)
    refuse(runner, {"action": "upload_voice", "voice_id": "victim",
                    "voice_base64": b64(rewrite_voice(foreign_voice, conditionals=conditionals))},
           "invalid_voice_file", "prompt_feat")


@pytest.mark.parametrize("name,changes,needle", [
    ("24 MB of 8 kHz reference audio", {"reference_sample_rate": 8000,
                                        "reference_audio": torch.zeros(12_000_000, dtype=torch.int16)},
     "reference_audio"),
    ("reference rate of 1 Hz", {"reference_sample_rate": 1}, "reference_sample_rate"),
    ("float64 reference", {"reference_audio": torch.zeros(96000, dtype=torch.float64)},
     "reference_audio"),
])
def test_hostile_voice_file_fields(runner, foreign_voice, name, changes, needle):
    refuse(runner, {"action": "upload_voice", "voice_id": "victim", "overwrite": True,
                    "voice_base64": b64(rewrite_voice(foreign_voice, **changes))},
           "invalid_voice_file", needle)


def test_legacy_torch_format_is_refused(runner, foreign_voice):
    raw = torch.load(io.BytesIO(foreign_voice), weights_only=True)
    buffer = io.BytesIO()
    torch.save(raw, buffer, _use_new_zipfile_serialization=False)
    refuse(runner, {"action": "upload_voice", "voice_id": "victim",
                    "voice_base64": b64(buffer.getvalue())}, "invalid_voice_file", "")


URL_CASES = [
    "http://100.64.0.1/a.wav",  # carrier-grade NAT
    "http://100.100.100.200/latest/meta-data",  # a cloud metadata service outside 169.254/16
    "http://169.254.169.254/latest/meta-data",
    "http://[fec0::1]/a.wav",  # deprecated IPv6 site-local
    "http://[2002:7f00:1::1]/a.wav",  # 6to4 wrapping 127.0.0.1
    "http://[::ffff:127.0.0.1]/a.wav",  # IPv4-mapped loopback
    "http://[64:ff9b::a00:1]/a.wav",  # NAT64 wrapping 10.0.0.1
    "http://[fd00:ec2::254]/a.wav",
    "http://0.0.0.0/a.wav",
    "http://example.com:99999/a.wav",  # malformed port
    "http://example.com:abc/a.wav",
    "http://[::1/a.wav",  # unbalanced bracket
    "file:///etc/passwd",
]


@pytest.mark.parametrize("url", URL_CASES)
def test_audio_url_that_must_not_be_reached(runner, url):
    refuse(runner, {"action": "upload_voice", "voice_id": "victim", "audio_url": url},
           "invalid_input", "audio_url")


HYGIENE_CASES = [
    ({"action": "upload_voice", "voice_id": "ok\n", "audio_base64": "AAAA"}, "voice_id"),
    ({"action": "get_voice", "voice_id": "ok\n"}, "voice_id"),
    ({"action": "delete_voice", "voice_id": "ok\n"}, "voice_id"),
    ({"text": "Hello", "voice_id": "ok\n"}, "voice_id"),
    ({"text": "Hello \ud800 there"}, "lone surrogate"),
    ({"text": "Ring the bell\x07 now"}, "control character U+0007"),
    ({"text": "Escape \x1b[31m red"}, "control character U+001B"),
    ({"text": " ?!... -- \u200b "}, "nothing to speak"),
    ({"text": "Hi", "x" * 200_000: 1}, "unknown field"),
    ({"action": "y" * 200_000}, "unknown action"),
    ({"text": "Hi", "language": "z" * 100_000}, "language"),
    ({"text": "a" * 4999}, "INLINE_MAX_BYTES"),  # sized before any synthesis
]


@pytest.mark.parametrize("job_input,needle", HYGIENE_CASES,
                         ids=[f"hygiene-{i}" for i in range(len(HYGIENE_CASES))])
def test_input_hygiene(runner, job_input, needle):
    code = "output_too_large" if needle == "INLINE_MAX_BYTES" else "invalid_input"
    error = refuse(runner, job_input, code, needle)
    assert "200000" not in error and "y" * 200 not in error and "x" * 200 not in error


@pytest.mark.parametrize("text", [
    "こんにちは、世界。", "Привет, мир!", "مرحبا بالعالم", "Hello 👋🏽 world", "🎉🎉🎉",
    "Tabs\tand\nnew lines\r\nare layout.",
])
def test_every_script_and_emoji_is_accepted(runner, text):
    items = list(runner.run({"id": "t", "input": {"text": text, "seed": 2}}))
    assert len(items) == 1 and items[0]["type"] == "result", items


def test_base64_with_line_breaks_is_accepted(runner):
    wrapped = base64.encodebytes(speech_wav(SENTENCES[0])).decode("ascii")  # 76-char lines
    assert "\n" in wrapped
    item = list(runner.run({"id": "u", "input": {"action": "upload_voice", "voice_id": "wrapped",
                                                 "audio_base64": wrapped}}))[0]
    assert item.get("voice_id") == "wrapped", item


def test_foreign_entries_in_the_voices_directory_are_skipped(runner, engine, foreign_voice):
    """Directories, FIFOs, huge or misnamed files, and a voice copied under another name."""
    directory = runner.voices.directory
    directory.mkdir(parents=True)
    (directory / "good.pth").write_bytes(rewrite_voice(foreign_voice, voice_id="good"))
    (directory / "copied.pth").write_bytes(rewrite_voice(foreign_voice, voice_id="good"))
    (directory / "folder.pth").mkdir()
    os.mkfifo(directory / "fifo.pth")
    with open(directory / "huge.pth", "wb") as huge:
        huge.truncate(2 * 1024**3)  # sparse: 2 GB claimed, nothing on disk
    (directory / "bad name.pth").write_bytes(b"x")
    (directory / "ok\n.pth").write_bytes(b"x")

    listed, rise, seconds = answer(runner, {"action": "list_voices"})
    assert [v["voice_id"] for v in listed[0]["voices"]] == ["good"]
    assert rise <= MAX_RSS_RISE and seconds < MAX_CASE_SECONDS
    for voice_id in ("folder", "fifo", "huge"):
        refuse(runner, {"action": "get_voice", "voice_id": voice_id}, "invalid_voice_file",
               voice_id)
        refuse(runner, {"text": "Hello.", "voice_id": voice_id}, "invalid_voice_file", voice_id)
    for job_input in ({"text": "Hello.", "voice_id": "copied"},
                      {"action": "get_voice", "voice_id": "copied"},
                      {"action": "get_voice", "voice_id": "copied", "export": True}):
        refuse(runner, job_input, "invalid_voice_file", "holds voice 'good'")
    health = list(runner.run({"id": "h", "input": {"action": "health"}}))[0]
    # Counted without being read (good, copied, huge); listing reads and skips.
    assert health["voices"] == 3 and health["storage"]["voices"] == "ok"


def test_health_and_upload_agree_on_a_voices_directory_to_create(tmp_path):
    from chatterbox_worker.voices import VoiceStore

    store = VoiceStore(tmp_path / "a" / "b" / "voices", model_signature="x", variant="original")
    assert store.status() == "ok"
    store.save("made", b"data", overwrite=False)
    assert store.exists("made")


def test_rebuild_obeys_the_reference_limits(runner, foreign_voice):
    too_short = rewrite_voice(foreign_voice, model="another-model",
                              reference_audio=torch.full((24000 * 2,), 900, dtype=torch.int16))
    refuse(runner, {"action": "upload_voice", "voice_id": "short", "rebuild": True,
                    "voice_base64": b64(too_short)}, "invalid_voice_file", "too short")
    # Ten minutes of reference (the most a voice file may carry): rebuilt from its first minute.
    rng = np.random.default_rng(1)
    long_audio = torch.from_numpy(rng.integers(-3000, 3000, 24000 * 600).astype(np.int16))
    long_voice = rewrite_voice(foreign_voice, model="another-model", reference_audio=long_audio)
    items, rise, seconds = answer(runner, {"action": "upload_voice", "voice_id": "long",
                                           "rebuild": True, "voice_base64": b64(long_voice)})
    assert items[0].get("voice_id") == "long", items
    assert rise <= MAX_RSS_RISE and seconds <= MAX_CASE_SECONDS


# -- cost bounded before work ---------------------------------------------------------

def test_a_cancelled_one_shot_job_stops_between_decode_steps(engine, tmp_path):
    """RunPod's cancel reaches a one-shot job mid-synthesis: it stops at the next decode step."""
    progress = []
    settings = load_settings({"VOICES_DIR": str(tmp_path / "voices")})
    from chatterbox_worker.voices import VoiceStore

    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant="original")
    runner = JobRunner(settings, engine, store, progress=lambda job, p: progress.append(p))
    text = " ".join(SENTENCES * 6)  # several pieces; each takes seconds on this model

    async def cancel_mid_synthesis():
        items = runner.run_async({"id": "c", "input": {"text": text, "format": "mp3", "seed": 3}})
        steps = engine.scheduler.steps
        first = asyncio.ensure_future(items.__anext__())
        while engine.scheduler.steps < steps + 3:  # decoding has begun
            await asyncio.sleep(0.005)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await items.aclose()

    asyncio.run(cancel_mid_synthesis())
    # The model is free for the next job: the request left the decoder (its
    # close is taken between steps) and no vocoding holds the model.
    deadline = time.monotonic() + 5
    while engine.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.active == 0 and not engine._lock.locked()
    # Without a stop between decode steps the job would run to its last piece.
    assert not progress or progress[-1]["pieces_done"] < progress[-1]["pieces_total"]
    assert_worker_still_serves(runner)


# -- fuzzing ------------------------------------------------------------------------

def test_fuzzed_job_inputs_yield_valid_items_or_exactly_one_error(engine, tmp_path):
    """Any JSON a client can send: the runner never raises and ends with a result or one error."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from chatterbox_worker.voices import VoiceStore

    store = VoiceStore(tmp_path / "voices", model_signature=engine.model.signature,
                       variant="original")
    runner = JobRunner(load_settings({"VOICES_DIR": str(tmp_path / "voices")}), engine, store)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                        st.text(max_size=30), st.sampled_from(["wav", "mp3", "opus", "s3", "en",
                                                               "AAAA", "ok\n", "..", "../x"]))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8),
                                                                           inner, max_size=3)),
                          max_leaves=6)
    fields = st.sampled_from(["action", "text", "voice_id", "format", "sample_rate", "stream",
                              "output", "seed", "exaggeration", "cfg_weight", "temperature",
                              "top_p", "min_p", "repetition_penalty", "language", "audio_base64",
                              "audio_url", "voice_base64", "overwrite", "rebuild", "export"])
    actions = st.sampled_from(["generate", "upload_voice", "get_voice", "list_voices",
                               "delete_voice", "health", "GENERATE", ""])
    job_inputs = st.one_of(
        values,
        st.dictionaries(st.one_of(fields, st.text(max_size=10)), values, max_size=6),
        st.fixed_dictionaries({"action": actions}, optional={
            "text": st.text(st.characters(blacklist_categories=()), max_size=24),
            "voice_id": st.text(max_size=10),
            "format": st.sampled_from(["wav", "pcm_s16le", "flac", "mp3", "opus", "ogg"]),
            "sample_rate": st.integers(0, 200_000), "stream": st.booleans(),
            "seed": st.integers(-5, 2**64), "audio_url": st.text(max_size=30),
            "audio_base64": st.text(max_size=40), "voice_base64": st.text(max_size=40),
            "temperature": st.floats()}),
        # Plausible requests too, so the paths that make audio are fuzzed as well.
        st.fixed_dictionaries({"text": st.text(st.characters(blacklist_categories=()),
                                               min_size=1, max_size=16)}, optional={
            "format": st.sampled_from(["wav", "pcm_s16le", "flac", "mp3", "opus"]),
            "stream": st.booleans(), "seed": st.integers(0, 1000),
            "exaggeration": st.floats(0.0, 2.5), "cfg_weight": st.floats(-0.5, 1.5)}),
    )
    outcomes = {}

    # derandomize: the same examples every run, so a failure reproduces and the
    # suite is never flaky; FUZZ_EXAMPLES raises the budget for a longer hunt.
    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
              database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(job_input=job_inputs)
    def check(job_input):
        items = list(runner.run({"id": "fuzz", "input": job_input}))
        assert items, "a job yields at least one item"
        *chunks, last = items
        if "error" in last:
            assert set(last) == {"error"} and not chunks, items
            code = last["error"].split(":", 1)[0]
            assert code in {"invalid_input", "voice_not_found", "invalid_audio",
                            "invalid_voice_file", "output_too_large", "storage_unavailable"}, last
            outcomes[code] = outcomes.get(code, 0) + 1
        else:
            outcomes["ok"] = outcomes.get("ok", 0) + 1
            assert all(c["type"] == "chunk" for c in chunks), items
            assert last.get("type") == "result" or "voices" in last or "voice_id" in last \
                or "status" in last or "deleted" in last, last

    check()
    print(f"\nfuzzed job inputs by outcome: {outcomes}")
    assert outcomes.get("ok") and outcomes.get("invalid_input")  # both sides were reached


# -- soak -----------------------------------------------------------------------------

def test_memory_stays_flat_over_hundreds_of_mixed_jobs(runner):
    """Refusals of every kind interleaved with real synthesis: nothing accumulates per job."""
    rotation = [
        {"action": "upload_voice", "voice_id": "v", "audio_base64": b64(wav_claiming(rate=1))},
        {"action": "upload_voice", "voice_id": "v", "audio_base64": b64(FFCONCAT)},
        {"action": "upload_voice", "voice_id": "v", "audio_url": "http://100.64.0.1/a.wav"},
        {"text": "Bell\x07"},
        {"action": "get_voice", "voice_id": "missing"},
        {"text": "Soak test.", "seed": 4, "format": "mp3"},
    ]
    rss = []
    for n in range(300):
        items = list(runner.run({"id": f"soak-{n}", "input": rotation[n % len(rotation)]}))
        assert len(items) == 1
        if n % len(rotation) == len(rotation) - 1:
            assert items[0]["type"] == "result", items
            rss.append(_status_kib("VmRSS") * 1024)
    warm = rss[len(rss) // 5]  # after the first fifth: caches and allocator pools are filled
    print(f"\nsoak: 300 jobs, RSS after warm-up {warm / 2**20:.0f} MiB, "
          f"at most {max(rss[len(rss) // 5:]) / 2**20:.0f} MiB, at the end {rss[-1] / 2**20:.0f} MiB")
    assert max(rss[len(rss) // 5:]) - warm < 100 * 1024 * 1024, [r // 2**20 for r in rss]

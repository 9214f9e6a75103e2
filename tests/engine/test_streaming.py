"""Streamed synthesis: same speech as one-shot, inaudible seams, early first audio, cancellation."""

import itertools

import librosa
import numpy as np
import pytest

from chatterbox_worker.engine import StreamSchedule, SynthesisRequest
from chatterbox_worker.engine.synthesis import Engine

TEXT = "Hello there, this is a streaming test of the chunked vocoder."
LONG = " ".join(f"This is sentence {i} of a longer narration, with a clause." for i in range(6))

# Closeness of streamed to one-shot audio on the tiny random checkpoint with
# the default schedule (measured: waveform SNR ~13 dB, log-mel distance ~1.2 dB).
# These guard against regressions; bench/RESULTS.md reports the figures.
MIN_SNR_DB = 9.0
MAX_LOG_MEL_DB = 2.5


@pytest.fixture(scope="module")
def plain(engine):
    return Engine(engine.model, watermark=False)


class TokenTap:
    """Records every token an engine decodes, per call of ``speech_tokens``."""

    def __init__(self, engine, monkeypatch):
        self.calls = []
        original = engine.speech_tokens

        def tapped(*args, **kwargs):
            tokens = []
            self.calls.append(tokens)
            for token in original(*args, **kwargs):
                tokens.append(token)
                yield token

        monkeypatch.setattr(engine, "speech_tokens", tapped)


def request(engine, text=TEXT, seed=3):
    return SynthesisRequest(text=text, voice=engine.builtin_voice, seed=seed)


def log_mel_distance(a, b, sr=24000):
    def mel(x):
        m = librosa.feature.melspectrogram(y=x, sr=sr, n_fft=1024, hop_length=256, n_mels=80)
        return 10 * np.log10(np.maximum(m, 1e-5))
    return float(np.mean(np.abs(mel(a) - mel(b))))


def snr_db(reference, other):
    return float(10 * np.log10(np.sum(reference ** 2) / np.sum((reference - other) ** 2)))


@pytest.mark.parametrize("text", [TEXT, LONG], ids=["one-piece", "several-pieces"])
def test_streamed_take_has_the_same_tokens_and_length_as_one_shot(plain, monkeypatch, text):
    tap = TokenTap(plain, monkeypatch)
    one_shot = plain.synthesize(request(plain, text)).audio
    one_shot_tokens = list(tap.calls)
    tap.calls.clear()
    chunks = list(plain.stream(request(plain, text)))
    assert tap.calls == one_shot_tokens
    streamed = np.concatenate(chunks)
    assert len(streamed) == len(one_shot)
    assert len(chunks) > 3


def test_streamed_audio_is_close_to_one_shot(plain):
    one_shot = plain.synthesize(request(plain)).audio
    streamed = np.concatenate(list(plain.stream(request(plain))))
    assert snr_db(one_shot, streamed) > MIN_SNR_DB
    assert log_mel_distance(one_shot, streamed) < MAX_LOG_MEL_DB


def test_seams_are_no_worse_than_the_audio_inside_chunks(plain):
    chunks = [c for c in plain.stream(request(plain, seed=5)) if len(c) > 1]
    take = np.concatenate(chunks)
    seams = np.cumsum([len(c) for c in chunks])[:-1]
    inner = max(np.abs(np.diff(c)).max() for c in chunks)
    assert max(abs(take[s] - take[s - 1]) for s in seams) <= inner


def test_first_chunk_is_small_and_later_ones_grow(plain):
    schedule = StreamSchedule(chunk_tokens=(4, 12, 40))
    sizes = [len(c) for c in plain.stream(request(plain), schedule=schedule)]
    # first chunk: 4 tokens of 960 samples, less the crossfade held back
    assert sizes[0] == 4 * 960 - schedule.crossfade_samples
    assert sizes[1] == 12 * 960 and sizes[2] == 40 * 960


def test_stream_is_deterministic(plain):
    a = list(plain.stream(request(plain, seed=9)))
    b = list(plain.stream(request(plain, seed=9)))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_closing_the_stream_stops_decoding_within_one_chunk(plain, monkeypatch):
    tap = TokenTap(plain, monkeypatch)
    schedule = StreamSchedule(chunk_tokens=(8, 16))
    stream = plain.stream(request(plain, text=LONG), schedule=schedule)
    next(stream)
    stream.close()
    decoded = sum(len(c) for c in tap.calls)
    # 8 tokens of the first chunk + the look-ahead (+ special ids skipped)
    assert decoded <= 8 + 3 + 4
    # the engine is free again at once
    assert plain.synthesize(request(plain, text="Next job.")).audio.size > 0


def test_chunks_carry_the_watermark(engine, plain):
    marked = list(itertools.islice(engine.stream(request(engine)), 2))
    unmarked = list(itertools.islice(plain.stream(request(plain)), 2))
    assert [len(c) for c in marked] == [len(c) for c in unmarked]
    assert not np.array_equal(marked[1], unmarked[1])

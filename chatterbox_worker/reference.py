"""Reference audio in: decode any common file, clean it, check it, pick the best clip.

Cleaning is what a careful person does before cloning a voice: mix to mono,
resample to 24 kHz, trim leading and trailing silence, and bring the loudness
to a common level (so a quiet phone recording and a hot studio take condition
the model alike) without clipping.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .errors import InvalidAudio, excerpt, reason

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


# What a reference clip may be, checked before FFmpeg decodes anything.
# FFmpeg knows hundreds of containers, some of which read other files or open
# sockets (ffconcat playlists, SDP descriptions, HLS): only these four are
# opened, each with its own demuxer named explicitly (never probed), and only
# with the codecs they normally carry.
CONTAINERS = {
    "wav": ("wav", {"pcm_s16le", "pcm_s24le", "pcm_s32le", "pcm_f32le", "pcm_f64le", "pcm_u8",
                    "pcm_alaw", "pcm_mulaw"}),
    "flac": ("flac", {"flac"}),
    "mp3": ("mp3", {"mp3", "mp3float"}),
    "ogg": ("ogg", {"vorbis", "opus", "flac"}),
}
# Rates a real recording has; a header claiming 1 Hz would otherwise be
# resampled into hours of audio before any length check.
MIN_SOURCE_RATE = 8000
MAX_SOURCE_RATE = 192000
MAX_CHANNELS = 8
# Decoding stops past this much audio (before trimming silence), so memory is
# bounded by it, not by what a header claims: twice the longest clip allowed.
MAX_DECODED_SECONDS = 2 * MAX_SECONDS


def sniff_container(data: bytes) -> Optional[str]:
    """The container ``data`` starts like (``CONTAINERS`` key), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3":  # an ID3v2 tag (size: four 7-bit bytes) before MPEG audio frames
        return "mp3" if len(data) >= 10 else None
    # An MPEG audio frame header: 11 sync bits, then a layer that is not 0
    # (layer bits 00 mark AAC's ADTS, which is not on the list).
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 0x06:
        return "mp3"
    return None


def decode(data: bytes, *, label: str = "audio", max_seconds: float = MAX_DECODED_SECONDS,
           max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Mono float32 at 24 kHz from a wav/flac/mp3/ogg file's bytes (FFmpeg via PyAV).

    ``InvalidAudio`` for anything else, for implausible headers, and as soon
    as the decoded audio passes ``max_seconds``.
    """
    import av

    if len(data) > max_bytes:
        raise InvalidAudio(f"{label} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise InvalidAudio(f"{label} is empty")
    container_name = sniff_container(data)
    if container_name is None:
        raise InvalidAudio(f"{label} is not a wav, flac, mp3 or ogg file")
    demuxer, codecs = CONTAINERS[container_name]
    limit = int(max_seconds * SAMPLE_RATE)
    parts: List[np.ndarray] = []
    decoded = 0
    try:
        with av.open(io.BytesIO(data), format=demuxer) as container:
            if not container.streams.audio:
                raise InvalidAudio(f"{label} has no audio stream")
            stream = container.streams.audio[0]
            _check_stream(stream.codec_context, codecs, container_name, label)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                # A stream may change its parameters mid-way (chained Ogg, MP3).
                _check_rate(frame.sample_rate, label)
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    decoded += parts[-1].size
                if decoded > limit:
                    raise InvalidAudio(
                        f"{label} is longer than {max_seconds:.0f} s; at most {MAX_SECONDS:.0f} s "
                        f"of speech per clip (use scripts/clone_voice.py for longer recordings)")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except InvalidAudio:
        raise
    except Exception as exc:  # FFmpeg's many ways to say "not audio"
        raise InvalidAudio(f"{label} cannot be decoded as {container_name} ({reason(exc)})") from None
    audio = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, dtype=np.float32)
    if not np.isfinite(audio).all():
        raise InvalidAudio(f"{label} decodes to invalid samples")
    return audio


def _check_rate(rate: Optional[int], label: str) -> None:
    if not rate or not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise InvalidAudio(f"{label} declares a sample rate of {rate} Hz; only "
                           f"{MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz is accepted")


def _check_stream(codec_context, codecs, container_name: str, label: str) -> None:
    """Refuse an unexpected codec or an implausible header before decoding a sample."""
    if codec_context is None:  # a header naming no codec FFmpeg has (a WAV of 0 or 33 bits)
        raise InvalidAudio(f"{label} is {container_name} with a codec no decoder knows; "
                           f"accepted: {', '.join(sorted(codecs))}")
    if codec_context.name not in codecs:
        raise InvalidAudio(f"{label} is {container_name} with codec '{excerpt(codec_context.name, 40)}'; "
                           f"accepted: {', '.join(sorted(codecs))}")
    _check_rate(codec_context.sample_rate, label)
    channels = codec_context.channels
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidAudio(f"{label} declares {channels} channels; at most {MAX_CHANNELS}")


def estimate_snr_db(audio: np.ndarray, frame: int = 480) -> float:
    """Loud frames (speech) against quiet frames (the noise floor), in dB."""
    n = len(audio) // frame
    if n < 10:
        return 0.0
    energy = np.sort((audio[:n * frame].reshape(n, frame) ** 2).mean(axis=1))
    floor = energy[: max(1, n // 10)].mean() + 1e-10
    speech = energy[-max(1, n // 2):].mean() + 1e-10
    return float(10 * np.log10(speech / floor))


def clean(audio: np.ndarray, *, label: str = "audio", max_seconds: float = MAX_SECONDS,
          min_seconds: float = MIN_SECONDS, needed_by: Optional[str] = None) -> ReferenceClip:
    """Trim silence, normalise loudness, check length (``InvalidAudio`` naming the limits).

    ``needed_by``: the served model whose own minimum ``min_seconds`` is (turbo: more than
    5 s, as upstream asserts); the error then names it."""
    import librosa
    import pyloudnorm

    source_seconds = len(audio) / SAMPLE_RATE
    clipped = float(np.mean(np.abs(audio) >= 0.999)) if len(audio) else 0.0
    if len(audio) == 0 or np.abs(audio).max() < 1e-4:
        raise InvalidAudio(f"{label} is silent")
    trimmed, _ = librosa.effects.trim(audio, top_db=TRIM_TOP_DB, frame_length=1024, hop_length=256)
    seconds = len(trimmed) / SAMPLE_RATE
    if seconds < min_seconds or (needed_by and seconds <= min_seconds):
        need = (f"the {needed_by} model needs more than {min_seconds:g} s" if needed_by
                else f"at least {min_seconds:.0f} s is needed")
        raise InvalidAudio(f"{label} has {seconds:.1f} s of sound after trimming silence; "
                           f"{need} (10-30 s of clean speech is best)")
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

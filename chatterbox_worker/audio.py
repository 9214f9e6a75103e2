"""Audio out: incremental encoders for every output format, and resampling.

Each encoder takes float32 mono chunks at its output rate and returns the
bytes that are ready (``encode``), then the rest (``flush``). Concatenating
everything one encoder returns gives one valid file of its format, so the
same encoder serves one-shot results and streamed chunks.

PCM/WAV are written here (a WAV header is 44 bytes; for a stream of unknown
length it declares the largest size, as streaming servers do). FLAC, MP3,
Ogg/Opus and AAC (ADTS) go through FFmpeg's encoders via PyAV, muxed into a sink that
cannot seek, so nothing already returned is ever rewritten.
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from typing import Optional

import numpy as np

CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm_s16le": "audio/L16",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
}
EXTENSIONS = {"wav": "wav", "pcm_s16le": "pcm", "flac": "flac", "mp3": "mp3", "opus": "opus",
              "aac": "aac"}

# Rough encoded bytes per second of mono audio, for refusing jobs that cannot fit.
BITRATES = {"mp3": 64_000, "opus": 32_000, "aac": 64_000}


def bytes_per_second(fmt: str, sample_rate: int) -> float:
    """Upper estimate of encoded bytes per second of audio in ``fmt``."""
    if fmt in BITRATES:
        return BITRATES[fmt] / 8 * 1.1
    if fmt == "flac":  # lossless: noise-like signals barely compress
        return sample_rate * 2 * 0.9
    return sample_rate * 2


def to_int16(samples: np.ndarray) -> np.ndarray:
    samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(samples * 32767.0).astype("<i2")


def wav_header(sample_rate: int, n_samples: Optional[int]) -> bytes:
    """44-byte PCM WAV header; ``n_samples=None`` declares the largest size (live stream)."""
    data = 0xFFFFFFFF - 36 if n_samples is None else n_samples * 2
    return (b"RIFF" + struct.pack("<I", min(0xFFFFFFFF, 36 + data)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data))


class Resampler:
    """Streaming resampler (soxr): chunks in at ``src`` rate, chunks out at ``dst``."""

    def __init__(self, src: int, dst: int):
        self.passthrough = src == dst
        if not self.passthrough:
            import soxr

            self._stream = soxr.ResampleStream(src, dst, 1, dtype="float32", quality="HQ")

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32)
        if self.passthrough:
            return samples
        return self._stream.resample_chunk(samples, last=last)


class _Sink:
    """Write-only, unseekable file for PyAV: collects what the muxer writes."""

    def __init__(self):
        self.buffer = bytearray()

    def write(self, data) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self.buffer)
        self.buffer.clear()
        return out


class Encoder:
    """Base: float32 chunks in, encoded bytes out."""

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self.samples_in = 0

    def encode(self, samples: np.ndarray) -> bytes:
        raise NotImplementedError

    def flush(self) -> bytes:
        return b""


class PcmEncoder(Encoder):
    def encode(self, samples: np.ndarray) -> bytes:
        self.samples_in += len(samples)
        return to_int16(samples).tobytes()


class WavEncoder(PcmEncoder):
    """WAV: the header goes out with the first bytes. When the length is known in
    advance (one-shot results) it is exact; otherwise it declares the maximum."""

    def __init__(self, sample_rate: int, total_samples: Optional[int] = None):
        super().__init__(sample_rate)
        self.total_samples = total_samples
        self._header_sent = False

    def encode(self, samples: np.ndarray) -> bytes:
        head = b""
        if not self._header_sent:
            head = wav_header(self.sample_rate, self.total_samples)
            self._header_sent = True
        return head + super().encode(samples)

    def flush(self) -> bytes:
        return b"" if self._header_sent else wav_header(self.sample_rate, 0 if self.total_samples is None else self.total_samples)


class AvEncoder(Encoder):
    """FLAC, MP3 or Ogg/Opus through PyAV (FFmpeg's encoders and muxers)."""

    # AAC (FFmpeg's own encoder) in ADTS framing, which streams: served on the
    # OpenAI route only, the job contract does not offer it.
    FORMATS = {"flac": ("flac", "flac"), "mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"),
               "aac": ("adts", "aac")}

    def __init__(self, fmt: str, sample_rate: int, *, whole_file: bool = False):
        """``whole_file``: return everything at ``flush`` from a seekable buffer, so the
        muxer can go back and write the totals (FLAC STREAMINFO sample count, MP3
        Xing header) that a live stream cannot carry."""
        import av

        super().__init__(sample_rate)
        container_format, codec = self.FORMATS[fmt]
        self._whole_file = whole_file
        self._sink = io.BytesIO() if whole_file else _Sink()
        # bitexact: no random Ogg serial number or version strings, so the same audio
        # always encodes to the same bytes (a seeded take is byte for byte repeatable).
        self._container = av.open(self._sink, mode="w", format=container_format,
                                  options={"fflags": "+bitexact"})
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        if fmt in BITRATES:
            self._stream.bit_rate = BITRATES[fmt]
        self._sample_format = self._stream.codec_context.format.name
        self._pts = 0
        self._closed = False

    def _frame(self, samples: np.ndarray):
        import av

        samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0).reshape(1, -1)
        base = self._sample_format.rstrip("p")
        if base == "s16":
            data = to_int16(samples)
        elif base == "s32":
            data = np.round(samples.astype(np.float64) * 2147483647.0).astype(np.int32)
        else:
            data = samples
        frame = av.AudioFrame.from_ndarray(data, format=self._sample_format, layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        frame.time_base = Fraction(1, self.sample_rate)
        self._pts += data.shape[1]
        return frame

    def encode(self, samples: np.ndarray) -> bytes:
        samples = np.asarray(samples, dtype=np.float32)
        self.samples_in += len(samples)
        if len(samples):
            for packet in self._stream.encode(self._frame(samples)):
                self._container.mux(packet)
        return b"" if self._whole_file else self._sink.take()

    def flush(self) -> bytes:
        if not self._closed:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._closed = True
        if self._whole_file:
            data, self._sink = self._sink.getvalue(), io.BytesIO()
            return data
        return self._sink.take()


def new_encoder(fmt: str, sample_rate: int, total_samples: Optional[int] = None) -> Encoder:
    """An encoder for a live stream, or, given ``total_samples``, for one whole file."""
    if fmt == "wav":
        return WavEncoder(sample_rate, total_samples)
    if fmt == "pcm_s16le":
        return PcmEncoder(sample_rate)
    if fmt in AvEncoder.FORMATS:
        return AvEncoder(fmt, sample_rate, whole_file=total_samples is not None)
    raise ValueError(f"unknown audio format {fmt!r}")


def encode_audio(samples: np.ndarray, source_rate: int, fmt: str, sample_rate: int) -> bytes:
    """A whole take in one file of ``fmt`` at ``sample_rate``."""
    resampled = Resampler(source_rate, sample_rate).process(samples, last=True)
    encoder = new_encoder(fmt, sample_rate, total_samples=len(resampled))
    return encoder.encode(resampled) + encoder.flush()

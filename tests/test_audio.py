"""Encoders: every format decodes with ordinary decoders to the right rate and length."""

import io

import av
import numpy as np
import pytest
import soundfile

from chatterbox_worker.audio import (CONTENT_TYPES, Resampler, encode_audio, new_encoder,
                                     wav_header)

RATE = 24000


def tone(seconds=1.5, rate=RATE, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(data: bytes):
    """(sample rate, seconds, samples) as FFmpeg decodes the file."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray() for f in container.decode(stream)]
        rate = stream.codec_context.sample_rate
    samples = np.concatenate([f.reshape(-1) for f in frames])
    return rate, len(samples) / rate, samples


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
@pytest.mark.parametrize("rate", [24000, 16000, 48000])
def test_one_shot_files_decode_to_the_right_length(fmt, rate):
    data = encode_audio(tone(), RATE, fmt, rate)
    decoded_rate, seconds, _ = decode(data)
    # Opus always decodes at 48 kHz; MP3 pads a frame of encoder delay.
    assert decoded_rate == (48000 if fmt == "opus" else rate)
    assert seconds == pytest.approx(1.5, abs=0.09 if fmt == "mp3" else 0.01)


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus"])
def test_one_shot_files_are_readable_by_libsndfile(fmt):
    samples, rate = soundfile.read(io.BytesIO(encode_audio(tone(), RATE, fmt, RATE)))
    assert len(samples) / rate == pytest.approx(1.5, abs=0.09)


def test_wav_is_exact_and_readable_by_libsndfile():
    data = encode_audio(tone(), RATE, "wav", RATE)
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE and len(samples) == 1.5 * RATE
    assert np.abs(samples - tone()).max() < 1e-4


def test_pcm_is_raw_little_endian_int16():
    data = encode_audio(tone(), RATE, "pcm_s16le", RATE)
    samples = np.frombuffer(data, dtype="<i2")
    assert len(samples) == 1.5 * RATE
    assert abs(int(samples.max()) - round(0.4 * 32767)) <= 1


@pytest.mark.parametrize("fmt", ["wav", "pcm_s16le", "flac", "mp3", "opus"])
def test_chunks_concatenate_to_one_valid_file(fmt):
    encoder = new_encoder(fmt, RATE)
    audio = tone(2.0)
    parts = [encoder.encode(audio[i:i + 3000]) for i in range(0, len(audio), 3000)]
    parts.append(encoder.flush())
    data = b"".join(parts)
    if fmt == "pcm_s16le":
        assert len(data) == 2 * len(audio)
        return
    _, seconds, _ = decode(data)
    assert seconds == pytest.approx(2.0, abs=0.09 if fmt == "mp3" else 0.01)
    assert sum(1 for p in parts if p) > 1  # bytes come out as chunks go in


def test_streaming_wav_header_declares_unknown_length():
    import struct

    header = wav_header(RATE, None)
    assert len(header) == 44 and header[:4] == b"RIFF" and header[8:12] == b"WAVE"
    riff_size, = struct.unpack("<I", header[4:8])
    data_size, = struct.unpack("<I", header[40:44])
    assert riff_size == 0xFFFFFFFF and data_size == 0xFFFFFFFF - 36


def test_resampler_streams_to_the_same_length_as_one_shot():
    audio = tone(1.0)
    one = Resampler(RATE, 16000).process(audio, last=True)
    stream = Resampler(RATE, 16000)
    parts = [stream.process(audio[i:i + 2400]) for i in range(0, len(audio), 2400)]
    parts.append(stream.process(np.zeros(0, dtype=np.float32), last=True))
    assert len(np.concatenate(parts)) == len(one) == 16000


def test_every_format_has_a_content_type():
    # The job contract's formats, and AAC for the server's OpenAI route.
    assert set(CONTENT_TYPES) == {"wav", "pcm_s16le", "flac", "mp3", "opus", "aac"}


def test_aac_streams_and_decodes():
    samples = (np.random.RandomState(1).randn(48000) * 0.1).astype(np.float32)
    encoder = new_encoder("aac", 24000)
    parts = [encoder.encode(samples[i:i + 4000]) for i in range(0, len(samples), 4000)]
    assert sum(1 for p in parts if p) > 5  # bytes come out as it goes, not only at the end
    data = b"".join(parts) + encoder.flush()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        seconds = sum(f.samples for f in container.decode(stream)) / stream.codec_context.sample_rate
    assert seconds == pytest.approx(2.0, abs=0.1)  # the encoder's priming adds ~43 ms


@pytest.mark.parametrize("fmt", ["opus", "mp3", "flac", "aac"])
def test_the_same_audio_encodes_to_the_same_bytes(fmt):
    """A seeded take must be byte for byte repeatable: no random Ogg serial or version tags."""
    from chatterbox_worker.audio import new_encoder

    samples = (np.random.RandomState(0).randn(24000) * 0.1).astype(np.float32)
    outputs = []
    for _ in range(2):
        encoder = new_encoder(fmt, 24000)
        outputs.append(encoder.encode(samples) + encoder.flush())
    assert outputs[0] == outputs[1]

"""Reference audio: decoding real speech in every container, cleaning, and clear refusals."""

import io

import numpy as np
import pytest
import soundfile

from chatterbox_worker import reference
from chatterbox_worker.audio import encode_audio
from chatterbox_worker.errors import InvalidAudio
from tests.speech import SENTENCES, speech_samples, speech_wav


def loudness(audio):
    import pyloudnorm

    return pyloudnorm.Meter(24000).integrated_loudness(audio.astype(np.float64))


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_every_container_decodes_to_24k_mono(fmt):
    samples, rate = speech_samples(SENTENCES[0])
    data = encode_audio(samples, rate, fmt, 48000 if fmt == "opus" else rate)
    audio = reference.decode(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) / 24000 == pytest.approx(len(samples) / rate, abs=0.08)


def test_stereo_is_mixed_to_mono():
    samples, rate = speech_samples(SENTENCES[1])
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([samples, samples * 0.5], axis=1), rate, format="WAV")
    assert reference.decode(buffer.getvalue()).ndim == 1


@pytest.mark.parametrize("data,needle", [
    (b"definitely not audio" * 100, "is not a wav, flac, mp3 or ogg file"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\xff" * 40, "cannot be decoded as wav"),
    (b"", "is empty"),
])
def test_undecodable_input_is_invalid_audio(data, needle):
    with pytest.raises(InvalidAudio, match=needle):
        reference.decode(data, label="audio_base64")


@pytest.mark.parametrize("bits", [0, 33, 65535])
def test_a_wav_whose_sample_size_no_decoder_knows_is_refused_in_plain_words(bits):
    """FFmpeg opens such a stream without a codec; the message names the accepted codecs,
    not Python's ``'NoneType' object has no attribute 'name'``."""
    import struct

    rate, samples = 24000, np.zeros(24000 * 4, dtype="<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, bits)
    data = (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", len(samples)) + samples)
    with pytest.raises(InvalidAudio) as caught:
        reference.decode(data, label="file")
    assert caught.value.message.startswith("file is wav with a codec no decoder knows; accepted: ")


def test_silence_is_trimmed_and_loudness_normalised():
    samples, rate = speech_samples(SENTENCES[2])
    audio = reference.decode(speech_wav(SENTENCES[2]))
    padded = np.concatenate([np.zeros(48000), audio * 0.05, np.zeros(48000)]).astype(np.float32)
    clip = reference.clean(padded)
    assert clip.seconds < len(audio) / 24000 + 0.2  # the 2 s of silence each side are gone
    assert clip.source_seconds == pytest.approx(len(padded) / 24000)
    assert loudness(clip.audio) == pytest.approx(reference.TARGET_LUFS, abs=1.5)
    assert np.abs(clip.audio).max() <= reference.PEAK_CEILING + 1e-6


@pytest.mark.parametrize("seconds,needle", [(1.5, "at least 3 s"), (65.0, "at most 60 s")])
def test_too_short_or_too_long_names_the_limits(seconds, needle):
    samples, _ = speech_samples(SENTENCES[0])
    audio = reference.decode(speech_wav(SENTENCES[0]))
    reps = int(np.ceil(seconds * 24000 / len(audio)))
    clip = np.tile(audio, reps)[: int(seconds * 24000)]
    with pytest.raises(InvalidAudio, match=needle):
        reference.clean(clip, label="audio_base64")


def test_silent_clip_is_refused():
    with pytest.raises(InvalidAudio, match="silent"):
        reference.clean(np.zeros(24000 * 5, dtype=np.float32))


def test_cleanest_clip_prefers_unclipped_then_quieter_noise():
    audio = reference.decode(speech_wav(SENTENCES[3]))
    rng = np.random.default_rng(0)
    clean = reference.clean(audio)
    noisy = reference.clean(audio + 0.05 * rng.standard_normal(len(audio)).astype(np.float32))
    clipped = reference.clean(np.clip(audio * 20, -1, 1))
    assert clean.snr_db > noisy.snr_db
    assert reference.cleanest([noisy, clipped, clean]) == 2

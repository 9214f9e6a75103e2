"""Determinism, guidance off, long text, isolation between requests, budgets, silence on stdout."""

import numpy as np
import pytest
import torch

from chatterbox_worker.engine import SamplingParams, SynthesisRequest
from chatterbox_worker.engine.synthesis import (PIECE_PAUSE_S, Engine, fade_edges, join_pieces)
from chatterbox_worker.engine.decode import decode_speech_tokens, text_tokens_for
from chatterbox_worker.engine.text import split_text, token_budget
from chatterbox_worker.tiny_model import synthetic_reference

SHORT = "Hello there."


@pytest.fixture(scope="module")
def plain_engine(engine):
    """The session's model without the watermark, to see the raw take."""
    return Engine(engine.model, watermark=False)


@pytest.fixture(scope="module")
def other_voice(engine):
    return engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)])


def say(engine, text=SHORT, seed=1, voice=None, **kw):
    sampling = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__})
    request = SynthesisRequest(text=text, voice=voice or engine.builtin_voice, seed=seed,
                               sampling=sampling, **kw)
    return engine.synthesize(request)


def test_same_seed_same_audio_other_seed_other_audio(engine):
    a, b, c = say(engine, seed=7), say(engine, seed=7), say(engine, seed=8)
    assert a.audio.dtype == np.float32 and a.sample_rate == 24000
    assert np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio[:len(c.audio)], c.audio[:len(a.audio)])


def test_random_model_stops_at_its_token_budget(plain_engine):
    result = say(plain_engine)
    # With this seed the random T3 never samples its stop token: the
    # text-sized budget ends the piece, not upstream's 1000 tokens (40 s).
    assert result.speech_tokens == token_budget(SHORT)
    assert result.speech_tokens < 200
    assert 0 < result.duration_s <= token_budget(SHORT) / 25 + 0.1


def test_cfg_weight_zero_runs_without_guidance(engine):
    guided, unguided = say(engine, cfg_weight=0.5), say(engine, cfg_weight=0.0)
    assert unguided.audio.size > 0 and np.isfinite(unguided.audio).all()
    assert not np.array_equal(guided.audio, unguided.audio)


@pytest.mark.parametrize("base,change", [
    ({}, {"temperature": 1.5}), ({}, {"top_p": 0.5}), ({}, {"min_p": 0.3}),
    ({}, {"exaggeration": 1.5}), ({"temperature": 1.5}, {"cfg_weight": 0.9}),
])
def test_every_sampling_parameter_is_honoured(engine, base, change):
    assert not np.array_equal(say(engine, **base).audio, say(engine, **base, **change).audio)


def test_repetition_penalty_is_honoured(engine):
    # The penalty only acts on tokens already said; a random model rarely
    # repeats within a short piece, so decode long enough for repeats to occur.
    def tokens(penalty):
        t3_cond, _ = engine.builtin_voice.for_request(0.5)
        return list(decode_speech_tokens(
            engine.model, t3_cond, text_tokens_for(engine.model, SHORT),
            SamplingParams(repetition_penalty=penalty), max_new_tokens=400,
            generator=torch.Generator().manual_seed(1)))

    plain, penalised = tokens(1.0), tokens(2.0)
    assert len(set(plain)) < len(plain)  # there were repeats to penalise
    assert plain != penalised


def test_a_job_never_changes_what_the_next_job_hears(engine, other_voice):
    builtin_before = {k: v.clone() for k, v in engine.builtin_voice.tensors().items()}
    before = say(engine, seed=3)
    say(engine, seed=3, voice=other_voice, exaggeration=2.0, cfg_weight=0.0)
    say(engine, text="Something else entirely, spoken fast.", seed=9, temperature=2.0)
    after = say(engine, seed=3)
    assert np.array_equal(before.audio, after.audio)
    for name, tensor in engine.builtin_voice.tensors().items():
        assert torch.equal(tensor, builtin_before[name]), name


def test_other_voice_gives_other_audio(engine, other_voice):
    assert not np.array_equal(say(engine, seed=3).audio, say(engine, seed=3, voice=other_voice).audio)


def test_long_text_is_spoken_as_one_take_of_several_pieces(plain_engine):
    text = " ".join(f"This is sentence {i} of a longer narration, with a clause." for i in range(12))
    pieces = split_text(text)
    assert len(pieces) >= 3
    done = []
    request = SynthesisRequest(text=text, voice=plain_engine.builtin_voice, seed=2)
    result = plain_engine.synthesize(request, progress=lambda i, n: done.append((i, n)))
    assert result.pieces == len(pieces)
    assert done == [(i + 1, len(pieces)) for i in range(len(pieces))]
    assert result.speech_tokens == sum(token_budget(p) for p in pieces)
    # 960 samples per vocoded token (special ids are dropped before S3Gen).
    expected = result.audio_tokens * 960 + (len(pieces) - 1) * int(PIECE_PAUSE_S * 24000)
    assert len(result.audio) == expected


def test_pieces_are_joined_without_clicks():
    rate = 24000
    loud = [np.full(4800, 0.8, dtype=np.float32), np.full(4800, -0.8, dtype=np.float32)]
    joined = join_pieces(loud, rate)
    pause = int(PIECE_PAUSE_S * rate)
    assert len(joined) == 9600 + pause
    # Each piece fades to silence before the pause and fades in after it, so
    # no sample-to-sample jump at a seam is large (constant pieces: the only
    # jumps there are would be the seams').
    assert np.abs(np.diff(joined)).max() < 0.02
    faded = fade_edges(loud[0], 0.01, rate)
    assert faded[0] == 0.0 and faded[-1] == 0.0 and np.isclose(faded[2400], 0.8)


def test_model_path_prints_nothing_to_stdout(engine, capfd):
    capfd.readouterr()
    say(engine, text="Quiet please.")
    assert capfd.readouterr().out == ""


def test_watermark_is_on_by_default_and_changes_the_audio(engine, plain_engine):
    assert engine.watermarker.enabled and not plain_engine.watermarker.enabled
    marked, plain = say(engine, seed=4), say(plain_engine, seed=4)
    assert marked.audio.shape == plain.audio.shape
    assert not np.array_equal(marked.audio, plain.audio)

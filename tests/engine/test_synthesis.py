"""Determinism, guidance off, long text, isolation between requests, budgets, silence on stdout."""

import numpy as np
import pytest
import torch

from chatterbox_worker.engine import SamplingParams, SynthesisRequest
from chatterbox_worker.engine.synthesis import (PIECE_PAUSE_S, Engine, fade_edges, join_pieces)
from chatterbox_worker.engine.decode import decode_speech_tokens, text_tokens_for
from chatterbox_worker.engine.text import split_text, token_budget
from chatterbox_worker.engine.vocoder import speakable, vocode_whole
from chatterbox_worker.tiny_model import synthetic_reference

SHORT = "Hello there."


@pytest.fixture(scope="module")
def plain_engine(engine):
    """The session's model without the watermark, to see the raw take."""
    return Engine(engine.model, watermark=False)


@pytest.fixture(scope="module")
def other_voice(engine):
    return engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)])


@pytest.fixture(scope="module")
def third_voice(engine):
    return engine.voice_from_clips([synthetic_reference(seconds=6, seed=11)])


@pytest.fixture
def tap(engine, plain_engine, monkeypatch):
    """Records the speech tokens of every piece either engine decodes, in order."""
    pieces = []
    for eng in (engine, plain_engine):
        def tapped(*args, _original=eng.speech_tokens, **kwargs):
            tokens = []
            pieces.append(tokens)
            for token in _original(*args, **kwargs):
                tokens.append(token)
                yield token
        monkeypatch.setattr(eng, "speech_tokens", tapped)
    return pieces


def say(engine, text=SHORT, seed=1, voice=None, **kw):
    sampling = SamplingParams(**{k: kw.pop(k) for k in list(kw) if k in SamplingParams.__dataclass_fields__})
    request = SynthesisRequest(text=text, voice=voice or engine.builtin_voice, seed=seed,
                               sampling=sampling, **kw)
    return engine.synthesize(request)


def test_same_seed_same_audio_other_seed_other_audio(engine, tap):
    a, b, c = say(engine, seed=7), say(engine, seed=7), say(engine, seed=8)
    assert a.audio.dtype == np.float32 and a.sample_rate == 24000
    assert np.array_equal(a.audio, b.audio)
    assert not np.array_equal(a.audio[:len(c.audio)], c.audio[:len(a.audio)])
    # The seed decides what is said, not only how the vocoder renders it:
    # T3 samples the same tokens for the same seed and other tokens for another.
    tokens_a, tokens_b, tokens_c = tap
    assert len(tokens_a) > 20
    assert tokens_a == tokens_b
    assert tokens_a != tokens_c


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


def fresh_take(engine, voice, seed):
    """(tokens, audio) of SHORT in ``voice``, made outside the engine from the voice's own
    tensors with new upstream objects: what no earlier job can have touched."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond

    model = engine.model
    t3_cond = T3Cond(speaker_emb=voice.speaker_emb.clone(),
                     cond_prompt_speech_tokens=voice.cond_prompt_speech_tokens.clone(),
                     emotion_adv=0.5 * torch.ones(1, 1, 1))
    gen = {"prompt_token": voice.prompt_token.clone(), "prompt_token_len": voice.prompt_token_len.clone(),
           "prompt_feat": voice.prompt_feat.clone(), "prompt_feat_len": None,
           "embedding": voice.embedding.clone()}
    tokens = list(decode_speech_tokens(model, t3_cond, text_tokens_for(model, SHORT), SamplingParams(),
                                       max_new_tokens=token_budget(SHORT),
                                       generator=torch.Generator().manual_seed(seed)))
    audio = np.clip(vocode_whole(model, speakable(tokens), gen, seed=seed), -1.0, 1.0)
    return tokens, audio


def test_voices_never_leak_between_jobs(plain_engine, other_voice, third_voice, tap):
    """Voice B is spoken from B's own prompt whatever voice (A, the built-in one) ran just
    before it on the same engine, in either order: upstream caches the prompt embedding in
    its conditioning object, so a shared one would speak B with A's prompt."""
    voices = {"A": other_voice, "B": third_voice, "builtin": plain_engine.builtin_voice}
    fresh = {name: fresh_take(plain_engine, voice, seed=3) for name, voice in voices.items()}
    assert fresh["A"][0] != fresh["B"][0] != fresh["builtin"][0]  # the voices do differ
    order = ["A", "B", "builtin", "B", "A"]  # B after A and after builtin; A after B
    tap.clear()
    takes = [say(plain_engine, seed=3, voice=voices[name]).audio for name in order]
    for name, tokens, audio in zip(order, tap, takes):
        assert tokens == fresh[name][0], name
        assert np.array_equal(audio, fresh[name][1]), name


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
    # Perth runs where the model does (upstream: always the CPU, a bottleneck beside a GPU).
    assert engine.watermarker._perth.perth_net.device == torch.device(engine.model.device)
    marked, plain = say(engine, seed=4), say(plain_engine, seed=4)
    assert marked.audio.shape == plain.audio.shape
    assert not np.array_equal(marked.audio, plain.audio)


def test_flow_steps_setting_reaches_both_vocoders(engine, plain_engine, settings_env):
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine

    fewer = load_engine(load_settings({**settings_env, "CHATTERBOX_FLOW_STEPS": "3",
                                       "CHATTERBOX_WATERMARK": "0"}))
    assert fewer.flow_steps == 3 and plain_engine.flow_steps == 10
    request = SynthesisRequest(text=SHORT, voice=engine.builtin_voice, seed=9)
    default = plain_engine.synthesize(request, max_tokens=30).audio
    one_shot = fewer.synthesize(request, max_tokens=30).audio
    streamed = np.concatenate(list(fewer.stream(request, max_tokens=30)))
    assert len(one_shot) == len(default) == len(streamed)  # same tokens, other mels
    assert not np.allclose(one_shot, default, atol=1e-3)
    assert not np.allclose(streamed, np.concatenate(list(plain_engine.stream(request, max_tokens=30))),
                           atol=1e-3)

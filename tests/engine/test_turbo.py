"""Turbo is Chatterbox Turbo: same text tokens, same T3 tokens, same vocoder output as upstream's
``ChatterboxTurboTTS.from_local`` on a tiny random Turbo checkpoint.

Upstream's ``from_local`` builds GPT-2 medium and a full-size S3Gen by name;
for the tiny checkpoint its size tables are pointed at the tiny sizes
(``LLAMA_CONFIGS["GPT2_medium"]`` and the ``S3Gen`` it constructs), and the
rest of its loading code (hyper-parameters, strict loads, dropping GPT-2's
word embedding, ``AutoTokenizer``, ``conds.pt``) runs as released.
"""

import copy

import numpy as np

import pytest
import torch

from chatterbox_worker.engine import turbo
from chatterbox_worker.engine.decode import SamplingParams
from chatterbox_worker.engine.vocoder import NoiseBank, Prompt, flow_mels, speakable, vocode_whole

TEXT = "Hello there [laugh], this is a parity check [clear throat] with tags."
SIL = 4299  # upstream's S3GEN_SIL


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def turbo_params(**changes):
    """Turbo's defaults (``ChatterboxTurboTTS.generate``'s) with ``changes``."""
    defaults = dict(temperature=0.8, top_p=0.95, top_k=1000, min_p=0.0, repetition_penalty=1.2,
                    cfg_weight=0.0)
    defaults.update(changes)
    return SamplingParams(**defaults)


@pytest.fixture(scope="module")
def upstream(turbo_engine, monkeypatch_module):
    """Upstream's ChatterboxTurboTTS, loaded by its own ``from_local`` from the tiny checkpoint."""
    import chatterbox.tts_turbo as tts_turbo
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    from chatterbox_worker.engine.architecture import build_s3gen

    model = turbo_engine.model
    monkeypatch_module.setitem(LLAMA_CONFIGS, "GPT2_medium", LLAMA_CONFIGS[model.t3.hp.llama_config_name])
    monkeypatch_module.setattr(tts_turbo, "S3Gen", lambda meanflow: build_s3gen(model.sizes,
                                                                                 meanflow=meanflow))
    return tts_turbo.ChatterboxTurboTTS.from_local(model.source.directory, "cpu")


def upstream_tokens(tts, seed, params, max_new_tokens):
    """T3's tokens from upstream's ``generate`` (its own defaults where ``params`` has none),
    captured before vocoding; ``max_new_tokens`` lowers its cap (same tokens, fewer)."""
    captured = {}
    inference = tts.t3.inference_turbo

    def capture(**kwargs):
        kwargs["max_gen_len"] = max_new_tokens - 1  # upstream draws one token before its loop
        captured["tokens"] = inference(**kwargs)
        return captured["tokens"]

    tts.t3.inference_turbo = capture
    try:
        torch.manual_seed(seed)
        tts.generate(TEXT, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                     repetition_penalty=params.repetition_penalty)
    finally:
        del tts.t3.inference_turbo
    return captured["tokens"][0].tolist()


def our_tokens(engine, seed, params, n):
    model = engine.model
    t3_cond, _ = engine.builtin_voice.for_request(0.0)
    generator = torch.Generator().manual_seed(seed)
    text = turbo.text_tokens(model.tokenizer, TEXT)
    return list(turbo.decode_turbo_tokens(model, t3_cond, text, params, max_new_tokens=n,
                                          generator=generator))


def test_loads_with_upstreams_hyper_parameters(turbo_engine, upstream):
    ours, theirs = turbo_engine.model.t3, upstream.t3
    for name in ("text_tokens_dict_size", "speech_tokens_dict_size", "input_pos_emb",
                 "speech_cond_prompt_len", "use_perceiver_resampler", "emotion_adv",
                 "start_speech_token", "stop_speech_token"):
        assert getattr(ours.hp, name) == getattr(theirs.hp, name), name
    assert ours.is_gpt and not hasattr(ours.tfmr, "wte")
    assert turbo_engine.model.s3gen.meanflow
    for (k, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert torch.equal(a, b), k


def test_text_tokens_equal_upstream_and_tags_are_one_token(turbo_engine, upstream):
    from chatterbox.tts_turbo import punc_norm

    tokenizer = turbo_engine.model.tokenizer
    ours = turbo.text_tokens(tokenizer, TEXT)
    theirs = upstream.tokenizer(punc_norm(TEXT), return_tensors="pt", padding=True,
                                truncation=True).input_ids
    assert torch.equal(ours, theirs)
    for tag in ("[laugh]", "[clear throat]"):
        assert tokenizer.convert_tokens_to_ids(tag) in ours[0].tolist()
    assert sorted(turbo.EVENT_TAGS) == turbo.known_tags(tokenizer)


@pytest.mark.parametrize("changes", [
    {},  # Turbo's defaults: top-k 1000 and top-p 0.95 cut, penalty 1.2
    {"top_k": 1},  # greedy
    {"top_k": 40, "top_p": 0.7, "temperature": 1.3, "repetition_penalty": 1.7},
    # the penalty alone sees the cut logits; with top-k off and top-p on
    {"top_k": 0, "top_p": 0.5, "repetition_penalty": 2.0},
    {"top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "temperature": 1.0},  # every processor off
], ids=["defaults", "greedy", "all-changed", "top_p-and-penalty", "plain-sampling"])
def test_speech_tokens_equal_upstream(turbo_engine, upstream, changes):
    params = turbo_params(**changes)
    theirs = upstream_tokens(upstream, seed=17, params=params, max_new_tokens=120)
    ours = our_tokens(turbo_engine, seed=17, params=params, n=120)
    assert len(theirs) >= 60
    assert ours == theirs


def test_the_penalty_sees_upstreams_history(turbo_engine, upstream, monkeypatch):
    """What the repetition penalty is given at each step: the start-of-speech token for the
    first draw, then the generated tokens without it. (The draws alone cannot show this: the
    start token is rarely a candidate, and multinomial's draw only changes when it would win.)"""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    histories = []
    penalise = RepetitionPenaltyLogitsProcessor.__call__

    def recording(self, input_ids, scores):
        histories.append(input_ids[0].tolist())
        return penalise(self, input_ids, scores)

    monkeypatch.setattr(RepetitionPenaltyLogitsProcessor, "__call__", recording)
    params = turbo_params()
    upstream_tokens(upstream, seed=19, params=params, max_new_tokens=30)
    theirs, histories[:] = list(histories), []
    our_tokens(turbo_engine, seed=19, params=params, n=30)
    assert histories == theirs and len(theirs) == 30
    assert theirs[0] == [turbo_engine.model.t3.hp.start_speech_token]


def test_processor_order_matters_here(turbo_engine, upstream):
    """The penalty runs after top-p upstream: with it first, the same seed parts within a few
    steps (this is what makes the order test above able to fail)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    params = turbo_params(top_k=0, top_p=0.5, repetition_penalty=2.0)
    theirs = upstream_tokens(upstream, seed=17, params=params, max_new_tokens=120)
    sampler_init = turbo.TurboSampler.__init__

    def penalty_first(self, *args, **kwargs):
        sampler_init(self, *args, **kwargs)
        procs = list(self.processors)
        penalty = [p for p in procs if isinstance(p, RepetitionPenaltyLogitsProcessor)]
        self.processors[:] = penalty + [p for p in procs if p not in penalty]

    turbo.TurboSampler.__init__ = penalty_first
    try:
        ours = our_tokens(turbo_engine, seed=17, params=params, n=120)
    finally:
        turbo.TurboSampler.__init__ = sampler_init
    assert ours != theirs


def test_mean_flow_equals_upstream_for_the_same_noise(turbo_engine, upstream):
    model = turbo_engine.model
    tokens = speakable(our_tokens(turbo_engine, seed=3, params=turbo_params(), n=60)).unsqueeze(0)
    _, gen = turbo_engine.builtin_voice.for_request(0.0)
    prompt_frames = gen["prompt_feat"].shape[1]
    torch.manual_seed(5)
    speech = torch.randn(1, 80, 2 * tokens.shape[1])  # what upstream's flow_inference draws
    prompt = torch.randn(1, 80, prompt_frames)  # the prompt's part of its randn_like(mu)
    ours = flow_mels(model, tokens, Prompt.from_gen(gen), torch.cat([prompt, speech], dim=2), 2)

    randn_like = torch.randn_like
    full = torch.cat([prompt, torch.zeros_like(speech)], dim=2)
    torch.randn_like = lambda t, *a, **k: full.clone() if t.shape == full.shape else randn_like(t, *a, **k)
    try:
        reference, _ = upstream.s3gen.flow.inference(
            token=tokens, token_len=torch.tensor([tokens.shape[1]]), finalize=True, n_timesteps=2,
            noised_mels=speech, meanflow=True, **copy.deepcopy(upstream.conds.gen))
    finally:
        torch.randn_like = randn_like
    assert ours.shape == reference.shape == (1, 80, 2 * tokens.shape[1])
    assert (ours - reference).abs().max() < 1e-5


def test_vocoder_output_equals_upstream(turbo_engine, upstream, monkeypatch):
    """Tokens -> watermark-free audio: our one-shot vocoder, with upstream's three silence tokens
    appended, vs upstream's ``S3Gen.inference(n_cfm_timesteps=2)`` given the same noise."""
    model = turbo_engine.model
    tokens = speakable(our_tokens(turbo_engine, seed=3, params=turbo_params(), n=80))
    tokens = torch.cat([tokens, torch.full((3,), SIL)])
    _, gen = turbo_engine.builtin_voice.for_request(0.0)
    ours = vocode_whole(model, tokens, gen, seed=7, steps=2)

    prompt_frames = gen["prompt_feat"].shape[1]
    noise = NoiseBank(7, prompt_frames).for_span(prompt_frames, 0, 2 * len(tokens))
    randn, randn_like = torch.randn, torch.randn_like
    monkeypatch.setattr(torch, "randn", lambda *s, **k: noise[:, :, prompt_frames:].clone()
                        if tuple(s) == (1, 80, 2 * len(tokens)) else randn(*s, **k))
    monkeypatch.setattr(torch, "randn_like", lambda t, *a, **k: noise.clone()
                        if t.shape == noise.shape else randn_like(t, *a, **k))
    torch.manual_seed(7)  # HiFT's sine source draws from the global generator
    with torch.inference_mode():
        reference, _ = upstream.s3gen.inference(speech_tokens=tokens, n_cfm_timesteps=2,
                                                ref_dict=copy.deepcopy(upstream.conds.gen))
    reference = reference.squeeze(0).numpy()
    assert ours.shape == reference.shape == (len(tokens) * 960,)
    assert abs(ours - reference).max() < 1e-5


def test_batched_tokens_equal_alone(turbo_engine, monkeypatch):
    """Requests decoded side by side, joining at different steps, one cancelled midway, each get
    the tokens they get alone, and (float32 on CPU) bit for bit the same logits, so the equality
    does not rest on draws that landed away from a rounding boundary."""
    from chatterbox_worker.engine.batch_decode import DecodeRequest
    from chatterbox_worker.engine.turbo_batch import TurboBatchDecoder

    model = turbo_engine.model
    # Five requests: CPU BLAS sums four or more rows in another order than one.
    texts = [TEXT, "Good morning! How are you today?", "One, two, three [sigh].",
             "What a wonderful day it is.", "The quick brown fox [gasp] jumps."]
    params = [turbo_params(), turbo_params(top_k=30, temperature=1.2), turbo_params(top_p=0.6),
              turbo_params(repetition_penalty=1.0), turbo_params(top_k=0, temperature=1.0)]
    budgets = [70, 50, 60, 45, 55]
    seen = {}  # generator id -> every logits tensor its sampler drew from
    pick = turbo.TurboSampler.pick

    def recording(self, logits):
        seen.setdefault(id(self.generator), []).append(logits.clone())
        return pick(self, logits)

    monkeypatch.setattr(turbo.TurboSampler, "pick", recording)

    def request(i):
        t3_cond, _ = turbo_engine.builtin_voice.for_request(0.0)
        return DecodeRequest(t3_cond=t3_cond, text_tokens=turbo.text_tokens(model.tokenizer, texts[i]),
                             params=params[i], max_new_tokens=budgets[i],
                             generator=torch.Generator().manual_seed(100 + i))

    alone, alone_logits = [], []
    kept = []  # every generator stays alive, so no other can take its id
    for i in range(len(texts)):
        r = request(i)
        kept.append(r)
        alone.append(list(turbo.decode_turbo_tokens(model, r.t3_cond, r.text_tokens, r.params,
                                                    max_new_tokens=r.max_new_tokens,
                                                    generator=r.generator)))
        alone_logits.append(list(seen[id(r.generator)]))
    decoder = TurboBatchDecoder(model.t3)
    requests = [request(i) for i in range(len(texts))]
    got = {r: [] for r in requests}
    decoder.add(requests[0])
    decoder.add(requests[3])
    for step in range(200):
        if step == 5:
            decoder.add(requests[1])
            decoder.add(requests[4])
        if step == 9:
            decoder.add(requests[2])
        if step == 40:
            decoder.remove(requests[2])
        for event in decoder.step():
            if event.token is not None:
                got[event.request].append(event.token)
        if not len(decoder) and step > 9:
            break
    for i, r in enumerate(requests):
        logits = seen[id(r.generator)]
        if i == 2:  # cancelled at step 40, after joining at step 9
            assert 20 < len(got[r]) < 60 and got[r] == alone[i][:len(got[r])]
        else:
            assert len(got[r]) == budgets[i] and len(logits) == len(alone_logits[i])
        assert got[r] == alone[i][:len(got[r])]
        assert all(torch.equal(a, b) for a, b in zip(logits, alone_logits[i]))


def test_a_request_whose_logits_go_non_finite_fails_alone(turbo_engine):
    """Turbo's T3 overflows from a speaker embedding near 1e20: that request's sampling
    fails, and it alone; the one beside it gets the tokens it gets alone."""
    import dataclasses

    from chatterbox_worker.engine.batch_decode import DecodeRequest
    from chatterbox_worker.engine.turbo_batch import TurboBatchDecoder

    model = turbo_engine.model
    voice = turbo_engine.builtin_voice
    huge = dataclasses.replace(voice, speaker_emb=torch.full_like(voice.speaker_emb, 3e38))

    def request(conditionals, seed):
        t3_cond, _ = conditionals.for_request(0.0)
        return DecodeRequest(t3_cond=t3_cond, text_tokens=turbo.text_tokens(model.tokenizer, TEXT),
                             params=turbo_params(), max_new_tokens=30,
                             generator=torch.Generator().manual_seed(seed))

    plain = request(voice, 7)
    expected = list(turbo.decode_turbo_tokens(model, plain.t3_cond, plain.text_tokens, plain.params,
                                              max_new_tokens=30, generator=plain.generator))
    good, bad = request(voice, 7), request(huge, 8)
    decoder = TurboBatchDecoder(model.t3)
    decoder.add(good)
    decoder.add(bad)
    tokens, errors = [], []
    while len(decoder):
        for event in decoder.step():
            if event.request is bad:
                errors.append(event.error)
            elif event.token is not None:
                tokens.append(event.token)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert tokens == expected


# -- the engine serving turbo ---------------------------------------------------

def turbo_request(engine, text=TEXT, seed=3, voice=None):
    """A request with turbo's defaults, as the service fills them."""
    from chatterbox_worker.engine import SynthesisRequest
    from chatterbox_worker.engine.variants import VARIANTS

    values = VARIANTS["turbo"].sampling({})
    sampling = SamplingParams(**{k: values[k] for k in SamplingParams.__dataclass_fields__})
    return SynthesisRequest(text=text, voice=voice or engine.builtin_voice, seed=seed,
                            exaggeration=0.0, sampling=sampling)


@pytest.fixture(scope="module")
def plain_turbo(turbo_engine):
    """The session's turbo model without the watermark, at turbo's 2 flow steps."""
    from chatterbox_worker.engine.synthesis import Engine

    return Engine(turbo_engine.model, watermark=False, flow_steps=turbo_engine.flow_steps)


@pytest.fixture
def token_tap(plain_turbo, monkeypatch):
    """Records the speech tokens of every piece the engine decodes, and what it vocodes whole."""
    from chatterbox_worker.engine import synthesis

    taps = {"decoded": [], "vocoded": []}
    original, vocode = plain_turbo.speech_tokens, synthesis.whole_work

    def tapped(*args, **kwargs):
        tokens = []
        taps["decoded"].append(tokens)
        for token in original(*args, **kwargs):
            tokens.append(token)
            yield token

    def vocoded(model, tokens, *args, **kwargs):
        taps["vocoded"].append(torch.as_tensor(tokens).tolist())
        return vocode(model, tokens, *args, **kwargs)

    monkeypatch.setattr(plain_turbo, "speech_tokens", tapped)
    monkeypatch.setattr(synthesis, "whole_work", vocoded)
    return taps


def test_the_engine_serves_turbo_with_upstreams_loop_and_vocoder(turbo_engine, plain_turbo, token_tap):
    """Loaded by CHATTERBOX_VARIANT=turbo: 2 flow steps, the batch decoder, and the tokens of
    ``decode_turbo_tokens`` alone; upstream's three silence tokens end the vocoded piece."""
    assert turbo_engine.model.variant == "turbo" and turbo_engine.flow_steps == 2
    assert turbo_engine.decoder_kind == "exact"
    request = turbo_request(plain_turbo, seed=21)
    take = plain_turbo.synthesize(request, max_tokens=90)
    [decoded], [vocoded] = token_tap["decoded"], token_tap["vocoded"]
    generator = torch.Generator().manual_seed(21)
    t3_cond, _ = request.voice.for_request(0.0)
    alone = list(turbo.decode_turbo_tokens(turbo_engine.model, t3_cond,
                                           turbo.text_tokens(turbo_engine.model.tokenizer, TEXT),
                                           request.sampling, max_new_tokens=90, generator=generator))
    assert decoded == alone and len(alone) == 90
    assert vocoded == speakable(alone).tolist() + [SIL] * 3
    assert len(take.audio) == (take.audio_tokens + 3) * 960


def test_streamed_turbo_take_matches_one_shot(plain_turbo, quiet_source):
    """Streamed through the chunked vocoder (mean-flow, the silence tokens vocoded with the last
    chunk): same length as one-shot and, but for chunking, the same audio."""
    from chatterbox_worker.engine import StreamSchedule

    one_shot = plain_turbo.synthesize(turbo_request(plain_turbo), max_tokens=120).audio
    chunks = list(plain_turbo.stream(turbo_request(plain_turbo), max_tokens=120,
                                     schedule=StreamSchedule(chunk_tokens=(8, 16))))
    streamed = np.concatenate(chunks)
    assert len(chunks) > 5 and len(streamed) == len(one_shot)
    # The last 3 tokens (120 ms) are the vocoder's silence tokens, in both.
    snr = 10 * np.log10(np.sum(one_shot ** 2) / np.sum((one_shot - streamed) ** 2))
    assert snr > 25


def test_a_turbo_voice_is_upstreams_prepare_conditionals(turbo_engine, upstream, tmp_path):
    """Loudness normalised to -27 LUFS, T3's prompt from the first 15 s (375 tokens), S3Gen's
    from the first 10 s: equal to what upstream Turbo makes from the same file."""
    import soundfile

    from chatterbox_worker.tiny_model import synthetic_reference

    clip = 0.2 * synthetic_reference(seconds=20, seed=4)  # quiet: normalisation changes it
    path = tmp_path / "ref.wav"
    soundfile.write(path, clip, 24000, subtype="FLOAT")
    ours = turbo_engine.voice_from_clips([clip])
    upstream.prepare_conditionals(str(path))
    theirs = upstream.conds
    assert ours.cond_prompt_speech_tokens.shape == (1, 375)
    assert torch.equal(ours.cond_prompt_speech_tokens, theirs.t3.cond_prompt_speech_tokens)
    assert torch.allclose(ours.speaker_emb, theirs.t3.speaker_emb.float(), atol=1e-5)
    assert torch.equal(ours.prompt_token, theirs.gen["prompt_token"][:, :ours.prompt_token.shape[1]])
    assert ours.prompt_token.shape[1] == 250
    assert torch.allclose(ours.prompt_feat, theirs.gen["prompt_feat"][:, :500], atol=1e-5)
    assert torch.allclose(ours.embedding, theirs.gen["embedding"].reshape(1, -1), atol=1e-5)


def test_a_turbo_reference_must_be_longer_than_5_s(turbo_engine):
    from chatterbox_worker.errors import InvalidAudio
    from chatterbox_worker.tiny_model import synthetic_reference

    with pytest.raises(InvalidAudio, match=r"has 5.0 s .* the turbo model needs more than 5 s"):
        turbo_engine.voice_from_clips([synthetic_reference(seconds=5.0, seed=2)])
    voice = turbo_engine.voice_from_clips([synthetic_reference(seconds=5.2, seed=2)])
    assert voice.cond_prompt_speech_tokens.shape[1] == 130  # all of it: shorter than 15 s


def test_event_tags_pass_and_unknown_tags_are_refused(turbo_engine):
    from chatterbox_worker.errors import InvalidInput

    for text in ("[clear throat] Well [laugh], that was [sigh] something.",
                 "See note [1] and [Note: x] and [A1]."):  # brackets around no plain word: text
        turbo_engine.check_text(text)
    with pytest.raises(InvalidInput, match=r"text: \[laughs\] is not an event tag of the turbo "
                                           r"model; it knows \[chuckle\] \[clear throat\]"):
        turbo_engine.check_text("She [laughs] at that.")


def test_the_service_fills_turbo_defaults_and_refuses_what_turbo_ignores(turbo_engine, tmp_path):
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.errors import InvalidInput
    from chatterbox_worker.schemas import GenerateRequest
    from chatterbox_worker.service import Service
    from chatterbox_worker.voices import VoiceStore

    settings = load_settings({"VOICES_DIR": str(tmp_path), "CHATTERBOX_VARIANT": "turbo"})
    service = Service(settings, turbo_engine, VoiceStore(tmp_path, model_signature="x", variant="turbo"))
    request = service.synthesis_request(GenerateRequest(text="Hi [laugh]", cfg_weight=0, min_p=0,
                                                        exaggeration=0))
    assert request.sampling == SamplingParams(temperature=0.8, cfg_weight=0.0, top_p=0.95, top_k=1000,
                                              min_p=0.0, repetition_penalty=1.2)
    assert service.synthesis_request(GenerateRequest(text="Hi", top_k=5)).sampling.top_k == 5
    for field, value in (("cfg_weight", 0.5), ("exaggeration", 0.7), ("min_p", 0.05)):
        with pytest.raises(InvalidInput, match=f"{field}: the turbo model does not use it"):
            service.synthesis_request(GenerateRequest(text="Hi", **{field: value}))
    with pytest.raises(InvalidInput, match="language: 'de' is not spoken by the turbo model"):
        service.synthesis_request(GenerateRequest(text="Hallo", language="de"))
    with pytest.raises(InvalidInput, match=r"\[whistle\] is not an event tag"):
        service.check_generate(GenerateRequest(text="Hi [whistle]"))


def test_int8_is_refused_for_turbo(turbo_engine):
    from chatterbox_worker.engine.model import load_model
    from chatterbox_worker.errors import ConfigError

    with pytest.raises(ConfigError, match="int8 is not available for the turbo model"):
        load_model(turbo_engine.model.source, variant="turbo", device="cpu", t3_dtype="int8")


def test_turbo_prints_nothing(turbo_engine, capfd):
    """Upstream's turbo path prints (its mean-flow solver, a tqdm bar per decode); ours does not,
    in a one-shot take, a stream, or making a voice (loudness normalisation)."""
    from chatterbox_worker.tiny_model import synthetic_reference

    capfd.readouterr()
    turbo_engine.synthesize(turbo_request(turbo_engine, text="Quiet [sigh] please."), max_tokens=30)
    list(turbo_engine.stream(turbo_request(turbo_engine, text="Quiet please."), max_tokens=30))
    turbo_engine.voice_from_clips([synthetic_reference(seconds=6, seed=8)])
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "it/s" not in captured.err  # no progress bar on stderr either


def test_mean_flow_calls_batch_like_the_original_vocoders(turbo_engine):
    """Equal-shaped chunks of concurrent streams share one flow call (``flow_mels_batch``):
    with the mean-flow vocoder too, each row is its call alone up to rounding."""
    from chatterbox_worker.engine.vocoder import VocoderWork, flow_mels_batch
    from chatterbox_worker.tiny_model import synthetic_reference

    model = turbo_engine.model
    voices = [turbo_engine.builtin_voice,
              turbo_engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)])]
    works = []
    for seed, voice in enumerate(voices):
        _, gen = voice.for_request(0.0)
        prompt = Prompt.from_gen(gen).last(50)
        tokens = torch.randint(0, 6561, (1, 20), generator=torch.Generator().manual_seed(seed))
        bank = NoiseBank(seed, Prompt.from_gen(gen).feat.shape[1])
        works.append(VocoderWork(tokens, prompt, bank.for_span(prompt.feat.shape[1], 0, 40)))
    alone = [flow_mels(model, w.tokens, w.prompt, w.noise, 2) for w in works]
    together = flow_mels_batch(model, works, 2)
    for a, b in zip(alone, together):
        assert a.shape == b.shape == (1, 80, 40)
        assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_a_voice_of_another_model_is_rebuilt_for_turbo_only_from_more_than_5_s(engine, turbo_engine,
                                                                              tmp_path):
    """rebuild: true remakes an original-model voice for turbo from its stored reference audio,
    which must then be longer than turbo's 5 s (the original model took 4 s)."""
    from chatterbox_worker.errors import InvalidVoiceFile
    from chatterbox_worker.tiny_model import synthetic_reference
    from chatterbox_worker.voice_library import VoiceLibrary
    from chatterbox_worker.voices import VoiceStore, parse_voice_file, voice_file_bytes

    library = VoiceLibrary(turbo_engine, VoiceStore(tmp_path, model_signature=turbo_engine.model.signature,
                                                    variant="turbo"))

    def original_voice(seconds):
        clip = synthetic_reference(seconds=seconds, seed=6)
        data = voice_file_bytes("v", engine.voice_from_clips([clip]), model=engine.model.signature,
                                variant="original", reference_audio=clip, reference_sample_rate=24000)
        return parse_voice_file(data)

    with pytest.raises(InvalidVoiceFile, match=r"is 4.0 s long; the turbo model needs more than 5 s"):
        library._import("short", original_voice(4.0), rebuild=True)
    rebuilt = parse_voice_file(library._import("long", original_voice(6.0), rebuild=True))
    assert rebuilt.model == turbo_engine.model.signature and rebuilt.variant == "turbo"
    assert torch.equal(rebuilt.conditionals.cond_prompt_speech_tokens,
                       turbo_engine.voice_from_clips([synthetic_reference(seconds=6.0, seed=6)])
                       .cond_prompt_speech_tokens)

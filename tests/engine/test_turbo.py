"""Turbo is Chatterbox Turbo: same text tokens, same T3 tokens, same vocoder output as upstream's
``ChatterboxTurboTTS.from_local`` on a tiny random Turbo checkpoint.

Upstream's ``from_local`` builds GPT-2 medium and a full-size S3Gen by name;
for the tiny checkpoint its size tables are pointed at the tiny sizes
(``LLAMA_CONFIGS["GPT2_medium"]`` and the ``S3Gen`` it constructs), and the
rest of its loading code (hyper-parameters, strict loads, dropping GPT-2's
word embedding, ``AutoTokenizer``, ``conds.pt``) runs as released.
"""

import copy

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


def test_batched_tokens_equal_alone(turbo_engine):
    """Requests decoded side by side, joining at different steps, one cancelled midway, each get
    exactly the tokens they get alone (float32, CPU)."""
    from chatterbox_worker.engine.batch_decode import DecodeRequest
    from chatterbox_worker.engine.turbo_batch import TurboBatchDecoder

    model = turbo_engine.model
    texts = [TEXT, "Good morning! How are you today?", "One, two, three [sigh]."]
    params = [turbo_params(), turbo_params(top_k=30, temperature=1.2), turbo_params(top_p=0.6)]
    budgets = [70, 50, 60]

    def request(i):
        t3_cond, _ = turbo_engine.builtin_voice.for_request(0.0)
        return DecodeRequest(t3_cond=t3_cond, text_tokens=turbo.text_tokens(model.tokenizer, texts[i]),
                             params=params[i], max_new_tokens=budgets[i],
                             generator=torch.Generator().manual_seed(100 + i))

    alone = []
    for i in range(3):
        r = request(i)
        alone.append(list(turbo.decode_turbo_tokens(model, r.t3_cond, r.text_tokens, r.params,
                                                    max_new_tokens=r.max_new_tokens,
                                                    generator=r.generator)))
    decoder = TurboBatchDecoder(model.t3)
    requests = [request(i) for i in range(3)]
    got = {r: [] for r in requests}
    decoder.add(requests[0])
    for step in range(200):
        if step == 5:
            decoder.add(requests[1])
        if step == 9:
            decoder.add(requests[2])
        if step == 40:
            decoder.remove(requests[2])
        for event in decoder.step():
            if event.token is not None:
                got[event.request].append(event.token)
        if not len(decoder) and step > 9:
            break
    assert got[requests[0]] == alone[0] and len(alone[0]) == 70
    assert got[requests[1]] == alone[1]
    assert got[requests[2]] == alone[2][:len(got[requests[2]])] and 20 < len(got[requests[2]]) < 60

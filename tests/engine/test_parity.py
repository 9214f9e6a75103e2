"""Our inference path is Chatterbox: same tokens and same vocoder output as upstream's ChatterboxTTS."""

import copy

import pytest
import torch

from chatterbox_worker.engine.decode import SamplingParams, decode_speech_tokens, text_tokens_for
from chatterbox_worker.engine.vocoder import NoiseBank, Prompt, flow_mels, speakable, vocode_whole

TEXT = "Hello there, this is a parity check."


def upstream_raw_tokens(model, seed, params: SamplingParams, exaggeration=0.5, max_new_tokens=None):
    """Run upstream's ChatterboxTTS.generate and capture T3's raw output tokens.

    ``max_new_tokens`` lowers upstream's fixed cap of 1000 (same tokens, fewer of them)."""
    from chatterbox.tts import ChatterboxTTS

    tts = ChatterboxTTS(model.t3, model.s3gen, model.voice_encoder, model.tokenizer, model.device,
                        conds=copy.deepcopy(model.builtin_voice))
    captured = {}
    t3_inference = model.t3.inference

    def capture(**kwargs):
        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        captured["tokens"] = t3_inference(**kwargs)
        return captured["tokens"]

    model.t3.inference = capture
    try:
        torch.manual_seed(seed)
        tts.generate(TEXT, exaggeration=exaggeration, cfg_weight=params.cfg_weight,
                     temperature=params.temperature, top_p=params.top_p, min_p=params.min_p,
                     repetition_penalty=params.repetition_penalty)
    finally:
        del model.t3.inference
    return captured["tokens"][0].tolist()


def our_tokens(engine, seed, params, n, exaggeration=0.5):
    model = engine.model
    t3_cond, _ = engine.builtin_voice.for_request(exaggeration)
    generator = torch.Generator().manual_seed(seed)
    return list(decode_speech_tokens(model, t3_cond, text_tokens_for(model, TEXT), params,
                                     max_new_tokens=n, generator=generator))


@pytest.mark.parametrize("params", [
    SamplingParams(min_p=1.0),  # greedy: min_p=1 keeps only the most likely token
    SamplingParams(),  # upstream's defaults, sampled: equal seeds draw equal tokens
], ids=["greedy", "sampled"])
def test_speech_tokens_equal_upstream(engine, params):
    upstream = upstream_raw_tokens(engine.model, seed=11, params=params)
    ours = our_tokens(engine, seed=11, params=params, n=len(upstream))
    stop = engine.model.t3.hp.stop_speech_token
    # Upstream runs to its fixed cap of 1000 or emits the stop token; ours
    # yields the same tokens without the stop token.
    expected = upstream[:-1] if upstream[-1] == stop else upstream
    assert len(ours) >= 100
    assert ours == expected


@pytest.mark.parametrize("params", [
    # top-p and min-p both cut (min-p first, as upstream): in the other order
    # top-p would keep more tokens and the draws would part within a few steps.
    SamplingParams(top_p=0.8, min_p=0.1),
    # every parameter off its default, guidance stronger
    SamplingParams(temperature=1.3, cfg_weight=0.8, top_p=0.6, min_p=0.02, repetition_penalty=1.6),
], ids=["top_p-and-min_p", "all-changed"])
def test_speech_tokens_equal_upstream_for_every_sampling_parameter(engine, params):
    upstream = upstream_raw_tokens(engine.model, seed=13, params=params, max_new_tokens=120)
    ours = our_tokens(engine, seed=13, params=params, n=len(upstream))
    stop = engine.model.t3.hp.stop_speech_token
    expected = upstream[:-1] if upstream[-1] == stop else upstream
    assert len(expected) >= 60
    assert ours == expected


@pytest.mark.parametrize("steps", [10, 4])
def test_flow_equals_upstream_for_the_same_noise(engine, steps):
    """Upstream's flow for the same noise, at its 10 steps and at another count
    (``CHATTERBOX_FLOW_STEPS``), which upstream's ``n_timesteps`` sets."""
    model = engine.model
    tokens = speakable(our_tokens(engine, seed=3, params=SamplingParams(), n=60)).unsqueeze(0)
    _, gen = engine.builtin_voice.for_request(0.5)
    frames = 2 * (gen["prompt_token"].shape[1] + tokens.shape[1])
    torch.manual_seed(5)
    noise = torch.randn(1, 80, frames)  # what upstream's randn_like(mu) draws after this seed
    ours = flow_mels(model, tokens, Prompt.from_gen(gen), noise, steps)

    torch.manual_seed(5)
    reference, _ = model.s3gen.flow.inference(
        token=tokens, token_len=torch.tensor([tokens.shape[1]]), finalize=True,
        n_timesteps=steps, **copy.deepcopy(model.builtin_voice.gen))
    assert ours.shape == reference.shape == (1, 80, 2 * tokens.shape[1])
    assert (ours - reference).abs().max() < 1e-5


def test_vocoder_output_equals_upstream(engine, monkeypatch):
    """Whole chain, tokens -> watermark-free audio: our one-shot vocoder vs upstream's
    S3Gen.inference, with upstream's noise draw replaced by the same noise ours uses."""
    model = engine.model
    tokens = speakable(our_tokens(engine, seed=3, params=SamplingParams(), n=80))
    _, gen = engine.builtin_voice.for_request(0.5)
    ours = vocode_whole(model, tokens, gen, seed=7)

    prompt_frames = gen["prompt_feat"].shape[1]
    noise = NoiseBank(7, prompt_frames).for_span(prompt_frames, 0, 2 * len(tokens))
    randn_like = torch.randn_like
    monkeypatch.setattr(torch, "randn_like", lambda t, *a, **k: noise.clone()
                        if t.shape == noise.shape else randn_like(t, *a, **k))
    torch.manual_seed(7)  # HiFT's sine source draws from the global generator
    with torch.inference_mode():
        reference, _ = model.s3gen.inference(speech_tokens=tokens,
                                             ref_dict=copy.deepcopy(model.builtin_voice.gen))
    reference = reference.squeeze(0).numpy()
    assert ours.shape == reference.shape == (len(tokens) * 960,)
    assert abs(ours - reference).max() < 1e-5

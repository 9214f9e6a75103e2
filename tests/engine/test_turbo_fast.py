"""Turbo's fast decode path (``TurboFastDecoder``), checked on CPU on the tiny Turbo checkpoint.

Its forward against T3's own GPT-2 (HF, growing cache) position by position,
with requests joining and leaving; its sampling chain against the HF
processors ``TurboSampler`` runs; its draws for independence from the batch.
CUDA graphs replay the same ``_step_body`` (``bench/gpu/decoder_graphs.py``, part of
``bench/gpu/run.sh``, compares them with eager on a GPU).
"""

from typing import List

import pytest
import torch
from transformers import DynamicCache

from chatterbox_worker.engine import turbo
from chatterbox_worker.engine.batch_decode import DecodeRequest
from chatterbox_worker.engine.synthesis import Engine
from chatterbox_worker.engine.turbo_fast import (TurboFastDecoder, turbo_sampling_probs,
                                                 turbo_slot_params)
from tests.engine.test_fast_decode import Recording, run
from tests.engine.test_turbo import TEXT, turbo_params, turbo_request


def make_request(engine, text=TEXT, params=None, seed=1, budget=40):
    t3_cond, _ = engine.builtin_voice.for_request(0.0)
    return DecodeRequest(t3_cond=t3_cond, text_tokens=turbo.text_tokens(engine.model.tokenizer, text),
                         params=params or turbo_params(), max_new_tokens=budget,
                         generator=torch.Generator().manual_seed(seed))


def reference_logits(model, request: DecodeRequest, tokens: List[int]) -> List[torch.Tensor]:
    """T3's own GPT-2 (growing cache) over the prompt then ``tokens``: the logits before each."""
    t3 = model.t3
    with torch.inference_mode():
        out = t3.tfmr(inputs_embeds=turbo.prefill_inputs(t3, request.t3_cond, request.text_tokens),
                      past_key_values=DynamicCache(), use_cache=True)
        logits = [t3.speech_head(out.last_hidden_state[:, -1, :])]
        for token in tokens[:-1]:
            out = t3.tfmr(inputs_embeds=t3.speech_emb(torch.tensor([[token]])),
                          past_key_values=out.past_key_values, use_cache=True)
            logits.append(t3.speech_head(out.last_hidden_state[:, -1, :]))
    return logits


class Recorder(Recording, TurboFastDecoder):
    pass


def test_forward_matches_t3_step_by_step_with_requests_joining_and_leaving(turbo_engine):
    model = turbo_engine.model
    a = make_request(turbo_engine, seed=1, budget=30)
    b = make_request(turbo_engine, "A second request joins later [sigh], with more to say.",
                     turbo_params(top_k=20, temperature=1.2), seed=2, budget=45)
    c = make_request(turbo_engine, "Short.", turbo_params(top_p=0.5), seed=3, budget=12)
    decoder = Recorder(model.t3, slots=4, max_len=1024)
    tokens = run(decoder, {0: [a], 5: [b, c]})
    start = model.t3.hp.start_speech_token
    for request in (a, b, c):
        expected = reference_logits(model, request, tokens[request])
        got = decoder.seen_logits[request]
        assert len(got) == len(expected) == len(tokens[request])
        # TurboSampler's history: the start token first, then only the generated tokens.
        assert decoder.history[request] == [{start}] + [set(tokens[request][:k])
                                                        for k in range(1, len(tokens[request]))]
        for step, (mine, theirs) in enumerate(zip(got, expected)):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, s=step: f"step {s}: {m}")


def test_tokens_do_not_depend_on_the_batch_slot_or_a_cancelled_neighbour(turbo_engine):
    texts = ["The first request.", "The second, which is cancelled.", "The third joins late.",
             "The fourth is short."]

    def requests():
        return [make_request(turbo_engine, text, seed=100 + i, budget=35 - 5 * i)
                for i, text in enumerate(texts)]

    t3 = turbo_engine.model.t3
    alone = {i: run(TurboFastDecoder(t3, slots=1, max_len=1024), {0: [r]})[r]
             for i, r in enumerate(requests())}
    batch = requests()
    together = run(TurboFastDecoder(t3, slots=4, max_len=1024),
                   {0: batch[:2], 3: [batch[2]], 4: [batch[3]]}, cancel={10: [batch[1]]})
    for i in (0, 2, 3):
        assert together[batch[i]] == alone[i]
    assert together[batch[1]] == alone[1][:10] and len(together[batch[1]]) == 10


def test_same_seed_same_tokens_other_seed_other_tokens(turbo_engine):
    def tokens(seed):
        request = make_request(turbo_engine, seed=seed, budget=30)
        return run(TurboFastDecoder(turbo_engine.model.t3, slots=1, max_len=1024), {0: [request]})[request]
    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


@pytest.mark.parametrize("changes", [
    {},
    dict(temperature=1.3, top_k=7, top_p=0.8, repetition_penalty=2.0),
    dict(temperature=0.6, top_k=0, top_p=1.0, repetition_penalty=1.0),
    dict(temperature=1.0, top_k=50, top_p=0.3, repetition_penalty=1.5),
    dict(temperature=0.0, top_k=10000, top_p=0.95),  # no temperature; k past the vocabulary
])
@pytest.mark.parametrize("history", [[399], [7, 12, 12, 250, 3]], ids=["start-token", "generated"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_sampling_chain_equals_turbo_samplers_processors(changes, history, ties):
    """Two rows with other parameters at once, each against the processors ``TurboSampler``
    builds (HF's: temperature, top-k, top-p, repetition penalty, those that apply)."""
    torch.manual_seed(0)
    vocab = 400
    logits = torch.randint(-4, 5, (2, vocab)).float() if ties else torch.randn(2, vocab) * 3
    rows = [turbo_params(**changes), turbo_params()]
    history = torch.tensor([history])
    expected = []
    for row, params in enumerate(rows):
        processors = turbo.TurboSampler(params, torch.Generator(), 399, "cpu").processors
        expected.append(torch.softmax(processors(history, logits[row:row + 1]), dim=-1))
    expected = torch.cat(expected)

    seen = torch.zeros(2, vocab, dtype=torch.bool)
    seen[:, history[0]] = True
    got = turbo_sampling_probs(logits, torch.stack([turbo_slot_params(p) for p in rows]), seen)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(got > 0, expected > 0)  # the same tokens survive the cuts


def test_the_top_p_threshold_rounds_as_hfs():
    """1 - top_p in double precision, then compared in float32, as HF's warper: a float32
    top_p would put the threshold one float32 step higher for top_p 0.95."""
    drop = turbo_slot_params(turbo_params(top_p=0.95))[2]
    assert float(drop) == float(torch.tensor(1 - 0.95, dtype=torch.float32))
    assert float(drop) != float(1 - torch.tensor(0.95, dtype=torch.float32))


def test_the_first_token_is_kept_even_when_it_is_the_stop_token(turbo_engine):
    from chatterbox_worker.engine.fast_decode import _Slot

    decoder = TurboFastDecoder(turbo_engine.model.t3, slots=1, max_len=1024)
    stop = turbo_engine.model.t3.hp.stop_speech_token
    slot = _Slot(request=None, steps=0)
    assert not decoder._stops(slot, stop, stop)
    slot.steps = 1
    assert decoder._stops(slot, stop, stop) and not decoder._stops(slot, stop - 1, stop)


class FastTurboEngine(Engine):
    decoder_kind = "fast"  # the CUDA path's decoder, here on the CPU


def test_the_engine_serves_concurrent_turbo_jobs_on_the_fast_decoder(turbo_engine):
    import concurrent.futures

    engine = FastTurboEngine(turbo_engine.model, watermark=False, max_batch=3, flow_steps=2)
    assert isinstance(engine._new_decoder(), TurboFastDecoder)
    alone = engine.synthesize(turbo_request(engine, seed=4), max_tokens=40)

    def streamed(seed):
        return list(engine.stream(turbo_request(engine, seed=seed), max_tokens=40))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        take = pool.submit(engine.synthesize, turbo_request(engine, seed=4), max_tokens=40)
        streams = [pool.submit(streamed, seed) for seed in (5, 6)]
        together = take.result()
        chunks = [s.result() for s in streams]
    assert together.speech_tokens == alone.speech_tokens > 0
    assert together.audio.shape == alone.audio.shape
    for pieces in chunks:
        assert len(pieces) >= 2 and sum(len(p) for p in pieces) > 0


def test_a_bfloat16_turbo_decodes_in_bfloat16(turbo_engine):
    """CUDA's default format, here on the CPU: the cache and the step in bfloat16, logits
    sampled in float32, a float32 voice prompt cast on the way in."""
    import copy

    from chatterbox_worker.engine.model import set_t3_format

    t3 = set_t3_format(copy.deepcopy(turbo_engine.model.t3), "bfloat16")
    decoder = Recorder(t3, slots=2, max_len=1024)
    assert decoder.k_cache.dtype == torch.bfloat16 and decoder.logits.dtype == torch.float32
    requests = [make_request(turbo_engine, seed=s, budget=20) for s in (1, 2)]
    tokens = run(decoder, {0: requests[:1], 2: requests[1:]})
    bf16_model = copy.copy(turbo_engine.model)
    bf16_model.t3 = t3
    for request in requests:
        assert len(tokens[request]) == 20
        bf16_request = copy.copy(request)
        bf16_request.t3_cond = request.t3_cond.to(dtype=torch.bfloat16)
        expected = reference_logits(bf16_model, bf16_request, tokens[request])
        for mine, theirs in zip(decoder.seen_logits[request], expected):
            # HF's own bfloat16 forward: equal up to a step or so of bfloat16 rounding.
            torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=0.25)


def test_a_first_draw_of_the_stop_token_is_kept_and_the_next_one_ends(turbo_engine):
    """Upstream's loop checks for the stop token from its second draw on (the first is
    dropped before vocoding if special): a T3 that always says stop gives [stop]."""
    import copy

    t3 = copy.deepcopy(turbo_engine.model.t3)
    stop = t3.hp.stop_speech_token
    with torch.no_grad():
        t3.speech_head.bias[stop] += 50
    request = make_request(turbo_engine, budget=10)
    assert run(TurboFastDecoder(t3, slots=1, max_len=1024), {0: [request]})[request] == [stop]


@pytest.mark.parametrize("option", [dict(scale_attn_by_inverse_layer_idx=True),
                                    dict(scale_attn_weights=False),
                                    dict(reorder_and_upcast_attn=True)])
def test_gpt2_attention_options_hf_would_not_honour_alike_are_refused(turbo_engine, option):
    import copy

    t3 = copy.deepcopy(turbo_engine.model.t3)
    for name, value in option.items():
        setattr(t3.tfmr.config, name, value)
    with pytest.raises(ValueError, match="attention options"):
        TurboFastDecoder(t3, slots=1, max_len=1024)

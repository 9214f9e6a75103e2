"""The fast decode path (static KV cache, padded batch, vectorised sampling), checked on CPU.

Its forward is checked against T3's own (HF's Llama with a growing cache)
token for token; its sampling chain against upstream's logits processors;
its random draws for the right distribution and for independence from the
batch. CUDA graphs cannot run here: the graph path replays exactly the
``_step_body`` these tests run eagerly (``bench/gpu/run.sh`` runs it on a GPU).
"""

from typing import Dict, List

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TopPLogitsWarper)

from chatterbox_worker.engine.batch_decode import DecodeRequest
from chatterbox_worker.engine.decode import SamplingParams, prefill_inputs, speech_embedding, text_tokens_for
from chatterbox_worker.engine.fast_decode import (FastDecoder, counter_uniform, sampling_probs,
                                                  slot_params)
from chatterbox_worker.tiny_model import synthetic_reference


@pytest.fixture(scope="module")
def voices(engine):
    return {"builtin": engine.builtin_voice,
            "clip": engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)])}


def make_request(model, voice, text, params=SamplingParams(), seed=1, budget=40):
    t3_cond, _ = voice.for_request(0.5)
    return DecodeRequest(t3_cond=t3_cond, text_tokens=text_tokens_for(model, text), params=params,
                         max_new_tokens=budget, generator=torch.Generator().manual_seed(seed))


def run(decoder: FastDecoder, schedule: Dict[int, List[DecodeRequest]], cancel=None):
    """Step until every request ends; ``schedule`` adds requests at given steps,
    ``cancel`` maps a step to requests removed before it. Returns tokens by request."""
    tokens: Dict[DecodeRequest, List[int]] = {}
    done = set()
    step = 0
    everyone = [r for batch in schedule.values() for r in batch]
    while len(done) < len(everyone):
        for request in schedule.get(step, []):
            decoder.add(request)
            tokens[request] = []
        for request in (cancel or {}).get(step, []):
            assert decoder.remove(request)
            done.add(request)
        for event in decoder.step():
            if event.token is not None:
                tokens[event.request].append(event.token)
            if event.done:
                done.add(event.request)
        step += 1
        assert step < 500
    assert len(decoder) == 0
    return tokens


def reference_logits(model, request: DecodeRequest, tokens: List[int]) -> List[torch.Tensor]:
    """T3's own forward (HF Llama, growing cache) over the prompt then ``tokens``: the
    (2, vocab) logits before each token, as the single-request loop computes them."""
    t3 = model.t3
    with torch.inference_mode():
        inputs = prefill_inputs(t3, request.t3_cond, request.text_tokens, request.params)
        if inputs.size(0) == 1:
            inputs = inputs.expand(2, -1, -1)
        out = t3.tfmr(inputs_embeds=inputs, past_key_values=DynamicCache(), use_cache=True)
        logits = [t3.speech_head(out.last_hidden_state[:, -1, :])]
        for step, token in enumerate(tokens[:-1]):
            embed = speech_embedding(t3, torch.tensor([[token]]), step)
            out = t3.tfmr(inputs_embeds=embed.expand(2, -1, -1),
                          past_key_values=out.past_key_values, use_cache=True)
            logits.append(t3.speech_head(out.last_hidden_state[:, -1, :]))
    return logits


class Recording:
    """Keeps, by request, the logits each slot samples from and the history its penalty sees
    (mixed into a static-cache decoder)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_logits: Dict[DecodeRequest, List[torch.Tensor]] = {}
        self.history: Dict[DecodeRequest, List[set]] = {}  # tokens the repetition penalty sees

    def _sample(self, n):
        for i, slot in enumerate(self._slots[:n]):
            self.seen_logits.setdefault(slot.request, []).append(self.logits[self._rows(i, i + 1)].clone())
            self.history.setdefault(slot.request, []).append(
                set(self.seen[i].nonzero().flatten().tolist()))
        return super()._sample(n)


class Recorder(Recording, FastDecoder):
    pass


def test_forward_matches_t3_step_by_step_with_requests_joining_and_leaving(model, voices):
    a = make_request(model, voices["builtin"], "Hello there, a fast decode check.", seed=1, budget=30)
    b = make_request(model, voices["clip"], "A second voice joins later, with a longer text to say.",
                     SamplingParams(temperature=1.2, top_p=0.8, min_p=0.1), seed=2, budget=45)
    c = make_request(model, voices["builtin"], "No guidance.", SamplingParams(cfg_weight=0.0),
                     seed=3, budget=12)
    decoder = Recorder(model.t3, slots=4, max_len=512)
    tokens = run(decoder, {0: [a], 5: [b, c]})
    assert [len(tokens[r]) for r in (a, b, c)] == [30, 45, 12]  # budgets (a random T3 never stops)
    for request in (a, b, c):
        expected = reference_logits(model, request, tokens[request])
        got = decoder.seen_logits[request]
        assert len(got) == len(expected)
        start = model.t3.hp.start_speech_token
        assert decoder.history[request] == [{start, *tokens[request][:k]}
                                            for k in range(len(tokens[request]))]
        for step, (mine, theirs) in enumerate(zip(got, expected)):
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, s=step: f"step {s}: {m}")


def test_tokens_do_not_depend_on_the_batch_slot_or_a_cancelled_neighbour(model, voices):
    params = SamplingParams(temperature=1.0, min_p=0.0)
    texts = ["The first request.", "The second, which is cancelled.", "The third joins late.",
             "The fourth is short."]
    def requests():
        return [make_request(model, voices["builtin" if i % 2 else "clip"], text, params,
                             seed=100 + i, budget=35 - 5 * i) for i, text in enumerate(texts)]

    alone = {}
    for i, request in enumerate(requests()):
        alone[i] = run(FastDecoder(model.t3, slots=1, max_len=512), {0: [request]})[request]
    batch = requests()
    decoder = FastDecoder(model.t3, slots=4, max_len=512)
    together = run(decoder, {0: batch[:2], 3: [batch[2]], 4: [batch[3]]}, cancel={10: [batch[1]]})
    assert together[batch[0]] == alone[0]
    assert together[batch[2]] == alone[2]
    assert together[batch[3]] == alone[3]
    assert together[batch[1]] == alone[1][:len(together[batch[1]])] and len(together[batch[1]]) == 10


def test_more_requests_than_slots_wait_for_a_free_one(model, voices):
    requests = [make_request(model, voices["builtin"], "Queued.", seed=i, budget=5 + i) for i in range(3)]
    decoder = FastDecoder(model.t3, slots=2, max_len=256)
    tokens = run(decoder, {0: requests})
    assert [len(tokens[r]) for r in requests] == [5, 6, 7]


def test_same_seed_same_tokens_other_seed_other_tokens(model, voices):
    def tokens(seed):
        request = make_request(model, voices["builtin"], "Seeded.", SamplingParams(min_p=0.0), seed=seed)
        return run(FastDecoder(model.t3, slots=1, max_len=256), {0: [request]})[request]
    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(6)


def test_a_budget_past_the_cache_is_capped_and_a_prompt_past_it_refused(model, voices, monkeypatch):
    """A piece whose text takes many tokens leaves less room for speech: its budget is cut to
    what the cache holds (as upstream's 1000-token cap cuts any piece) instead of the job
    failing; only a prompt that alone fills the cache is refused, and alone."""
    from chatterbox_worker.engine.fast_decode import FastDecoder as Decoder

    monkeypatch.setattr(Decoder, "_stops", lambda self, slot, token, stop: False)  # full budgets
    capped = make_request(model, voices["builtin"], "Too long for this cache.", budget=300)
    decoder = FastDecoder(model.t3, slots=2, max_len=256)
    other = make_request(model, voices["builtin"], "Fits.", budget=5)
    prompt = decoder._prefill_inputs(capped)[0].size(1)
    tokens = run(decoder, {0: [capped, other]})
    assert len(tokens[capped]) == 256 - prompt - 1 and len(tokens[other]) == 5

    huge = make_request(model, voices["builtin"], "word " * 300, budget=5)
    decoder = FastDecoder(model.t3, slots=2, max_len=256)
    fits = make_request(model, voices["builtin"], "Fits.", budget=5)
    decoder.add(huge)
    decoder.add(fits)
    events = decoder.step()
    assert [(e.request, e.done) for e in events] == [(huge, True), (fits, False)]
    assert isinstance(events[0].error, ValueError) and "this decoder holds 256" in str(events[0].error)
    assert huge not in decoder and fits in decoder


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=1.3, top_p=0.7, min_p=0.0, repetition_penalty=2.0, cfg_weight=0.8),
    SamplingParams(temperature=0.6, top_p=0.95, min_p=0.2, repetition_penalty=1.0, cfg_weight=0.0),
])
def test_sampling_chain_equals_upstreams_processors(params):
    torch.manual_seed(0)
    vocab = 300
    logits = torch.randn(2, vocab) * 3
    history = torch.tensor([[7, 12, 12, 250, 3]])
    cond, uncond = logits[0:1], logits[1:2]
    scores = cond + params.cfg_weight * (cond - uncond)
    scores = RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty)(history, scores)
    scores = scores / params.temperature
    scores = MinPLogitsWarper(min_p=params.min_p)(history, scores)
    scores = TopPLogitsWarper(top_p=params.top_p)(history, scores)
    expected = torch.softmax(scores, dim=-1)

    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, history[0]] = True
    got = sampling_probs(cond, uncond, slot_params(params)[None], seen)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(got > 0, expected > 0)  # the same tokens survive the cuts


def test_counter_noise_is_uniform_and_a_pure_function_of_seed_and_step():
    seeds = torch.tensor([1, 1, 2, -5, 2**62])
    steps = torch.tensor([0, 1, 0, 7, 3])
    u = counter_uniform(seeds, steps, 4096)
    assert torch.equal(u, counter_uniform(seeds, steps, 4096))
    assert torch.equal(u[1:2], counter_uniform(seeds[1:2], steps[1:2], 4096))  # row-wise
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(float(u.mean()) - 0.5) < 0.01
    # Neighbouring columns and rows are not correlated.
    flat = u[:, :-1].flatten() - 0.5, u[:, 1:].flatten() - 0.5
    assert abs(float((flat[0] * flat[1]).mean())) < 0.005


def test_exponential_race_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 20000
    noise = -torch.log(counter_uniform(torch.arange(n), torch.zeros(n, dtype=torch.long), 5))
    draws = torch.argmax(probs[None] / noise, dim=-1)
    freq = torch.bincount(draws, minlength=5).float() / n
    assert freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)


def test_cuda_graphs_need_cuda(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA"):
        FastDecoder(model.t3, slots=1, max_len=256, cuda_graphs=True)


@pytest.mark.parametrize("shortage", [
    torch.OutOfMemoryError("CUDA out of memory (simulated)"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")])
def test_out_of_memory_in_a_shared_step_drops_only_the_newest_request(model, voices, monkeypatch,
                                                                      shortage):
    first = make_request(model, voices["builtin"], "The first request keeps going.", seed=21, budget=25)
    alone = run(FastDecoder(model.t3, slots=2, max_len=256), {0: [first]})[first]

    first = make_request(model, voices["builtin"], "The first request keeps going.", seed=21, budget=25)
    newest = make_request(model, voices["clip"], "The newest one does not fit.", seed=22, budget=25)
    decoder = FastDecoder(model.t3, slots=2, max_len=256)
    body, failures = FastDecoder._step_body, []

    def short_of_memory(self, bucket, span):
        if bucket == 2 and len(failures) < 2:  # the retry after freeing the cache fails too
            failures.append(bucket)
            raise shortage
        return body(self, bucket, span)

    monkeypatch.setattr(FastDecoder, "_step_body", short_of_memory)
    tokens, errors = {first: [], newest: []}, {}
    decoder.add(first)
    for step in range(40):
        if step == 3:
            decoder.add(newest)
        for event in decoder.step():
            if event.error is not None:
                errors[event.request] = event.error
            elif event.token is not None:
                tokens[event.request].append(event.token)
        if not len(decoder):
            break
    assert len(failures) == 2 and list(errors) == [newest]
    assert "out of memory" in str(errors[newest]) and errors[newest].__cause__ is shortage
    assert tokens[first] == alone  # the survivor's state was not disturbed


def test_a_passing_shortage_in_a_step_costs_no_request(model, voices, monkeypatch):
    """Out of memory once (the cache held what was missing, and the allocator could not hand
    it back while another thread captured a graph): the cached memory is freed and the step
    tried again; every request goes on, its tokens as if nothing happened."""
    from chatterbox_worker.engine import fast_decode

    def requests():
        return [make_request(model, voices["builtin"], "The first request keeps going.", seed=21,
                             budget=20),
                make_request(model, voices["clip"], "So does the second.", seed=22, budget=20)]

    expected = run(FastDecoder(model.t3, slots=2, max_len=256), {0: requests()})
    body, failures, freed = FastDecoder._step_body, [], []

    def once_short(self, bucket, span):
        if bucket == 2 and not failures:
            failures.append(bucket)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return body(self, bucket, span)

    monkeypatch.setattr(FastDecoder, "_step_body", once_short)
    monkeypatch.setattr(fast_decode, "release_cached_memory", lambda device: freed.append(device))
    batch = requests()
    tokens = run(FastDecoder(model.t3, slots=2, max_len=256), {0: batch})
    assert failures and len(freed) == 1
    assert [tokens[r] for r in batch] == [expected[r] for r in expected]


def test_a_request_cancelled_after_the_cache_grew_leaves_cleanly(model, voices):
    """The cache grows inside a step (an inference tensor); the scheduler cancels outside
    one. Removing a request that is not in the last slot moves the last one's K/V into its
    place: that must work on the grown cache, and the moved request decode as before."""
    def requests():
        return (make_request(model, voices["builtin"], "Short one.", seed=1, budget=300),
                make_request(model, voices["clip"], "A longer one.", seed=2, budget=400))

    _, kept = requests()
    alone = run(FastDecoder(model.t3, slots=2, max_len=1024), {0: [kept]})[kept]
    first, kept = requests()
    decoder = FastDecoder(model.t3, slots=2, max_len=1024)
    tokens = run(decoder, {0: [first, kept]}, cancel={3: [first]})
    assert decoder.capacity > 256 and not torch.is_inference_mode_enabled()
    assert tokens[kept] == alone and len(tokens[first]) == 3


def test_the_cache_grows_to_what_requests_need_without_disturbing_running_ones(model, voices):
    short = make_request(model, voices["builtin"], "Short one.", seed=31, budget=20)
    long = make_request(model, voices["clip"], "A longer request joins while the short one runs.",
                        seed=32, budget=400)
    alone = run(FastDecoder(model.t3, slots=2, max_len=1024), {0: [short]})[short]
    decoder = FastDecoder(model.t3, slots=2, max_len=1024)
    assert decoder.capacity == 256
    decoder._pool = "the pool of the graphs captured so far"
    short = make_request(model, voices["builtin"], "Short one.", seed=31, budget=20)
    tokens = run(decoder, {0: [short], 5: [long]})
    assert decoder.capacity == 512  # prompt + 400 tokens, rounded up to a length bucket
    # Its graphs read the old cache: gone, and their pool with them (a pool left without
    # graphs cannot be captured into again; the next capture makes a new one).
    assert decoder.graphs == 0 and decoder._pool is None
    assert tokens[short] == alone and len(tokens[long]) == 400


def test_requests_arriving_together_share_one_prefill(model, voices, monkeypatch):
    """One padded forward for all prompts admitted at a step (a GPU prefill is bound by
    launches); each request's logits are what its prefill alone gives (the forward test
    above checks them against T3's own, with prompts of other lengths joining together)."""
    requests = [make_request(model, voices["builtin"], text, seed=i, budget=6) for i, text in
                enumerate(["One.", "A second, longer prompt than the first.", "Third."])]
    forward, prefills = model.t3.tfmr.forward, []

    def counting(*args, **kwargs):
        if kwargs.get("attention_mask") is not None or kwargs["inputs_embeds"].size(1) > 1:
            prefills.append(kwargs["inputs_embeds"].size(0))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.t3.tfmr, "forward", counting)
    tokens = run(FastDecoder(model.t3, slots=3, max_len=256), {0: requests})
    assert prefills == [6]  # three requests, two rows each (guidance), one forward
    assert all(len(tokens[r]) == 6 for r in requests)


def test_out_of_memory_in_a_shared_prefill_retries_one_by_one(model, voices, monkeypatch):
    """The shared prefill does not fit: each request is prefilled alone; one that does not fit
    alone fails alone, with the out-of-memory error, and the others decode as they would."""
    texts = ["One.", "A second, longer prompt than the first.", "Third."]

    def requests():
        return [make_request(model, voices["builtin"], text, seed=i, budget=8)
                for i, text in enumerate(texts)]

    alone = {i: run(FastDecoder(model.t3, slots=1, max_len=256), {0: [r]})[r]
             for i, r in enumerate(requests())}
    probe = FastDecoder(model.t3, slots=1, max_len=256)
    lengths = [probe._prefill_inputs(r)[0].size(1) for r in requests()]
    assert lengths[1] > max(lengths[0], lengths[2])  # the second prompt is the one that fails
    forward = model.t3.tfmr.forward

    def short_of_memory(*args, **kwargs):
        embeds = kwargs["inputs_embeds"]
        if embeds.size(0) > 2 or embeds.size(1) == lengths[1]:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.t3.tfmr, "forward", short_of_memory)
    batch = requests()
    decoder = FastDecoder(model.t3, slots=3, max_len=256)
    for request in batch:
        decoder.add(request)
    events = decoder.step()
    failed = [e for e in events if e.error is not None]
    assert [e.request for e in failed] == [batch[1]] and "out of memory" in str(failed[0].error)
    monkeypatch.setattr(model.t3.tfmr, "forward", forward)
    tokens = {batch[0]: [], batch[2]: []}
    for event in events:
        if event.token is not None:
            tokens[event.request].append(event.token)
    while len(decoder):
        for event in decoder.step():
            if event.token is not None:
                tokens[event.request].append(event.token)
    assert tokens[batch[0]] == alone[0] and tokens[batch[2]] == alone[2]

"""Batched T3 decoding: each request's tokens are exactly those it gets alone, whoever runs beside it.

"Exactly" is checked twice: the tokens are equal, and so is every logits
tensor each request's sampler sees (bit for bit, ``torch.equal``), so the
equality does not rest on draws that happened to land away from a rounding
boundary.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest
import torch

from chatterbox_worker.engine import decode
from chatterbox_worker.engine.batch_decode import BatchDecoder, DecodeRequest
from chatterbox_worker.engine.decode import SamplingParams, decode_speech_tokens, text_tokens_for
from chatterbox_worker.tiny_model import synthetic_reference

BUDGET = 60


@dataclass(frozen=True)
class Job:
    text: str
    voice: str  # "builtin" or "clip"
    params: SamplingParams
    seed: int
    budget: int = BUDGET


GUIDED = Job("Hello there, this is a batching check.", "builtin", SamplingParams(), seed=11)
OTHER = Job("Another voice says a longer sentence, with a comma in it.", "clip",
            SamplingParams(temperature=1.1, cfg_weight=0.7, top_p=0.8, min_p=0.1,
                           repetition_penalty=1.5), seed=12, budget=70)
UNGUIDED = Job("No guidance for this one.", "builtin", SamplingParams(cfg_weight=0.0), seed=13,
               budget=50)


@pytest.fixture(scope="module")
def voices(engine):
    return {"builtin": engine.builtin_voice,
            "clip": engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)])}


class Seen:
    """Every logits tensor a sampler draws from, by the request's generator
    (held here, so that no other generator can take its id)."""

    def __init__(self):
        self._by_id: Dict[int, tuple] = {}

    def record(self, generator: torch.Generator, logits: torch.Tensor) -> None:
        self._by_id.setdefault(id(generator), (generator, []))[1].append(logits.clone())

    def __getitem__(self, generator: torch.Generator) -> List[torch.Tensor]:
        return self._by_id.get(id(generator), (generator, []))[1]


@pytest.fixture
def seen(monkeypatch):
    log = Seen()
    pick = decode.RowSampler.pick

    def recording(self, rows):
        log.record(self.generator, rows)
        return pick(self, rows)

    monkeypatch.setattr(decode.RowSampler, "pick", recording)
    return log


def request_for(model, voices, job: Job) -> DecodeRequest:
    t3_cond, _ = voices[job.voice].for_request(0.5)
    return DecodeRequest(t3_cond=t3_cond, text_tokens=text_tokens_for(model, job.text),
                         params=job.params, max_new_tokens=job.budget,
                         generator=torch.Generator().manual_seed(job.seed))


def alone(model, voices, seen, job: Job):
    """(tokens, logits) of the single-request loop."""
    r = request_for(model, voices, job)
    tokens = list(decode_speech_tokens(model, r.t3_cond, r.text_tokens, r.params,
                                       max_new_tokens=r.max_new_tokens, generator=r.generator))
    return tokens, seen[r.generator]


def together(model, voices, seen, joins: Dict[int, List[Job]],
             cancels: Optional[Dict[int, List[Job]]] = None):
    """Run jobs through one BatchDecoder: ``joins[k]`` are added before step k,
    ``cancels[k]`` removed before step k. Returns {job: (tokens, logits)}."""
    decoder = BatchDecoder(model.t3)
    requests, tokens, finished = {}, {}, set()
    cancels = cancels or {}
    step = 0
    while len(decoder) or any(k >= step for k in joins):
        for job in joins.get(step, []):
            requests[job] = request_for(model, voices, job)
            tokens[job] = []
            decoder.add(requests[job])
        for job in cancels.get(step, []):
            assert decoder.remove(requests[job])
            assert requests[job] not in decoder
        by_request = {r: job for job, r in requests.items()}
        for event in decoder.step():
            job = by_request[event.request]
            assert job not in finished, "an event after the request left"
            if event.token is not None:
                tokens[job].append(event.token)
            if event.done:
                finished.add(job)
        step += 1
    return {job: (tokens[job], seen[r.generator]) for job, r in requests.items()}


def assert_same(got, expected):
    tokens, logits = got
    want_tokens, want_logits = expected
    assert tokens == want_tokens
    assert len(logits) == len(want_logits)
    for step, (a, b) in enumerate(zip(logits, want_logits)):
        assert torch.equal(a, b), f"logits part at step {step}: max |diff| {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(min_p=1.0)],
                         ids=["sampled", "greedy"])
def test_one_request_equals_the_single_request_loop(model, voices, seen, params):
    job = Job(GUIDED.text, "builtin", params, seed=5)
    expected = alone(model, voices, seen, job)
    assert len(expected[0]) == BUDGET  # the random model never stops early here: all steps compared
    assert_same(together(model, voices, seen, {0: [job]})[job], expected)


def test_three_requests_together_equal_each_alone(model, voices, seen):
    jobs = [GUIDED, OTHER, UNGUIDED]
    expected = {job: alone(model, voices, seen, job) for job in jobs}
    got = together(model, voices, seen, {0: jobs})
    for job in jobs:
        assert len(got[job][0]) == job.budget  # each leaves at its own budget
        assert_same(got[job], expected[job])


def test_joining_and_cancelled_requests_leave_the_others_unchanged(model, voices, seen):
    expected = {job: alone(model, voices, seen, job) for job in (GUIDED, OTHER, UNGUIDED)}
    # OTHER joins at step 10; UNGUIDED is cancelled before step 25.
    got = together(model, voices, seen, {0: [GUIDED, UNGUIDED], 10: [OTHER]},
                   cancels={25: [UNGUIDED]})
    assert_same(got[GUIDED], expected[GUIDED])
    assert_same(got[OTHER], expected[OTHER])
    tokens, logits = got[UNGUIDED]
    assert len(tokens) == 25
    assert_same((tokens, logits), (expected[UNGUIDED][0][:25], expected[UNGUIDED][1][:25]))


def test_other_seed_other_tokens(model, voices, seen):
    a, b = GUIDED, Job(GUIDED.text, GUIDED.voice, GUIDED.params, seed=GUIDED.seed + 1)
    got = together(model, voices, seen, {0: [a, b]})
    assert got[a][0] != got[b][0]
    # Same prompt, so the first logits agree; the draws are what differ.
    assert torch.equal(got[a][1][0], got[b][1][0])


def test_stop_token_ends_only_its_request(model, voices, seen, monkeypatch):
    stop = model.t3.hp.stop_speech_token
    expected = alone(model, voices, seen, GUIDED)
    pick = decode.RowSampler.pick
    unguided_picks = []

    def stopping(self, rows):
        if not self.guided:  # UNGUIDED says its stop token at its 8th step
            unguided_picks.append(None)
            if len(unguided_picks) == 8:
                return torch.full((1, 1), stop, dtype=torch.long)
        return pick(self, rows)

    monkeypatch.setattr(decode.RowSampler, "pick", stopping)
    got = together(model, voices, seen, {0: [GUIDED, UNGUIDED]})
    assert len(got[UNGUIDED][0]) == 7
    assert got[GUIDED][0] == expected[0]


def test_zero_budget_and_misuse(model, voices, seen):
    decoder = BatchDecoder(model.t3)
    request = request_for(model, voices, Job(GUIDED.text, "builtin", SamplingParams(), 1, budget=0))
    decoder.add(request)
    with pytest.raises(ValueError):
        decoder.add(request)
    [event] = decoder.step()
    assert event.request is request and event.token is None and event.done
    assert len(decoder) == 0 and not decoder.remove(request)
    assert decoder.step() == []


def test_a_request_whose_logits_go_non_finite_fails_alone(model, voices, seen):
    """A voice with a huge (finite) speaker embedding makes its own logits NaN and
    ``torch.multinomial`` refuses them: that request fails, and the one beside it keeps
    every token it gets alone. Before, the error left ``step`` and failed both."""
    import dataclasses

    expected = alone(model, voices, seen, GUIDED)
    voices = {**voices, "huge": dataclasses.replace(
        voices["builtin"], speaker_emb=torch.full_like(voices["builtin"].speaker_emb, 3e38))}
    poisoned = Job("This voice cannot be sampled.", "huge", SamplingParams(), seed=3)
    decoder = BatchDecoder(model.t3)
    requests = {job: request_for(model, voices, job) for job in (GUIDED, poisoned)}
    for request in requests.values():
        decoder.add(request)
    tokens, errors = [], []
    while len(decoder):
        for event in decoder.step():
            if event.request is requests[poisoned]:
                errors.append(event.error)
                assert event.done and event.token is None
            elif event.token is not None:
                tokens.append(event.token)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert tokens == expected[0]


def test_a_request_whose_prefill_fails_leaves_alone(model, voices, seen, monkeypatch):
    """Its own prompt fails (here, simulated): that request gets one failed event in the same
    step, and the request joining beside it keeps every token it gets alone."""
    expected = alone(model, voices, seen, GUIDED)
    broken = Job("This prompt will not go through.", "builtin", SamplingParams(), seed=4)
    requests = {job: request_for(model, voices, job) for job in (GUIDED, broken)}
    prefill = BatchDecoder._prefill

    def failing(self, seq):
        if seq.request is requests[broken]:
            raise RuntimeError("simulated prefill failure")
        return prefill(self, seq)

    monkeypatch.setattr(BatchDecoder, "_prefill", failing)
    decoder = BatchDecoder(model.t3)
    for request in requests.values():
        decoder.add(request)
    first = decoder.step()
    [failed] = [e for e in first if e.request is requests[broken]]
    assert failed.done and "simulated" in str(failed.error) and requests[broken] not in decoder
    tokens = [e.token for e in first if e.request is requests[GUIDED]]
    while len(decoder):
        tokens += [e.token for e in decoder.step() if e.token is not None]
    assert tokens == expected[0]

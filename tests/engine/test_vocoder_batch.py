"""Batching the vocoder calls of concurrent streams (``vocoder_batch``, ``flow_mels_batch``,
``hift_batch``).

A batch row must be its call alone up to float rounding, with its own HiFT
noise; a batch of one must be exactly the call alone; shapes never mix; a
failure reaches every stream of its batch; a stream whose call was done for
it never waits for the lock.
"""

import threading
import time

import numpy as np
import pytest
import torch

from chatterbox_worker.engine import SynthesisRequest
from chatterbox_worker.engine.batch_decode import BatchDecoder
from chatterbox_worker.engine.conditionals import VoiceConditionals
from chatterbox_worker.engine.hift import hift, hift_batch
from chatterbox_worker.engine.priority_lock import FIRST_AUDIO, STREAM, WHOLE, PriorityLock
from chatterbox_worker.engine.synthesis import Engine
from chatterbox_worker.engine.vocoder import (NoiseBank, Prompt, StreamSchedule, VocoderWork,
                                              flow_mels, flow_mels_batch, vocode_batch)
from chatterbox_worker.engine.vocoder_batch import VocoderBatcher
from chatterbox_worker.tiny_model import synthetic_reference
from tests.engine.test_flow import HostReads

SCHEDULE = StreamSchedule(chunk_tokens=(4, 8))
BUDGET = 30


@pytest.fixture(scope="module")
def voices(engine):
    return [engine.builtin_voice,
            engine.voice_from_clips([synthetic_reference(seconds=7, seed=5)]),
            engine.voice_from_clips([synthetic_reference(seconds=9, seed=8)])]


def work(model, voice: VoiceConditionals, seed: int, n_tokens: int, prompt_tokens=50) -> VocoderWork:
    _, gen = voice.for_request(0.5)
    prompt = Prompt.from_gen(gen).last(prompt_tokens)
    tokens = torch.randint(0, 6561, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    bank = NoiseBank(seed, Prompt.from_gen(gen).feat.shape[1])
    return VocoderWork(tokens, prompt, bank.for_span(prompt.feat.shape[1], 0, 2 * n_tokens), seed=seed)


def _fake_work(n=3, fill=0.0):
    prompt = Prompt(torch.zeros(1, 2), torch.zeros(1, 4, 80), torch.zeros(1, 192))
    return VocoderWork(torch.zeros(1, n), prompt, torch.full((1, 80, 4 + 2 * n), fill))


def _queued(batcher, lock, works, urgency=STREAM):
    """Run ``works`` through ``batcher`` from threads that all queue behind one holder."""
    results = [None] * len(works)

    def call(i):
        try:
            results[i] = batcher.run(works[i], urgency)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each call got
            results[i] = exc

    with lock.hold(FIRST_AUDIO):
        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(works))]
        for t in threads:
            t.start()
        while lock.waiting < len(works):
            time.sleep(0.001)
    for t in threads:
        t.join(10)
    return results


def test_a_batch_row_is_its_call_alone_up_to_rounding(model, voices):
    works = [work(model, v, seed=i, n_tokens=20) for i, v in enumerate(voices)]
    alone = [flow_mels(model, w.tokens, w.prompt, w.noise) for w in works]
    together = flow_mels_batch(model, works)
    for a, b in zip(alone, together):
        assert a.shape == b.shape == (1, 80, 40)
        assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()
    # The rows are each its own call's, not one another's.
    assert not torch.allclose(together[0], together[1], atol=1e-2)


def test_rows_of_other_lengths_are_padded_and_each_is_its_call_alone(model, voices):
    """One-shot takes and streams out of step differ in length: padded to the longest row,
    masked, each row is still its call alone up to rounding (prompts of other lengths too)."""
    works = [work(model, voices[0], seed=1, n_tokens=9),
             work(model, voices[1], seed=2, n_tokens=31, prompt_tokens=20),
             work(model, voices[2], seed=3, n_tokens=17, prompt_tokens=None)]
    alone = [flow_mels(model, w.tokens, w.prompt, w.noise) for w in works]
    together = flow_mels_batch(model, works)
    for w, a, b in zip(works, alone, together):
        assert a.shape == b.shape == (1, 80, 2 * w.tokens.shape[1])
        assert torch.allclose(a, b, rtol=0, atol=1e-4), (a - b).abs().max()


def test_the_encoder_alone_is_upstreams_bit_for_bit(model, voices):
    """``_encode`` differs from upstream's encoder only at padded positions."""
    from chatterbox_worker.engine.vocoder import _encode

    w = work(model, voices[1], seed=8, n_tokens=23)
    tokens = torch.cat([w.prompt.tokens, w.tokens], dim=1)
    lengths = torch.tensor([tokens.shape[1]])
    encoder = model.s3gen.flow.encoder
    with torch.inference_mode():
        xs = model.s3gen.flow.input_embedding(tokens.long())
        reads = HostReads()
        with reads:
            ours, our_masks = _encode(encoder, xs, lengths)
        theirs, their_masks = encoder(xs, lengths)
    assert torch.equal(ours, theirs) and torch.equal(our_masks, their_masks)
    assert reads.seen == []  # no host read: the host can queue a whole vocoder call


def test_a_whole_vocoder_call_reads_nothing_back_from_the_device(model, voices):
    """Encoder, flow solve and HiFT, for calls of other lengths together: on a GPU the host
    queues the whole call and waits only when it copies the audio out."""
    works = [work(model, voices[0], seed=1, n_tokens=12), work(model, voices[2], seed=2, n_tokens=17)]
    with torch.inference_mode():
        reads = HostReads()
        with reads:
            vocode_batch(model, works, batch_hift=True)
            vocode_batch(model, works[:1])
    assert reads.seen == []


def test_a_batch_of_one_is_exactly_flow_mels(model, voices):
    w = work(model, voices[1], seed=3, n_tokens=12)
    assert torch.equal(flow_mels_batch(model, [w])[0], flow_mels(model, w.tokens, w.prompt, w.noise))


def test_hift_alone_is_upstreams_hift_after_manual_seed(model, voices):
    """HiFT's noise comes from the call's own seed: exactly what upstream's inference draws
    from the global generators after ``torch.manual_seed`` (with a source carried over)."""
    w = work(model, voices[1], seed=4, n_tokens=16)
    mels = flow_mels(model, w.tokens, w.prompt, w.noise)
    cache = torch.linspace(-0.1, 0.1, 5 * 960).reshape(1, 1, -1)
    audio, source = hift(model, mels, cache, seed=11)
    torch.manual_seed(11)
    expected, expected_source = model.s3gen.mel2wav.inference(speech_feat=mels, cache_source=cache)
    assert torch.equal(audio, expected[0]) and torch.equal(source, expected_source)


def test_vocoding_leaves_the_global_generator_alone(model, voices):
    w = work(model, voices[0], seed=2, n_tokens=12)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = vocode_batch(model, [w])[0][0]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another global state: the same audio
    assert torch.equal(vocode_batch(model, [w])[0][0], first)


def test_a_hift_batch_row_is_its_call_alone_with_its_own_noise(model, voices):
    w = work(model, voices[2], seed=6, n_tokens=14)
    mels = flow_mels(model, w.tokens, w.prompt, w.noise)
    seeds = [5, 6, 5]  # the same mels: rows differ by their seeds only
    together = hift_batch(model, torch.cat([mels] * 3), seeds, [None] * 3)
    alone = [hift(model, mels, seed=s)[0] for s in seeds]
    for (audio, source), expected in zip(together, alone):
        assert source.shape == (1, 1, 14 * 2 * 480)
        assert torch.allclose(audio, expected, rtol=0, atol=1e-4), (audio - expected).abs().max()
    assert torch.equal(together[0][0], together[2][0])  # equal seeds, equal rows
    assert not torch.allclose(together[0][0], together[1][0], atol=1e-3)


def test_a_vocoder_batch_is_its_calls_alone(model, voices):
    works = [work(model, v, seed=10 + i, n_tokens=18) for i, v in enumerate(voices)]
    alone = [vocode_batch(model, [w])[0][0] for w in works]
    for batch_hift in (False, True):
        together = vocode_batch(model, works, batch_hift=batch_hift)
        for (audio, _), expected in zip(together, alone):
            assert audio.shape == expected.shape == (18 * 960,)
            assert torch.allclose(audio, expected, rtol=0, atol=1e-3), (audio - expected).abs().max()


def test_work_of_other_shapes_never_shares_a_batch():
    lock, groups = PriorityLock(), []

    def run(works):
        groups.append([w.tokens.shape[1] for w in works])
        return [w.tokens.float() for w in works]

    batcher = VocoderBatcher(lock, run, max_batch=8)
    results = _queued(batcher, lock, [_fake_work(n) for n in (3, 5, 3, 3, 5)])
    assert sorted(map(sorted, groups)) == [[3, 3, 3], [5, 5]]
    assert [r.shape[1] for r in results] == [3, 5, 3, 3, 5]
    assert batcher.batches == 2 and batcher.rows == 5 and lock.waiting == 0 and not lock.locked()


class _Feed:
    """A token feed with one decoded token not yet read."""

    def unread(self):
        return 1


class _Vocoder:
    """A stream whose next call, once it reads its unread tokens, has ``shape`` (or none)."""

    def __init__(self, shape=None):
        self.shape = shape

    def next_call_shape(self, more):
        return self.shape if more else None


def test_a_due_call_waits_for_a_stream_about_to_ask_for_the_same_shape():
    """Streams in lockstep read their tokens one after another: the first to find its chunk
    due waits for the one that has the tokens of an equal-shaped chunk but has not read them."""
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append(len(ws)) or [w.noise for w in ws],
                             max_batch=4)
    batcher.gather_s = 60  # the test must not depend on timing: only the peer ends the wait
    first, second = _fake_work(fill=1.0), _fake_work(fill=2.0)
    with batcher.following(_Vocoder(), _Feed()) as a, \
            batcher.following(_Vocoder(second.shape), _Feed()) as b:
        t = threading.Thread(target=batcher.run, args=(first, FIRST_AUDIO, a))
        t.start()
        time.sleep(0.2)
        assert groups == [] and t.is_alive()  # gathering, not running alone
        batcher.run(second, FIRST_AUDIO, b)
        t.join(10)
    assert groups == [2] and not a.asking and not b.asking


def test_with_padding_a_due_call_waits_for_a_stream_about_to_ask_for_a_near_shape():
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append(len(ws)) or [w.noise for w in ws],
                             max_batch=4, padding=True)
    batcher.gather_s = 60
    first, second = _fake_work(20), _fake_work(22)  # 44 and 48 frames: within 1.5x
    with batcher.following(_Vocoder(), _Feed()) as a, \
            batcher.following(_Vocoder(second.shape), _Feed()) as b:
        t = threading.Thread(target=batcher.run, args=(first, STREAM, a))
        t.start()
        time.sleep(0.2)
        assert groups == [] and t.is_alive()
        batcher.run(second, STREAM, b)
        t.join(10)
    assert groups == [2]


def test_a_gathering_first_chunk_keeps_its_turn():
    """The call that gathers holds the vocoder meanwhile: a one-shot take that arrives
    then (another shape, no company) runs after the gathered batch, not before it."""
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append([w.tokens.shape[1] for w in ws])
                             or [w.noise for w in ws], max_batch=4)
    batcher.gather_s = 60
    first, second, whole = _fake_work(3), _fake_work(3, fill=1.0), _fake_work(9)
    with batcher.following(_Vocoder(), _Feed()) as a, \
            batcher.following(_Vocoder(second.shape), _Feed()) as b:
        t = threading.Thread(target=batcher.run, args=(first, FIRST_AUDIO, a))
        t.start()
        deadline = time.monotonic() + 10
        while not lock.locked() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert lock.locked()  # the first call has the vocoder while it gathers
        c = threading.Thread(target=batcher.run, args=(whole, WHOLE))
        c.start()
        while lock.waiting < 1:
            time.sleep(0.001)
        batcher.run(second, FIRST_AUDIO, b)
        t.join(10)
        c.join(10)
    assert groups == [[3, 3], [9]]


def test_a_stream_handing_a_chunk_to_its_consumer_is_not_waited_for():
    """A stream suspended at its ``yield`` (a slow consumer) piles up tokens: it must not
    count as about to ask, or every other call would wait the whole gather time."""
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append(len(ws)) or [0] * len(ws), max_batch=4)
    batcher.gather_s = 60
    work = _fake_work()
    with batcher.following(_Vocoder(), _Feed()) as a, \
            batcher.following(_Vocoder(work.shape), _Feed()) as b, b.handing_over():
        t = threading.Thread(target=batcher.run, args=(work, STREAM, a))
        t.start()
        t.join(10)
        assert not t.is_alive()
    assert groups == [1] and not b.away


@pytest.mark.parametrize("peer_shape", [None, (5, 2, 14)], ids=["no chunk due", "another shape"])
def test_a_due_call_waits_for_no_one_without_company(peer_shape):
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append(len(ws)) or [w.noise for w in ws],
                             max_batch=4)
    batcher.gather_s = 60
    with batcher.following(_Vocoder(), _Feed()) as a, batcher.following(_Vocoder(peer_shape), _Feed()):
        t = threading.Thread(target=batcher.run, args=(_fake_work(), STREAM, a))
        t.start()
        t.join(10)
        assert not t.is_alive()
    assert groups == [1]


def test_a_stream_foresees_the_shape_of_its_next_call(model, voices):
    """``next_call_shape``, the batcher's look-ahead, names the shape ``due()`` then has."""
    from chatterbox_worker.engine.vocoder import StreamingVocoder

    _, gen = voices[1].for_request(0.5)
    vocoder = StreamingVocoder(model, gen, seed=1, schedule=StreamSchedule(chunk_tokens=(4, 9)))
    tokens = torch.randint(0, 6561, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    calls = 0
    while tokens:
        foreseen = [vocoder.next_call_shape(k) for k in range(len(tokens) + 1)]
        k = next((k for k, shape in enumerate(foreseen) if shape is not None), None)
        if k is None:
            break
        assert k > 0 and all(shape == foreseen[k] for shape in foreseen[k:])
        for token in tokens[:k - 1]:
            assert not vocoder.add([token])
        assert vocoder.add([tokens[k - 1]])
        assert vocoder.due().shape == foreseen[k]
        assert vocoder.next_call_shape(1000) is None  # a call in flight: nothing else soon
        vocoder.complete(*vocode_batch(model, [vocoder.due()])[0])
        tokens, calls = tokens[k:], calls + 1
    assert calls >= 5


def test_a_stream_keeps_its_own_source_not_its_batchs(model, voices):
    """The HiFT source a stream carries to its next call is its own copy: a view of its row
    would keep the whole batch's source alive until the stream's next chunk."""
    from chatterbox_worker.engine.vocoder import StreamingVocoder

    _, gen = voices[1].for_request(0.5)
    vocoder = StreamingVocoder(model, gen, seed=1, schedule=StreamSchedule(chunk_tokens=(4, 9)))
    assert vocoder.add(list(range(100, 107)))
    other = work(model, voices[2], 3, 7)
    [(audio, source), _] = vocode_batch(model, [vocoder.due(), other], batch_hift=True)
    vocoder.complete(audio, source)
    kept = vocoder._source
    assert torch.equal(kept, source)
    assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()


def test_max_batch_caps_a_batch_and_the_most_urgent_go_first():
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append([int(w.noise[0, 0, 0]) for w in ws])
                          or [w.noise for w in ws], max_batch=2)
    prompt = Prompt(torch.zeros(1, 2), torch.zeros(1, 4, 80), torch.zeros(1, 192))

    def call(i, urgency):
        batcher.run(VocoderWork(torch.zeros(1, 3), prompt, torch.full((1, 80, 10), float(i))), urgency)

    with lock.hold(FIRST_AUDIO):
        threads = []
        for i, urgency in enumerate((STREAM, STREAM, FIRST_AUDIO)):
            threads.append(threading.Thread(target=call, args=(i, urgency)))
            threads[-1].start()
            while lock.waiting < i + 1:
                time.sleep(0.001)
    for t in threads:
        t.join(10)
    # The first-audio call leads and takes the oldest stream call along.
    assert groups == [[2, 0], [1]]


def test_with_padding_calls_of_near_lengths_share_a_batch_and_far_ones_do_not():
    lock, groups = PriorityLock(), []

    def run(works):
        groups.append(sorted(w.tokens.shape[1] for w in works))
        return [w.tokens.shape[1] for w in works]

    batcher = VocoderBatcher(lock, run, max_batch=8, padding=True)
    # frames: 4 + 2n; 20 and 24 tokens are within 1.5x of each other, 60 is not
    results = _queued(batcher, lock, [_fake_work(n) for n in (20, 24, 60, 20)])
    assert results == [20, 24, 60, 20]
    assert sorted(groups) == [[20, 20, 24], [60]]


def test_padding_never_exceeds_the_frames_of_one_call(monkeypatch):
    from chatterbox_worker.engine import vocoder_batch

    monkeypatch.setattr(vocoder_batch, "MAX_FRAMES", 100)  # two rows of 44 frames, not three
    lock, groups = PriorityLock(), []
    batcher = VocoderBatcher(lock, lambda ws: groups.append(len(ws)) or [0] * len(ws),
                             max_batch=8, padding=True)
    _queued(batcher, lock, [_fake_work(20), _fake_work(19), _fake_work(18)])
    assert sorted(groups) == [1, 2]


def test_out_of_memory_in_a_batch_runs_each_call_alone():
    """A batch that does not fit is split: each call runs alone; one that does not fit even
    alone fails alone, with the device's out-of-memory error; the others get their audio."""
    lock, calls = PriorityLock(), []

    def run(works):
        calls.append(len(works))
        if len(works) > 1 or int(works[0].noise[0, 0, 0]) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [int(works[0].noise[0, 0, 0])]

    batcher = VocoderBatcher(lock, run, max_batch=4)
    results = _queued(batcher, lock, [_fake_work(fill=float(i)) for i in range(4)])
    assert calls == [4, 1, 1, 1, 1]
    assert results[:2] == [0, 1] and results[3] == 3
    assert isinstance(results[2], torch.OutOfMemoryError)
    assert batcher.run(_fake_work(fill=5.0), STREAM) == 5  # and the next call works


def test_a_librarys_allocation_failure_splits_a_batch_too_and_other_errors_do_not():
    """cuBLAS and cuDNN report memory they could not get as a RuntimeError of their own."""
    for error, splits in ((RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                        "`cublasCreate(handle)`"), True),
                          (RuntimeError("Expected all tensors to be on the same device"), False)):
        lock, calls = PriorityLock(), []

        def run(works):
            calls.append(len(works))
            if len(works) > 1:
                raise error
            return [int(works[0].noise[0, 0, 0])]

        batcher = VocoderBatcher(lock, run, max_batch=3)
        results = _queued(batcher, lock, [_fake_work(fill=float(i)) for i in range(3)])
        if splits:
            assert calls == [3, 1, 1, 1] and results == [0, 1, 2]
        else:
            assert calls == [3] and all(isinstance(r, RuntimeError) for r in results)


def test_a_failed_batch_fails_each_of_its_streams_and_the_next_call_works():
    lock, calls = PriorityLock(), []

    def run(works):
        calls.append(len(works))
        if len(calls) == 1:
            raise RuntimeError("flow blew up")
        return [w.noise for w in works]

    batcher = VocoderBatcher(lock, run, max_batch=4)
    results = _queued(batcher, lock, [_fake_work() for _ in range(3)])
    assert [str(r) for r in results] == ["flow blew up"] * 3 and calls == [3]
    # Each stream raises an error object of its own (one shared object would have its
    # traceback rewritten by every thread raising it), all of the batch's type.
    assert len({id(r) for r in results}) == 3 and {type(r) for r in results} == {RuntimeError}
    assert batcher.run(_fake_work(fill=1.0), STREAM).sum() == 80 * 10
    assert not lock.locked() and lock.waiting == 0


def test_hold_unless_gives_up_when_done_and_otherwise_holds():
    lock, done = PriorityLock(), threading.Event()
    got = []

    def waiter():
        with lock.hold_unless(STREAM, done.is_set) as acquired:
            got.append(acquired)

    with lock.hold():
        t = threading.Thread(target=waiter)
        t.start()
        while lock.waiting < 1:
            time.sleep(0.001)
        done.set()
    t.join(10)
    assert got == [False] and lock.waiting == 0 and not lock.locked()
    with lock.hold_unless(STREAM, lambda: False) as acquired:
        assert acquired and lock.locked()


def streamed(engine, voice, seed):
    request = SynthesisRequest(text="Streams in lockstep share the vocoder.", voice=voice, seed=seed)
    stream = engine.stream(request, schedule=SCHEDULE, max_tokens=BUDGET)
    try:
        return np.concatenate(list(stream))
    finally:
        stream.close()


@pytest.mark.parametrize("batch_hift", [False, True], ids=["flow batched", "HiFT batched too"])
def test_concurrent_streams_share_vocoder_calls_and_each_sounds_as_alone(engine, voices,
                                                                          monkeypatch, batch_hift):
    batched = Engine(engine.model, watermark=False, max_batch=4, batch_vocoder=True)
    batched.batch_hift = batch_hift  # on by default on CUDA only, where it pays
    alone = [streamed(batched, v, seed=20 + i) for i, v in enumerate(voices)]
    assert batched.vocoder_calls.batches == batched.vocoder_calls.rows  # one stream at a time: no batches

    original, want = BatchDecoder.step, {"n": len(voices)}

    def gathered_step(self):  # the first step waits for every stream, so they run in lockstep
        deadline = time.monotonic() + 10
        while want["n"] and batched.scheduler.active < want["n"] and time.monotonic() < deadline:
            time.sleep(0.001)
        want["n"] = 0
        return original(self)

    monkeypatch.setattr(BatchDecoder, "step", gathered_step)
    results = [None] * len(voices)

    def run(i):
        results[i] = streamed(batched, voices[i], seed=20 + i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(voices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert batched.vocoder_calls.rows > batched.vocoder_calls.batches  # some calls did run together
    for a, b in zip(alone, results):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-3  # rounding only (the exact decoder keeps the tokens)


def test_concurrent_one_shot_takes_of_other_lengths_share_a_padded_call(engine, voices):
    """With padding (CUDA's default), one-shot takes that end while the vocoder is busy run
    as one call, each take as it sounds alone up to rounding."""
    batched = Engine(engine.model, watermark=False, max_batch=4, batch_vocoder=True)
    batched.vocoder_calls.padding = True
    budgets = [24, 28, 32]
    requests = [SynthesisRequest(text="One-shot takes share the vocoder.", voice=v, seed=30 + i)
                for i, v in enumerate(voices)]
    alone = [batched.synthesize(r, max_tokens=b).audio for r, b in zip(requests, budgets)]
    calls, results = batched.vocoder_calls.batches, [None] * len(requests)

    def run(i):
        results[i] = batched.synthesize(requests[i], max_tokens=budgets[i]).audio

    with batched._lock.hold(FIRST_AUDIO):  # the vocoder is busy while all three decode
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        while batched._lock.waiting < len(requests):
            time.sleep(0.001)
    for t in threads:
        t.join(120)
    assert batched.vocoder_calls.batches == calls + 1
    assert len({len(a) for a in alone}) > 1  # other lengths indeed
    for a, b in zip(alone, results):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-3


def test_batching_is_off_on_the_exact_path_by_default(engine):
    assert engine.decoder_kind == "exact" and not engine.batch_vocoder
    assert not Engine(engine.model, watermark=False, max_batch=4).batch_vocoder
    assert not Engine(engine.model, watermark=False, max_batch=1, batch_vocoder=True).batch_vocoder
    # HiFT batches, and other lengths pad, on CUDA only: on a CPU they cost more than they save.
    on_cpu = Engine(engine.model, watermark=False, max_batch=4, batch_vocoder=True)
    assert not on_cpu.batch_hift and not on_cpu.vocoder_calls.padding

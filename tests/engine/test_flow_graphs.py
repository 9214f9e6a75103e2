"""The flow solve in padded buckets (``engine.flow_graphs``), checked on a CPU.

Capture itself needs CUDA (``bench/gpu/vocoder_graphs.py`` checks it on a
GPU); here ``capture=False`` runs the very buckets a graph would read and
write, eagerly: padding, the reuse of a bucket's buffers and eviction are the
same code either way.
"""

import logging

import pytest
import torch

from chatterbox_worker.engine.flow import solve, time_span
from chatterbox_worker.engine.flow_graphs import FRAME_BUCKET, MAX_CELLS, FlowGraphs, bucket_of
from chatterbox_worker.engine.vocoder import flow_mels_batch, vocode_batch

from tests.engine.test_flow import padded_call
from tests.engine.test_vocoder_batch import work

STEPS = 4


def eager(cfm, call, steps=STEPS):
    x, mu, mask, spks, cond = call
    t_span = time_span(steps, meanflow=False, device="cpu", dtype=torch.float32)
    return solve(cfm, x, t_span, mu, mask, spks, cond, meanflow=False)


def graphed(graphs, call, steps=STEPS):
    x, mu, mask, spks, cond = call
    return graphs.solve(x, mu, mask, spks, cond, steps=steps)


def test_buckets_round_rows_to_powers_of_two_and_frames_to_the_frame_bucket():
    assert bucket_of(1, 1) == (1, FRAME_BUCKET)
    assert bucket_of(3, FRAME_BUCKET) == (4, FRAME_BUCKET)
    assert bucket_of(5, FRAME_BUCKET + 1) == (8, 2 * FRAME_BUCKET)
    assert bucket_of(1, MAX_CELLS) == (1, MAX_CELLS)
    assert bucket_of(2, MAX_CELLS) is None  # too big for a graph: eager


@pytest.mark.parametrize("rows,frames", [(1, 70), (3, 70), (2, 128), (5, 150)])
def test_a_padded_bucket_gives_each_row_what_the_eager_solve_gives(model, rows, frames):
    cfm = model.s3gen.flow.decoder
    call = padded_call(rows=rows, frames=frames, seed=rows + frames)
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        expected = eager(cfm, call)
        ours = graphed(graphs, call)
    assert ours.shape == expected.shape == (rows, 80, frames)
    mask = call[2]
    # Only the frames each row owns are read by callers (the rest is masked noise).
    assert ((ours - expected) * mask).abs().max() < 1e-4
    assert graphs.replays == 1 and graphs.eager == 0 and graphs.graphs == 1


def test_a_bucket_reused_by_a_smaller_call_keeps_nothing_of_the_larger(model):
    """The second call leaves rows and frames of the first in the bucket's buffers; they
    must be cleared: a NaN there would not stay masked (0 x NaN is NaN)."""
    cfm = model.s3gen.flow.decoder
    big, small = padded_call(rows=4, frames=120, seed=1), padded_call(rows=3, frames=90, seed=2)
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        graphed(graphs, big)
        [bucket] = graphs._buckets.values()
        for buffer in (bucket.x, bucket.mu, bucket.cond, bucket.spks):
            buffer.fill_(float("nan"))  # the worst a previous call could leave
        again = graphed(graphs, small)
        fresh = graphed(FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0), small)
    assert graphs.graphs == 1 and graphs.replays == 2
    assert torch.equal(again, fresh)
    assert torch.isfinite(again).all()


def test_the_least_recently_used_bucket_goes_past_the_limit(model):
    cfm = model.s3gen.flow.decoder
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, max_graphs=2, capture_after=0)
    calls = [padded_call(rows=1, frames=f, seed=f) for f in (60, 100, 60, 140)]
    with torch.inference_mode():
        results = [graphed(graphs, c) for c in calls]
        expected = [eager(cfm, c) for c in calls]
    assert graphs.graphs == 2
    assert [key[:2] for key in graphs._buckets] == [(1, 64), (1, 192)]  # 128 went, 64 was used again
    for ours, reference, call in zip(results, expected, calls):
        assert ((ours - reference) * call[2]).abs().max() < 1e-4


def test_steps_have_buckets_of_their_own(model):
    cfm = model.s3gen.flow.decoder
    call = padded_call(rows=1, frames=60)
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        for steps in (4, 2):
            ours = graphed(graphs, call, steps)
            assert (ours - eager(cfm, call, steps)).abs().max() < 1e-4
    assert graphs.graphs == 2


def test_a_call_too_big_for_a_graph_runs_eagerly(model, monkeypatch):
    monkeypatch.setattr("chatterbox_worker.engine.flow_graphs.MAX_CELLS", 64)
    cfm = model.s3gen.flow.decoder
    call = padded_call(rows=2, frames=40)
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        assert torch.equal(graphed(graphs, call), eager(cfm, call))
    assert graphs.eager == 1 and graphs.graphs == 0


def test_a_torch_that_cannot_capture_falls_back_to_eager_for_good(model, caplog):
    """On this CPU the capture fails as it starts (no CUDA stream to run on): the call
    still gets the eager solve, and later calls do not try again."""
    cfm = model.s3gen.flow.decoder
    call = padded_call(rows=2, frames=50)
    graphs = FlowGraphs(cfm, meanflow=False, capture=True, capture_after=0)
    with caplog.at_level(logging.ERROR), torch.inference_mode():
        first = graphed(graphs, call)
        second = graphed(graphs, call)
    assert torch.equal(first, eager(cfm, call)) and torch.equal(second, first)
    assert not graphs.enabled and graphs.graphs == 0 and graphs.eager == 2
    assert sum("capture of the vocoder's flow solve failed" in r.message for r in caplog.records) == 1


def test_turbos_mean_flow_solve_runs_in_buckets_too(turbo_engine):
    cfm = turbo_engine.model.s3gen.flow.decoder
    x, mu, mask, spks, cond = call = padded_call(rows=3, frames=70, seed=9)
    graphs = FlowGraphs(cfm, meanflow=True, capture=False, capture_after=0)
    with torch.inference_mode():
        ours = graphs.solve(x, mu, mask, spks, cond, steps=2)
        t_span = time_span(2, meanflow=True, device="cpu", dtype=torch.float32)
        expected = solve(cfm, x, t_span, mu, mask, spks, cond, meanflow=True)
    assert ((ours - expected) * call[2]).abs().max() < 1e-4


def test_vocoder_calls_through_buckets_equal_their_eager_calls(engine):
    """Whole vocoder calls (encoder, bucketed solve, HiFT) of other lengths in one batch."""
    model, voice = engine.model, engine.builtin_voice
    works = [work(model, voice, 1, 12), work(model, voice, 2, 30, prompt_tokens=40),
             work(model, voice, 3, 21, prompt_tokens=25)]
    graphs = FlowGraphs(model.s3gen.flow.decoder, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        expected = flow_mels_batch(model, works, STEPS)
        ours = flow_mels_batch(model, works, STEPS, graphs)
        audio = vocode_batch(model, works, STEPS, graphs=graphs)
        eager_audio = vocode_batch(model, works, STEPS)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4
    for (a, _), (b, _) in zip(audio, eager_audio):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-3
    assert graphs.replays == 2


def test_the_engine_uses_graphs_on_cuda_only(engine):
    assert engine.flow_graphs is None  # this CPU: the eager solve, bit for bit upstream's


def test_warm_up_prepares_the_bucket_of_a_streams_first_chunk(engine, monkeypatch):
    """On CUDA the first job's first chunk then replays a graph instead of waiting for a capture."""
    from chatterbox_worker.engine.vocoder import LOOKAHEAD_TOKENS, MELS_PER_TOKEN, Prompt, StreamSchedule

    graphs = FlowGraphs(engine.model.s3gen.flow.decoder, meanflow=False, capture=False)
    monkeypatch.setattr(engine, "flow_graphs", graphs)
    engine.warm_up()
    _, gen = engine.builtin_voice.for_request(0.5)
    schedule = StreamSchedule()
    prompt_frames = Prompt.from_gen(gen).last(schedule.prompt_tokens).feat.shape[1]
    first_call = prompt_frames + MELS_PER_TOKEN * (schedule.chunk_size(0) + LOOKAHEAD_TOKENS)
    assert bucket_of(1, first_call) in [key[:2] for key in graphs._buckets]
    assert graphs.replays >= 2  # the one-shot take's call and the stream's


def test_a_bucket_is_made_on_its_second_use_the_first_runs_eagerly(model):
    """One-off shapes (a one-shot take of an unusual length) never pay a capture."""
    cfm = model.s3gen.flow.decoder
    call = padded_call(rows=2, frames=70)
    graphs = FlowGraphs(cfm, meanflow=False, capture=False)
    with torch.inference_mode():
        first = graphed(graphs, call)
        assert torch.equal(first, eager(cfm, call))  # unpadded: the eager solve itself
        assert graphs.graphs == 0 and graphs.eager == 1
        second = graphed(graphs, call)
    assert graphs.graphs == 1 and graphs.replays == 1
    assert ((second - first) * call[2]).abs().max() < 1e-4


def test_held_buckets_are_bounded_by_their_cells_too(model, monkeypatch):
    monkeypatch.setattr("chatterbox_worker.engine.flow_graphs.MAX_HELD_CELLS", 3 * 128)
    cfm = model.s3gen.flow.decoder
    graphs = FlowGraphs(cfm, meanflow=False, capture=False, capture_after=0)
    with torch.inference_mode():
        for rows in (1, 2, 1):  # 128 + 256 cells: the 384 allowed
            graphed(graphs, padded_call(rows=rows, frames=100 + rows))
        graphed(graphs, padded_call(rows=4, frames=60))  # 256 more: the oldest, (2, 128), goes
    assert [key[:2] for key in graphs._buckets] == [(1, 128), (4, 64)]


@pytest.mark.parametrize("shortage", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")])
def test_out_of_memory_while_capturing_is_the_callers_to_handle(model, monkeypatch, shortage):
    """Not the graph's fault: the error goes to the vocoder batcher (which reruns a batch's
    calls alone), graphs stay on and the bucket is not kept half made."""
    cfm = model.s3gen.flow.decoder
    graphs = FlowGraphs(cfm, meanflow=False, capture=True, capture_after=0)

    def short(bucket):
        raise shortage

    monkeypatch.setattr(graphs, "_prepare", short)
    with torch.inference_mode(), pytest.raises(type(shortage)):
        graphed(graphs, padded_call(rows=2, frames=50))
    assert graphs.enabled and graphs.graphs == 0


def test_the_solve_reads_nothing_from_the_host_nor_makes_tensors_there(model, turbo_engine):
    """On the meta device any read of a value fails and any tensor made on the CPU inside
    the solve meets the inputs on another device: what a graph capture needs."""
    import copy

    for cfm, meanflow, steps in ((model.s3gen.flow.decoder, False, 3),
                                 (turbo_engine.model.s3gen.flow.decoder, True, 2)):
        meta = copy.deepcopy(cfm).to("meta")
        x, mu, mask, spks, cond = (t.to("meta") for t in padded_call(rows=2, frames=40))
        t_span = time_span(steps, meanflow=meanflow, device="meta", dtype=torch.float32)
        with torch.inference_mode():
            out = solve(meta, x, t_span, mu, mask, spks, cond, meanflow=meanflow)
        assert out.device.type == "meta" and out.shape == x.shape

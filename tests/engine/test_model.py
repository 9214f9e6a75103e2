"""Loading the model (``engine.model``): what a load leaves in memory, and what an int8 load serves."""

import gc

import pytest
import torch

from chatterbox_worker.engine.model import ROTARY_BUFFERS, load_model
from chatterbox_worker.engine.weights import WeightSource


def _float_linears():
    return {id(o) for o in gc.get_objects() if type(o) is torch.nn.Linear}


def test_an_int8_load_leaves_no_replaced_float_layer_behind(tiny_checkpoint):
    """``quantize_dynamic`` leaves each float Linear it replaces in a reference cycle: at the
    released size T3's float32 weights (2 GB) stayed resident beside their int8 copies.
    With the collector off, only the load's own collection can free them."""
    gc.collect()
    before = _float_linears()
    gc.disable()
    try:
        model = load_model(WeightSource(tiny_checkpoint, "model_dir"), variant="original",
                           device="cpu", t3_dtype="int8")
        kept = {id(m) for m in model.t3.modules() if type(m) is torch.nn.Linear}
        left = _float_linears() - before - kept
    finally:
        gc.enable()
    assert not any(type(m) is torch.nn.Linear for m in model.t3.tfmr.modules())  # all int8
    # What the load made and the model does not hold: the S3Gen and voice encoder Linears
    # the model holds are excluded through the model's modules.
    held = {id(m) for part in (model.s3gen, model.voice_encoder) for m in part.modules()}
    assert not (left - held)


def test_an_int8_model_serves_concurrent_streams_and_takes(tiny_checkpoint):
    """CPU's fast configuration end to end: int8 T3 on the fast decoder, vocoder batching on
    (``CHATTERBOX_VOCODER_BATCH=on``), four jobs at once, streamed and one-shot. Random weights make any rounding
    flip a token, so batched tokens may differ from alone: the checks are structure and
    repeatability, with the vocoder's batches counted."""
    import threading

    import numpy as np

    from chatterbox_worker.engine import SynthesisRequest
    from chatterbox_worker.engine.synthesis import Engine

    model = load_model(WeightSource(tiny_checkpoint, "model_dir"), variant="original",
                       device="cpu", t3_dtype="int8")
    assert not Engine(model, watermark=False, max_batch=4).batch_vocoder  # auto: CUDA only
    engine = Engine(model, watermark=False, max_batch=4, batch_vocoder=True)
    assert engine.decoder_kind == "fast" and engine.batch_vocoder

    def request(seed):
        return SynthesisRequest(text="Four at once on the fast path.", voice=engine.builtin_voice,
                                seed=seed)

    alone = engine.synthesize(request(1), max_tokens=40).audio
    assert np.array_equal(alone, engine.synthesize(request(1), max_tokens=40).audio)
    results = {}

    def job(i):
        if i % 2:
            results[i] = engine.synthesize(request(i), max_tokens=40).audio
        else:
            results[i] = np.concatenate(list(engine.stream(request(i), max_tokens=40)))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for audio in results.values():
        assert audio.dtype == np.float32 and 0 < len(audio) <= 40 * 960 + 24000
        assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert engine.vocoder_calls.rows >= engine.vocoder_calls.batches > 0


@pytest.mark.parametrize("variant", ["original", "turbo", "multilingual"])
def test_skipping_random_init_loads_the_very_same_model(request, monkeypatch, variant):
    """Every parameter and buffer (computed ones included: mel filters, windows, rotary
    tables) equals what a load that first draws random weights ends with."""
    import contextlib

    from chatterbox_worker.engine import architecture

    checkpoint = request.getfixturevalue({"original": "tiny_checkpoint", "turbo": "turbo_checkpoint",
                                          "multilingual": "multilingual_checkpoint"}[variant])
    source = WeightSource(checkpoint, "model_dir")
    fast = load_model(source, variant=variant, device="cpu")
    from chatterbox_worker.engine import model as model_module

    for module in (architecture, model_module):
        monkeypatch.setattr(module, "skip_random_init", contextlib.nullcontext)
    drawn = load_model(source, variant=variant, device="cpu")
    for part in ("t3", "s3gen", "voice_encoder"):
        ours, theirs = getattr(fast, part), getattr(drawn, part)
        for kind in ("named_parameters", "named_buffers"):
            a, b = dict(getattr(ours, kind)()), dict(getattr(theirs, kind)())
            assert a.keys() == b.keys() and (a or kind == "named_buffers"), (part, kind)
            different = [name for name in a if not torch.equal(a[name], b[name])]
            assert different == [], (part, kind, different[:5])


def test_random_init_is_skipped_while_building_and_only_then():
    from chatterbox_worker.engine.architecture import skip_random_init

    weight = torch.full((3, 3), 7.0)
    with skip_random_init():
        torch.nn.init.kaiming_uniform_(weight)
    assert (weight == 7.0).all()
    torch.nn.init.kaiming_uniform_(weight)
    assert not (weight == 7.0).any()


def test_a_bfloat16_t3_keeps_its_rotary_frequencies_in_float32(tiny_checkpoint):
    """``.to(bfloat16)`` would round the rotary frequencies with the weights; positions far
    into a take would then be rotated by the wrong angles (up to 1.4 rad at 1500)."""
    source = WeightSource(tiny_checkpoint, "model_dir")
    exact = dict(load_model(source, variant="original", device="cpu").t3.named_buffers())
    t3 = load_model(source, variant="original", device="cpu", t3_dtype="bfloat16").t3
    rotary = {n: b for n, b in t3.named_buffers() if n.rpartition(".")[2] in ROTARY_BUFFERS}
    assert rotary and t3.speech_emb.weight.dtype == torch.bfloat16
    for name, buffer in rotary.items():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, exact[name]), name
    assert all(p.dtype == torch.bfloat16 for p in t3.tfmr.parameters())

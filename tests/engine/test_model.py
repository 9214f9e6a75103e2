"""Loading the model (``engine.model``): what a load leaves in memory, and what an int8 load serves."""

import gc

import torch

from chatterbox_worker.engine.model import load_model
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

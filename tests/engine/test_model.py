"""Loading the model (``engine.model``): what a load leaves in memory."""

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

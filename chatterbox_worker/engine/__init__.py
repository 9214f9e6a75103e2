"""Model loading, the decode loop, vocoding: everything that touches Chatterbox internals.

Importing this package is cheap: the heavy upstream modules load in
``load_engine``, not at import.
"""

from __future__ import annotations

import logging
import os
import time

from ..config import Settings
from .architecture import default_device
from .quiet import filter_third_party_warnings
from .decode import SamplingParams
from .synthesis import Cancelled, Engine, Synthesis, SynthesisRequest
from .vocoder import StreamSchedule
from .variants import variant as variant_spec, weight_files
from .weights import locate_weights

log = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """Find the weights (``ConfigError`` naming every source tried), load them, warm up."""
    filter_third_party_warnings()
    from .model import load_model

    started = time.perf_counter()
    device = default_device(settings.device)
    if device == "cpu" and settings.device == "auto" and os.environ.get("RUNPOD_POD_ID"):
        # On RunPod a CPU fallback is almost always a host whose NVIDIA driver
        # is too old for the shipped torch: say so, loudly, before a slow start.
        log.warning("no usable CUDA device on this RunPod worker: running on the CPU, far "
                    "slower than real time. The image's torch needs NVIDIA driver 580 or "
                    "newer (CUDA 13.0); set CHATTERBOX_DEVICE=cuda to fail instead")
    source = locate_weights(settings.variant, model_dir=settings.model_dir,
                            baked_dir=settings.baked_model_dir,
                            volume_hf_cache=settings.volume_hf_cache,
                            files=weight_files(settings.variant, mtl_t3=settings.mtl_t3))
    model = load_model(source, variant=settings.variant, device=device,
                       t3_dtype=settings.resolved_dtype)
    flow_steps = settings.flow_steps or variant_spec(settings.variant).flow_steps
    engine = Engine(model, watermark=settings.watermark, max_batch=settings.concurrency,
                    cuda_graphs=settings.cuda_graphs, flow_steps=flow_steps,
                    batch_vocoder={"auto": None, "on": True, "off": False}[settings.vocoder_batch])
    log.info("model %s loaded from %s (%s) on %s, T3 %s, %s decoder, vocoder batching %s, "
             "in %.1fs", model.signature, source.source, source.directory, device,
             settings.resolved_dtype, engine.decoder_kind, "on" if engine.batch_vocoder else "off",
             time.perf_counter() - started)
    if settings.warmup:
        took = engine.warm_up()
        if took is None:
            log.info("no built-in voice in the checkpoint: warm-up skipped")
        else:
            log.info("warm-up synthesis took %.2fs", took)
    return engine


__all__ = ["Cancelled", "Engine", "SamplingParams", "StreamSchedule", "Synthesis", "SynthesisRequest",
           "load_engine"]

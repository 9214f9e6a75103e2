"""Speech tokens -> 24 kHz audio with S3Gen, and the Perth watermark.

One-shot vocoding runs upstream's ``S3Gen.inference`` on the whole token
sequence, as ``ChatterboxTTS.generate`` does. S3Gen draws its flow-matching
noise and its sine-source phases from torch's global generator, so each call
runs inside ``fork_rng`` seeded from the request: the same seed gives the
same audio, and no request disturbs the global generator for anyone else.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

SPEECH_VOCAB_SIZE = 6561  # ids at or above this are special (start/stop/unused)


def speakable(tokens) -> torch.Tensor:
    """Keep only real speech ids; S3Gen cannot vocode T3's special tokens."""
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    return t[t < SPEECH_VOCAB_SIZE]


@contextlib.contextmanager
def seeded(seed: int, device: str):
    devices = [torch.device(device).index or 0] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.inference_mode()
def vocode(model, tokens: torch.Tensor, gen: dict, *, seed: int) -> np.ndarray:
    """Float32 mono audio at 24 kHz for ``tokens`` spoken in the voice of ``gen``."""
    tokens = speakable(tokens).to(model.device)
    if tokens.numel() == 0:
        return np.zeros(0, dtype=np.float32)
    with seeded(seed, model.device):
        # S3Gen casts the ref dict in place: give it a copy of the request's.
        wav, _ = model.s3gen.inference(speech_tokens=tokens, ref_dict=dict(gen))
    return wav.squeeze(0).detach().float().cpu().numpy()


class Watermarker:
    """Upstream's Perth implicit watermark, applied to whole takes."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._perth = None
        if enabled:
            import perth

            # Perth announces itself on stdout; the worker keeps stdout for results.
            with contextlib.redirect_stdout(sys.stderr):
                self._perth = perth.PerthImplicitWatermarker()

    def apply(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if not self.enabled or audio.size == 0:
            return audio
        # Perth leaks memory when called outside inference mode.
        with torch.inference_mode():
            marked = self._perth.apply_watermark(audio, sample_rate=sample_rate)
        return np.asarray(marked, dtype=np.float32)

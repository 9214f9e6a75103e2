"""HiFT, S3Gen's mel-to-waveform vocoder, with its noise drawn from per-call generators.

Upstream's ``HiFTGenerator.inference`` draws its sine source's random phases
and noise from torch's *global* generators. That made every vocoder call
fork and reseed global state under a lock, and it made calls of different
streams impossible to batch: one global stream of random numbers cannot give
each row what it would have drawn alone. Here each call (each row of a batch)
brings its own seed; ``sine_source`` draws the same numbers upstream draws
after ``torch.manual_seed(seed)``, in the same order, so a call alone equals
upstream's call for that seed (tested), and a row of a batch gets exactly its
own noise.

Batching rows (``hift_batch``) pays on CUDA, where a HiFT call is a few
thousand short kernel launches whatever its batch. On a CPU HiFT is bound by
arithmetic: a batch costs what its rows cost alone or more (measured: four
full-size rows 3.4 s together, 2.3 s one by one), and its rows equal their
calls alone only up to rounding, so ``Engine`` batches HiFT on CUDA only.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

SEED_MODULUS = 2**63


class NoiseSource:
    """The random numbers of one HiFT call, as upstream draws them after ``torch.manual_seed``.

    Upstream draws the phases on the CPU (``Uniform`` samples there, then
    moves them) and the noise on the model's device, each from that device's
    global generator; both are seeded by ``torch.manual_seed``.
    """

    def __init__(self, seed: int, device: torch.device):
        seed %= SEED_MODULUS
        self.device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(seed)
        self.on_device = (self.cpu if self.device.type == "cpu"
                          else torch.Generator(device=self.device).manual_seed(seed))

    def phases(self, harmonics: int) -> torch.Tensor:
        """(1, harmonics, 1) on the host: ``Uniform(-pi, pi).sample`` with upstream's float32 bounds."""
        low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
        rand = torch.rand((1, harmonics, 1), generator=self.cpu)
        return low + rand * (high - low)

    def normal(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=self.on_device, device=self.device, dtype=dtype)


def sine_source(m_source, f0: torch.Tensor, noises: Sequence[NoiseSource],
                phases: torch.Tensor) -> torch.Tensor:
    """Upstream's ``SourceModuleHnNSF.forward`` (with ``SineGen.forward``), row ``r``'s
    random numbers from ``noises[r]`` (its phases drawn first: ``phases``, on the device):
    the merged source (B, T, 1) for f0 (B, T, 1)."""
    gen = m_source.l_sin_gen
    f0 = f0.transpose(1, 2)  # (B, 1, T)
    harmonics = gen.harmonic_num + 1
    f_mat = torch.zeros((f0.size(0), harmonics, f0.size(-1)), device=f0.device)
    for i in range(harmonics):  # upstream's loop, for upstream's rounding
        f_mat[:, i:i + 1, :] = f0 * (i + 1) / gen.sampling_rate
    theta = 2 * np.pi * (torch.cumsum(f_mat, dim=-1) % 1)
    phase = phases.clone()
    phase[:, 0, :] = 0
    sine = gen.sine_amp * torch.sin(theta + phase)
    uv = gen._f02uv(f0)
    noise_amp = uv * gen.noise_std + (1 - uv) * gen.sine_amp / 3
    row_shape = (1,) + tuple(sine.shape[1:])
    drawn = torch.cat([noise.normal(row_shape, sine.dtype) for noise in noises])
    sine = sine * uv + noise_amp * drawn
    # Upstream then draws a noise branch it returns and HiFT discards; nothing
    # draws from these generators after it, so it is not drawn here.
    return m_source.l_tanh(m_source.l_linear(sine.transpose(1, 2)))


@torch.inference_mode()
def hift_batch(model, mels: torch.Tensor, seeds: Sequence[int],
               cache_sources: Sequence[Optional[torch.Tensor]]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Upstream's ``HiFTGenerator.inference`` for mels (B, 80, F), row ``r`` seeded
    ``seeds[r]`` and carrying ``cache_sources[r]`` over: (audio (N,), source) per row."""
    s3gen = model.s3gen
    vocoder = s3gen.mel2wav
    feat = mels.to(s3gen.dtype)
    noises = [NoiseSource(seed, feat.device) for seed in seeds]
    # Drawn on the host and copied once, before this call queues any kernel (a copy
    # from pageable memory waits for the device's queue). Each generator still
    # draws its phases before its noise, as upstream.
    harmonics = vocoder.m_source.l_sin_gen.harmonic_num + 1
    phases = torch.cat([noise.phases(harmonics) for noise in noises]).to(feat.device)
    f0 = vocoder.f0_predictor(feat)
    upsampled = vocoder.f0_upsamp(f0[:, None]).transpose(1, 2)
    source = sine_source(vocoder.m_source, upsampled, noises, phases).transpose(1, 2)
    for row, cache in enumerate(cache_sources):
        if cache is not None and cache.shape[2]:  # continuity with the previous chunk
            source[row, :, :cache.shape[2]] = cache[0]
    wav = vocoder.decode(x=feat, s=source)
    return [(wav[row], source[row:row + 1]) for row in range(wav.shape[0])]


def hift(model, mels: torch.Tensor, cache_source: Optional[torch.Tensor] = None, *,
         seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """HiFT for one call: (audio (N,), source) for mels (1, 80, F)."""
    return hift_batch(model, mels, [seed], [cache_source])[0]


__all__ = ["NoiseSource", "hift", "hift_batch", "sine_source"]

"""Fixtures shared by the engine's tests."""

import pytest
import torch


@pytest.fixture
def quiet_source(monkeypatch):
    """HiFT's excitation without its random phases and noise, in one-shot and streamed takes
    alike: what is left of their difference is what chunking does (flow context, seams)."""
    from chatterbox_worker.engine.hift import NoiseSource

    monkeypatch.setattr(NoiseSource, "phases", lambda self, harmonics: torch.zeros(1, harmonics, 1))
    monkeypatch.setattr(NoiseSource, "normal", lambda self, shape, dtype: torch.zeros(shape, dtype=dtype))

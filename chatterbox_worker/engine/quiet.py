"""Third-party warnings the model path triggers, filtered by name with the reason.

Our own code runs clean under ``python -W error``; these come from upstream
packages we pin and cannot change, on every import or every generate.
"""

from __future__ import annotations

import warnings

THIRD_PARTY_WARNINGS = [
    # resemble-perth imports pkg_resources (hence setuptools<81 in the lock).
    (UserWarning, r"pkg_resources is deprecated"),
    # chatterbox's S3Gen builds diffusers' LoRACompatibleLinear; harmless at inference.
    (FutureWarning, r".*LoRACompatibleLinear.* is deprecated"),
    # upstream's attention code uses the old SDPA context manager.
    (FutureWarning, r"`torch.backends.cuda.sdp_kernel\(\)` is deprecated"),
    # librosa -> audioread imports these stdlib modules, deprecated in 3.11.
    (DeprecationWarning, r"'(aifc|audioop|sunau)' is deprecated"),
    # transformers' GPT2Tokenizer (Turbo's) builds its BPE from vocab.json/merges.txt paths.
    (DeprecationWarning, r"Deprecated in 0.9.0: BPE.__init__ will not create from files"),
    # The int8 T3 format (CPU) is torch's eager dynamic quantisation: deprecated in favour of
    # torchao, still shipped and working in the pinned torch (tests/engine/test_model.py
    # loads it); moving to torchao is due before a torch that removes it is pinned.
    (DeprecationWarning, r"torch.ao.quantization is deprecated"),
    (UserWarning, r"torch.quantize_per_tensor, torch.quantize_per_channel and other quantized"),
]


def filter_third_party_warnings() -> None:
    for category, message in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

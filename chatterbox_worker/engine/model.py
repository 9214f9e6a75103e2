"""Loading a Chatterbox checkpoint into upstream modules, once per worker.

``ChatterboxModel`` holds the four upstream parts (T3, S3Gen, voice encoder,
text tokenizer), the built-in voice and the facts a voice file must match
(variant and signature). It keeps no per-request state: conditionals are
passed in by each request, never stored here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError, excerpt, reason
from .architecture import ModelSizes, build_s3gen, build_t3, build_voice_encoder
from .weights import WeightSource, required_files

log = logging.getLogger(__name__)


def model_signature(variant: str, directory: Path) -> str:
    """A short id of exactly these weights, cheap to compute on multi-GB files.

    Hashes each weight file's name, size, and first and last MiB (safetensors
    files start with a header listing every tensor's shape and offset), so two
    checkpoints of one layout but other weights get other signatures.
    """
    digest = hashlib.sha256(variant.encode())
    for name in required_files(variant):
        path = directory / name
        size = path.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return f"chatterbox-{variant}-{digest.hexdigest()[:16]}"


@dataclass
class ChatterboxModel:
    variant: str
    device: str
    t3: torch.nn.Module
    s3gen: torch.nn.Module
    voice_encoder: torch.nn.Module
    tokenizer: object
    builtin_voice: Optional[object]  # upstream Conditionals, or None
    signature: str
    source: WeightSource
    sizes: ModelSizes = field(default_factory=ModelSizes)

    def describe(self) -> dict:
        return {"variant": self.variant, "signature": self.signature, "t3_format": t3_format(self.t3),
                "source": self.source.source, "builtin_voice": self.builtin_voice is not None,
                "size": "released" if self.sizes.is_released else "shrunk (test checkpoint)"}


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise ConfigError(f"cannot read {path.name}: {reason(exc, 200)}") from None


def _load_state(module: torch.nn.Module, state: dict, name: str, *, strict: bool = True,
                allowed_missing: tuple = ()) -> None:
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise ConfigError(f"{name} does not fit the {type(module).__name__} model: "
                          f"{excerpt(' '.join(first[:2]), 300)}") from None
    if not strict:
        missing = [k for k in result.missing_keys if not k.endswith(allowed_missing)]
        if missing:
            raise ConfigError(f"{name} lacks {len(missing)} weights, e.g. {missing[:3]}")


def set_t3_format(t3: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """T3 in the weight format ``dtype`` (``float32``, ``bfloat16`` or ``int8``), in place.

    int8 is dynamic quantisation (int8 weights, activations quantised per
    step) of the backbone's linear layers and the speech head, for CPU: T3's
    decode reads every weight once per token, so smaller weights are faster.
    Embeddings, norms and the conditioning encoder stay float32.
    """
    if dtype == "float32":
        return t3
    if dtype == "bfloat16":
        return t3.to(torch.bfloat16)
    if dtype == "int8":
        from torch.ao.quantization import quantize_dynamic

        # In place: each layer's float weights are freed as it is swapped,
        # so the peak stays near one float32 copy of T3.
        quantize_dynamic(t3.tfmr, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        t3.speech_head = quantize_dynamic(torch.nn.Sequential(t3.speech_head), {torch.nn.Linear},
                                          dtype=torch.qint8)[0]
        return t3
    raise ValueError(f"unknown T3 weight format {dtype!r}")


def t3_format(t3: torch.nn.Module) -> str:
    """The weight format ``set_t3_format`` gave ``t3``."""
    if not isinstance(getattr(t3.speech_head, "weight", None), torch.Tensor):
        return "int8"
    return "bfloat16" if t3.speech_emb.weight.dtype == torch.bfloat16 else "float32"


def load_model(source: WeightSource, *, variant: str, device: str,
               t3_dtype: str = "float32") -> ChatterboxModel:
    """Build the upstream modules and load ``source`` into them (``ConfigError`` on any mismatch).

    ``t3_dtype`` is T3's weight format (``set_t3_format``); S3Gen and the voice encoder stay float32.
    """
    if t3_dtype == "int8" and device != "cpu":
        raise ConfigError("the int8 T3 format runs on CPU only; use bfloat16 on CUDA")
    from chatterbox.models.tokenizers import EnTokenizer
    from chatterbox.tts import Conditionals

    directory = source.directory
    try:
        sizes = ModelSizes.load(directory)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{directory}: {exc}") from None

    ve = build_voice_encoder(sizes)
    _load_state(ve, _load_safetensors(directory / "ve.safetensors"), "ve.safetensors")

    t3 = build_t3(sizes)
    t3_state = _load_safetensors(directory / "t3_cfg.safetensors")
    if "model" in t3_state:  # some exports nest the state dict, as upstream allows
        t3_state = t3_state["model"][0]
    _load_state(t3, t3_state, "t3_cfg.safetensors")
    del t3_state  # the module holds its own copy; do not keep a second one through loading

    s3gen = build_s3gen(sizes)
    # Upstream loads S3Gen non-strictly: the tokenizer's mel filters and window
    # are computed, not stored. Anything else missing is a broken checkpoint.
    _load_state(s3gen, _load_safetensors(directory / "s3gen.safetensors"), "s3gen.safetensors",
                strict=False, allowed_missing=("_mel_filters", "window", "trim_fade"))

    try:
        tokenizer = EnTokenizer(str(directory / "tokenizer.json"))
    except Exception as exc:
        raise ConfigError(f"cannot read tokenizer.json: {reason(exc, 200)}") from None

    for module in (ve, t3, s3gen):
        module.to(device).eval()
    set_t3_format(t3, t3_dtype)

    builtin = None
    conds_path = directory / "conds.pt"
    if conds_path.exists():
        try:
            builtin = Conditionals.load(conds_path, map_location="cpu").to(device)
        except Exception as exc:
            raise ConfigError(f"cannot read conds.pt (built-in voice): {reason(exc, 200)}") from None

    return ChatterboxModel(
        variant=variant, device=device, t3=t3, s3gen=s3gen, voice_encoder=ve,
        tokenizer=tokenizer, builtin_voice=builtin,
        signature=model_signature(variant, directory), source=source, sizes=sizes)


__all__ = ["ChatterboxModel", "load_model", "model_signature", "set_t3_format", "t3_format"]

"""Loading a Chatterbox checkpoint into upstream modules, once per worker.

``ChatterboxModel`` holds the four upstream parts (T3, S3Gen, voice encoder,
text tokenizer), the built-in voice and the facts a voice file must match
(variant and signature). It keeps no per-request state: conditionals are
passed in by each request, never stored here.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

from ..errors import ConfigError, excerpt, reason
from .architecture import ModelSizes, build_s3gen, build_t3, build_voice_encoder, skip_random_init
from .turbo import load_turbo
from .weights import WeightSource, required_files

log = logging.getLogger(__name__)


def model_signature(variant: str, directory: Path, files: Sequence[str] = ()) -> str:
    """A short id of exactly these weights, cheap to compute on multi-GB files.

    Hashes each weight file's name, size, and first and last MiB (safetensors
    files start with a header listing every tensor's shape and offset), so two
    checkpoints of one layout but other weights get other signatures.
    ``files``: the weight files loaded, when not the variant's default set
    (``WeightSource.files``).
    """
    digest = hashlib.sha256(variant.encode())
    for name in files or required_files(variant):
        path = directory / name
        size = path.stat().st_size
        digest.update(f"{name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return f"chatterbox-{variant}-{digest.hexdigest()[:16]}"


class EnglishText:
    """The original model's text path: upstream's ``punc_norm``, then its English tokenizer.

    Called as ``text_encoder(text, language)``: (1, L) token ids with T3's
    start and stop text tokens around them, on the CPU."""

    def __init__(self, tokenizer, hp):
        self.tokenizer = tokenizer
        self.start, self.stop = hp.start_text_token, hp.stop_text_token

    def __call__(self, text: str, language: str = "en") -> torch.Tensor:
        from chatterbox.tts import punc_norm

        tokens = self.tokenizer.text_to_tokens(punc_norm(text)).long().reshape(1, -1)
        return with_text_ends(tokens, self.start, self.stop)


def with_text_ends(tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(1, L + 2): T3's start-of-text token, ``tokens`` (1, L), its stop-of-text token."""
    return torch.cat([torch.full((1, 1), start, dtype=torch.long), tokens.long().cpu(),
                      torch.full((1, 1), stop, dtype=torch.long)], dim=1)


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
    # (text, language) -> (1, L) text token ids with start/stop; the variant's
    # own normalisation and tokenizer. None: the original model's (``EnglishText``).
    text_encoder: Optional[Callable[[str, str], torch.Tensor]] = None

    def __post_init__(self):
        if self.text_encoder is None:
            self.text_encoder = EnglishText(self.tokenizer, self.t3.hp)

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


# Buffers of HF's rotary embeddings (Llama) that must not be rounded with the weights.
ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


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
        # The rotary frequencies are buffers, and ``.to`` would round them too: at position
        # 1500 a bfloat16 frequency turns a query by up to 1.4 rad. HF's rotary embedding (and
        # FastDecoder's tables, made by it) compute in float32 from them: keep them float32.
        rotary = {name: buffer for name, buffer in t3.named_buffers()
                  if name.rpartition(".")[2] in ROTARY_BUFFERS}
        t3.to(torch.bfloat16)
        for name, buffer in rotary.items():
            owner, _, attribute = name.rpartition(".")
            setattr(t3.get_submodule(owner), attribute, buffer)
        return t3
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


def load_t3_weights(t3: torch.nn.Module, path: Path) -> None:
    """A T3 safetensors file into ``t3`` (``ConfigError`` on a mismatch)."""
    state = _load_safetensors(path)
    if "model" in state:  # some exports nest the state dict, as upstream allows
        state = state["model"][0]
    _load_state(t3, state, path.name)
    # The module holds its own copy; the caller's frame keeps no second one through loading.


def load_sizes(directory: Path) -> ModelSizes:
    try:
        return ModelSizes.load(directory)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{directory}: {exc}") from None


def load_builtin_voice(directory: Path, device: str):
    """The checkpoint's ``conds.pt`` as upstream ``Conditionals``, or None when it has none."""
    from chatterbox.tts import Conditionals

    conds_path = directory / "conds.pt"
    if not conds_path.exists():
        return None
    try:
        return Conditionals.load(conds_path, map_location="cpu").to(device)
    except Exception as exc:
        raise ConfigError(f"cannot read conds.pt (built-in voice): {reason(exc, 200)}") from None


def load_model(source: WeightSource, *, variant: str, device: str,
               t3_dtype: str = "float32") -> ChatterboxModel:
    """Build the upstream modules of ``variant`` and load ``source`` into them.

    ``ConfigError`` on any mismatch. ``t3_dtype`` is T3's weight format
    (``set_t3_format``); S3Gen and the voice encoder stay float32.
    """
    from .variants import variant as variant_spec

    variant_spec(variant)  # ConfigError for a variant this worker does not serve
    if t3_dtype == "int8" and device != "cpu":
        raise ConfigError("the int8 T3 format runs on CPU only; use bfloat16 on CUDA")
    model = LOADERS[variant](source, device=device, t3_dtype=t3_dtype)
    release_garbage()
    return model


def release_garbage() -> None:
    """Free what loading left in reference cycles, and hand freed heap back to the OS.

    ``quantize_dynamic`` leaves every float ``Linear`` it replaced in a cycle
    (torch.ao's qconfig closures hold the module): T3's float32 weights, 2 GB
    at the released size, stayed resident until the collector's next full
    pass, which a serving process may not make for hours (measured: 4.6 GB
    resident after an int8 load, 2.4 GB after this). ``malloc_trim`` returns
    the freed pages glibc would otherwise keep for later allocations.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the collector's work is what counts
        pass


def load_original(source: WeightSource, *, device: str, t3_dtype: str) -> ChatterboxModel:
    """The original English model (``ChatterboxTTS.from_local``'s files and modules)."""
    from chatterbox.models.tokenizers import EnTokenizer

    variant = "original"
    directory = source.directory
    sizes = load_sizes(directory)

    with skip_random_init():
        ve = build_voice_encoder(sizes)
    _load_state(ve, _load_safetensors(directory / "ve.safetensors"), "ve.safetensors")

    with skip_random_init():
        t3 = build_t3(sizes)
    load_t3_weights(t3, directory / "t3_cfg.safetensors")

    with skip_random_init():
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

    return ChatterboxModel(
        variant=variant, device=device, t3=t3, s3gen=s3gen, voice_encoder=ve,
        tokenizer=tokenizer, builtin_voice=load_builtin_voice(directory, device),
        signature=model_signature(variant, directory), source=source, sizes=sizes)


# Variant name -> loader(source, device=, t3_dtype=) -> ChatterboxModel.
LOADERS: Dict[str, Callable[..., ChatterboxModel]] = {"original": load_original,
                                                       "turbo": load_turbo}


def _load_multilingual(source: WeightSource, *, device: str, t3_dtype: str) -> ChatterboxModel:
    from .multilingual import load_multilingual

    return load_multilingual(source, device=device, t3_dtype=t3_dtype)


LOADERS["multilingual"] = _load_multilingual


__all__ = ["ChatterboxModel", "EnglishText", "LOADERS", "load_builtin_voice", "load_model",
           "load_t3_weights",
           "load_sizes", "model_signature", "release_garbage", "set_t3_format", "t3_format",
           "with_text_ends"]

"""The Chatterbox models a worker can serve, one per endpoint (``CHATTERBOX_VARIANT``).

A ``Variant`` is everything about a model that is not its weights: where its
files come from, which languages it speaks, the sampling defaults of its
upstream ``generate`` and the parameters it ignores. The loader of each
variant lives beside the others in ``model.LOADERS``; the random test
checkpoint writer in ``tiny_model.WRITERS``.

Values follow chatterbox-tts 0.1.7: ``ChatterboxTTS.generate`` (original),
``ChatterboxMultilingualTTS.generate`` (multilingual) and
``ChatterboxTurboTTS.generate`` (turbo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Tuple

from ..errors import ConfigError

# Every sampling field a generate request may carry, in the order the
# contract lists them.
SAMPLING_FIELDS = ("exaggeration", "cfg_weight", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty")

# ChatterboxMultilingualTTS.SUPPORTED_LANGUAGES (0.1.7).
MULTILINGUAL_LANGUAGES = ("ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja",
                         "ko", "ms", "nl", "no", "pl", "pt", "ru", "sv", "sw", "tr", "zh")


# CHATTERBOX_MTL_T3 -> the multilingual T3 weights file: v2 is what 0.1.7
# loads; v3 is newer upstream's opt-in checkpoint of the same architecture.
MULTILINGUAL_T3_FILES = {"v2": "t3_mtl23ls_v2.safetensors", "v3": "t3_mtl23ls_v3.safetensors"}


def _frozen(values: Mapping) -> Mapping:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class Variant:
    name: str
    title: str  # how users name the model
    hub_repo: str
    required_files: Tuple[str, ...]
    # What the variant's upstream generate uses when a field is not given.
    defaults: Mapping[str, float]
    optional_files: Tuple[str, ...] = ("conds.pt",)
    languages: Tuple[str, ...] = ("en",)
    # Fields the model does not use, with the one value that says so: a
    # request may omit them or send that value; anything else is refused
    # rather than silently dropped.
    ignored: Mapping[str, float] = field(default_factory=lambda: _frozen({}))
    # Where the variant's range is narrower than the contract's for all models.
    limits: Mapping[str, Tuple[float, float]] = field(default_factory=lambda: _frozen({}))
    min_reference_s: float = 0.0  # shortest reference clip a voice may be built from
    flow_steps: int = 10  # the vocoder's flow-matching steps upstream runs
    # How upstream's prepare_conditionals makes a voice: seconds of reference
    # T3's prompt is cut from (ENC_COND_LEN), and the loudness every reference
    # is first normalised to (None: left as cleaned).
    t3_prompt_seconds: float = 6.0
    reference_lufs: Optional[float] = None
    # Speech tokens upstream appends to T3's before vocoding (turbo: three of
    # S3GEN_SIL, so every take ends on the vocoder's silence).
    end_tokens: Tuple[int, ...] = ()
    served: bool = True  # False: known, but this worker cannot serve it yet

    def sampling(self, given: Mapping[str, Optional[float]]) -> Dict[str, float]:
        """Every sampling field: ``given`` where set, else this model's default.

        ``ValueError`` (a sentence naming the field and the model) for a value
        the model ignores or a value outside its own range.
        """
        out = {}
        for name in SAMPLING_FIELDS:
            value = given.get(name)
            if value is None:
                out[name] = self.defaults[name]
                continue
            if name in self.ignored and value != self.ignored[name]:
                raise ValueError(f"{name}: the {self.title} model does not use it; omit it or "
                                 f"send {self.ignored[name]:g}")
            low, high = self.limits.get(name, (None, None))
            if low is not None and not low <= value <= high:
                raise ValueError(f"{name}: must be a number from {low:g} to {high:g} for the "
                                 f"{self.title} model")
            out[name] = value
        return out


_ORIGINAL_DEFAULTS = {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8, "top_p": 1.0,
                      "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2}

VARIANTS: Mapping[str, Variant] = _frozen({
    "original": Variant(
        name="original", title="original (English)", hub_repo="ResembleAI/chatterbox",
        required_files=("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors",
                        "tokenizer.json"),
        defaults=_frozen(_ORIGINAL_DEFAULTS),
        ignored=_frozen({"top_k": 0}),
        limits=_frozen({"exaggeration": (0.25, 2.0)}),
    ),
    "multilingual": Variant(
        name="multilingual", title="multilingual", hub_repo="ResembleAI/chatterbox",
        required_files=("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt",
                        "grapheme_mtl_merged_expanded_v1.json", "Cangjie5_TC.json"),
        defaults=_frozen(dict(_ORIGINAL_DEFAULTS, repetition_penalty=2.0)),
        languages=MULTILINGUAL_LANGUAGES,
        ignored=_frozen({"top_k": 0}),
        limits=_frozen({"exaggeration": (0.25, 2.0)}),
    ),
    "turbo": Variant(
        name="turbo", title="turbo", hub_repo="ResembleAI/chatterbox-turbo",
        required_files=("ve.safetensors", "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors",
                        "vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                        "tokenizer_config.json"),
        defaults=_frozen({"exaggeration": 0.0, "cfg_weight": 0.0, "temperature": 0.8,
                          "top_p": 0.95, "top_k": 1000, "min_p": 0.0, "repetition_penalty": 1.2}),
        ignored=_frozen({"exaggeration": 0.0, "cfg_weight": 0.0, "min_p": 0.0}),
        min_reference_s=5.0,
        flow_steps=2,
        t3_prompt_seconds=15.0,
        reference_lufs=-27.0,
        end_tokens=(4299, 4299, 4299),
    ),
})


def variant(name: str) -> Variant:
    """The variant called ``name``; ``ConfigError`` naming the served ones otherwise."""
    spec = VARIANTS.get(name)
    served = [v.name for v in VARIANTS.values() if v.served]
    if spec is None or not spec.served:
        what = "is not served by this worker yet" if spec is not None else "is not a Chatterbox model"
        raise ConfigError(f"CHATTERBOX_VARIANT={name!r} {what}; use one of: {', '.join(served)}")
    return spec


def weight_files(name: str, *, mtl_t3: str = "v2") -> Tuple[str, ...]:
    """The files variant ``name`` loads: its required files, with the multilingual
    T3 file that ``CHATTERBOX_MTL_T3`` (``mtl_t3``) picks."""
    files = variant(name).required_files
    if name != "multilingual":
        return files
    default, chosen = MULTILINGUAL_T3_FILES["v2"], MULTILINGUAL_T3_FILES[mtl_t3]
    return tuple(chosen if f == default else f for f in files)


__all__ = ["MULTILINGUAL_LANGUAGES", "MULTILINGUAL_T3_FILES", "SAMPLING_FIELDS", "VARIANTS", "Variant",
           "variant", "weight_files"]

"""The multilingual Chatterbox model (upstream ``ChatterboxMultilingualTTS``): files, languages, text.

Its T3 is the original's Llama backbone with a 2454-entry grapheme vocabulary
(``T3Config.multilingual()``), so the decode loops, the scheduler and the
vocoder serve it unchanged; what differs is loading (``.pt`` state dicts, a
selectable T3 file) and text: upstream's own ``punc_norm``, a language tag in
front of the text, and per-language preprocessing.

Upstream's tokenizer reaches the Hugging Face Hub for ``Cangjie5_TC.json``
whenever it is built (``ChineseCangjieConverter`` calls ``hf_hub_download``)
and logs a warning on every call whose optional package is missing. Ours
reads the table from the checkpoint directory, decides once at load which
preprocessing steps can run here, and runs upstream's functions for those.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from ..errors import ConfigError, reason

log = logging.getLogger(__name__)

HUB_REPO = "ResembleAI/chatterbox"  # the original's repository; other files

# Upstream's SUPPORTED_LANGUAGES (mtl_tts.py), code -> name; a test keeps them equal.
LANGUAGES: Dict[str, str] = {
    "ar": "Arabic", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "fi": "Finnish", "fr": "French", "he": "Hebrew", "hi": "Hindi",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "ms": "Malay", "nl": "Dutch",
    "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ru": "Russian", "sv": "Swedish",
    "sw": "Swahili", "tr": "Turkish", "zh": "Chinese",
}

# Sampling defaults of upstream's ChatterboxMultilingualTTS.generate; only
# repetition_penalty differs from the original model's (1.2 there).
DEFAULTS = {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8, "top_p": 1.0,
            "min_p": 0.05, "repetition_penalty": 2.0}

# CHATTERBOX_MTL_T3 -> T3 weights file. v2 is what 0.1.7 loads; v3 is newer
# upstream's opt-in checkpoint of the same architecture.
T3_FILES = {"v2": "t3_mtl23ls_v2.safetensors", "v3": "t3_mtl23ls_v3.safetensors"}
TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
TEXT_VOCAB_SIZE = 2454  # T3Config.multilingual()


def required_files(t3_version: str = "v2") -> Tuple[str, ...]:
    """Every file a multilingual checkpoint needs, with the T3 file ``t3_version`` selects."""
    return ("ve.pt", T3_FILES[t3_version], "s3gen.pt", TOKENIZER_FILE, CANGJIE_FILE)


OPTIONAL_FILES = ("conds.pt",)


# -- text ---------------------------------------------------------------------


def _load_cangjie(path: Path):
    """Upstream's converter with its table read from ``path``, never from the Hub."""
    from chatterbox.models.tokenizers.tokenizer import ChineseCangjieConverter

    converter = ChineseCangjieConverter.__new__(ChineseCangjieConverter)
    converter.word2cj, converter.cj2word = {}, {}
    # Upstream segments words with spacy_pkuseg, whose model is downloaded at
    # run time (it is not in the wheel), so segmentation is off: the model
    # gets the Cangjie codes without spaces between words (README).
    converter.segmenter = None
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        for entry in entries:
            word, code = entry.split("\t")[:2]
            converter.word2cj[word] = code
            converter.cj2word.setdefault(code, []).append(word)
    except Exception as exc:
        raise ConfigError(f"cannot read {path.name} (Chinese Cangjie table): {reason(exc, 200)}") from None
    return converter


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class MultilingualTokenizer:
    """Upstream ``MTLTokenizer.encode``, step for step, without its network and log side effects.

    Lower case, NFKD, the language's preprocessing (Chinese: Cangjie codes;
    Japanese: kanji to hiragana with pykakasi; Korean: jamo), the language
    tag (``[fr]``), spaces as ``[SPACE]``, then the grapheme vocabulary.
    Hebrew diacritics (dicta_onnx) and Russian stress marks
    (russian_text_stresser) are not added: upstream 0.1.7 cannot run the
    first (it builds ``Dicta()`` without the model file it needs) and the
    second is not on PyPI; it skips both the same way when they fail.
    """

    def __init__(self, vocab_path: Path, cangjie_path: Path):
        from chatterbox.models.tokenizers.tokenizer import (EOT, SOT, MTLTokenizer,
                                                            korean_normalize)
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(str(vocab_path))
        except Exception as exc:
            raise ConfigError(f"cannot read {vocab_path.name}: {reason(exc, 200)}") from None
        vocab = self._tokenizer.get_vocab()
        if SOT not in vocab or EOT not in vocab:
            raise ConfigError(f"{vocab_path.name} lacks the {SOT} and {EOT} tokens")
        # Upstream's MTLTokenizer, built without its __init__ (which would
        # fetch the Cangjie table from the Hub): its preprocess_text is ours.
        self._upstream = MTLTokenizer.__new__(MTLTokenizer)
        self._upstream.tokenizer = self._tokenizer
        self._upstream.cangjie_converter = _load_cangjie(cangjie_path)
        self._kana_lock = threading.Lock()
        self.steps: Dict[str, Callable[[str], str]] = {
            "zh": self._upstream.cangjie_converter,
            "ko": korean_normalize,
        }
        if _has_module("pykakasi"):
            self.steps["ja"] = self._kana
        missing = sorted(set(LANGUAGES) - {t[1:-1] for t in vocab if t.startswith("[")
                                           and t.endswith("]") and t[1:-1] in LANGUAGES})
        if missing:
            raise ConfigError(f"{vocab_path.name} has no language token for "
                              f"{', '.join(missing)} (e.g. [{missing[0]}])")

    def _kana(self, text: str) -> str:
        from chatterbox.models.tokenizers.tokenizer import hiragana_normalize

        # One pykakasi converter is shared (upstream keeps it in a global);
        # requests tokenise on their own threads.
        with self._kana_lock:
            return hiragana_normalize(text)

    def encode(self, text: str, language: str):
        """Token ids of ``text`` (already through ``punc_norm``) in ``language``."""
        from chatterbox.models.tokenizers.tokenizer import SPACE

        text = self._upstream.preprocess_text(text, language_id=language)
        step = self.steps.get(language)
        if step is not None:
            text = step(text)
        text = f"[{language}]{text}".replace(" ", SPACE)
        return self._tokenizer.encode(text).ids

    def text_to_tokens(self, text: str, language: str) -> torch.Tensor:
        """(1, L) int tensor, as upstream's ``MTLTokenizer.text_to_tokens``."""
        return torch.IntTensor(self.encode(text, language)).unsqueeze(0)

    def describe(self) -> Dict[str, str]:
        """Which preprocessing runs for the languages that have one upstream."""
        return {"zh": "Cangjie codes, no word segmentation",
                "ja": "kanji to hiragana (pykakasi)" if "ja" in self.steps else "as written",
                "ko": "jamo", "he": "as written (no diacritics)", "ru": "as written (no stress marks)"}


def text_tokens(model, text: str, language: str) -> torch.Tensor:
    """(1, L) long ids of ``text`` in ``language`` between T3's start and stop text tokens.

    Upstream's multilingual ``punc_norm`` (not the original model's: it also
    accepts CJK sentence ends), then ``MultilingualTokenizer``.
    """
    from chatterbox.mtl_tts import punc_norm

    if language not in LANGUAGES:
        raise ValueError(f"language {language!r} is not one of the multilingual model's")
    hp = model.t3.hp
    tokens = model.tokenizer.text_to_tokens(punc_norm(text), language).long()
    start = torch.full((1, 1), hp.start_text_token, dtype=torch.long)
    stop = torch.full((1, 1), hp.stop_text_token, dtype=torch.long)
    return torch.cat([start, tokens, stop], dim=1).to(model.device)


# -- weights ------------------------------------------------------------------


def load_state_file(path: Path) -> dict:
    """A ``.pt`` state dict, read without running code (``weights_only``), on the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read {path.name}: {reason(exc, 200)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path.name} does not hold a state dict of tensors")
    return state


def load_multilingual(source, *, device: str, t3_dtype: str = "float32", t3_version: str = "v2",
                      variant: str = "multilingual"):
    """Build upstream's multilingual modules and load ``source`` into them (``ConfigError`` on a mismatch)."""
    from chatterbox.tts import Conditionals

    from .architecture import ModelSizes, build_s3gen, build_t3, build_voice_encoder
    from .model import ChatterboxModel, _load_safetensors, _load_state, model_signature, set_t3_format

    if t3_dtype == "int8" and device != "cpu":
        raise ConfigError("the int8 T3 format runs on CPU only; use bfloat16 on CUDA")
    directory = source.directory
    try:
        sizes = ModelSizes.load(directory)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{directory}: {exc}") from None

    ve = build_voice_encoder(sizes)
    _load_state(ve, load_state_file(directory / "ve.pt"), "ve.pt")

    name = T3_FILES[t3_version]
    t3 = build_t3(sizes, multilingual=True)
    t3_state = _load_safetensors(directory / name)
    if "model" in t3_state:  # nested exports, as upstream allows
        t3_state = t3_state["model"][0]
    _load_state(t3, t3_state, name)
    del t3_state

    s3gen = build_s3gen(sizes)
    # Upstream loads s3gen.pt strictly; computed buffers are allowed missing
    # here as for the original's s3gen.safetensors (a re-export may omit them).
    _load_state(s3gen, load_state_file(directory / "s3gen.pt"), "s3gen.pt", strict=False,
                allowed_missing=("_mel_filters", "window", "trim_fade"))

    tokenizer = MultilingualTokenizer(directory / TOKENIZER_FILE, directory / CANGJIE_FILE)

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
    log.info("multilingual text: %s", "; ".join(f"{k}: {v}" for k, v in tokenizer.describe().items()))
    return ChatterboxModel(
        variant=variant, device=device, t3=t3, s3gen=s3gen, voice_encoder=ve,
        tokenizer=tokenizer, builtin_voice=builtin,
        signature=model_signature(variant, directory, files=required_files(t3_version)),
        source=source, sizes=sizes)


__all__ = ["LANGUAGES", "DEFAULTS", "T3_FILES", "TOKENIZER_FILE", "CANGJIE_FILE", "OPTIONAL_FILES",
           "MultilingualTokenizer", "load_multilingual", "load_state_file", "required_files",
           "text_tokens"]

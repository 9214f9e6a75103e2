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
from typing import Callable, Dict

import torch

from ..errors import ConfigError, reason
from .variants import MULTILINGUAL_LANGUAGES, MULTILINGUAL_T3_FILES as T3_FILES

log = logging.getLogger(__name__)

TOKENIZER_FILE = "grapheme_mtl_merged_expanded_v1.json"
CANGJIE_FILE = "Cangjie5_TC.json"
TEXT_VOCAB_SIZE = 2454  # T3Config.multilingual()


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
            try:
                self._kana("日本")  # builds the converter now, not in the first Japanese job
                self.steps["ja"] = self._kana
            except Exception as exc:  # a broken install: Japanese is then read as written
                log.warning("pykakasi does not work here (%s): Japanese kanji reach the model "
                            "as written", reason(exc, 120))
        missing = [code for code in MULTILINGUAL_LANGUAGES if f"[{code}]" not in vocab]
        if len(missing) == len(MULTILINGUAL_LANGUAGES):  # another model's tokenizer
            raise ConfigError(f"{vocab_path.name} has no language token (e.g. [{missing[0]}]): "
                              f"not the multilingual model's tokenizer")
        if missing:
            # Upstream still prepends the tag, spelled out letter by letter.
            log.warning("%s has no language token for %s; those languages get the tag as "
                        "letters, as upstream does", vocab_path.name, ", ".join(missing))

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


class MultilingualText:
    """The multilingual model's text path, as ``ChatterboxModel.text_encoder``.

    Upstream's multilingual ``punc_norm`` (not the original model's: it also
    accepts CJK sentence ends), ``MultilingualTokenizer``, then T3's start
    and stop text tokens: (1, L) long ids on the CPU.
    """

    def __init__(self, tokenizer: MultilingualTokenizer, hp):
        self.tokenizer = tokenizer
        self.start, self.stop = hp.start_text_token, hp.stop_text_token

    def __call__(self, text: str, language: str = "en") -> torch.Tensor:
        from chatterbox.mtl_tts import punc_norm

        from .model import with_text_ends

        if language not in MULTILINGUAL_LANGUAGES:  # the service refuses these first
            raise ValueError(f"language {language!r} is not one of the multilingual model's")
        return with_text_ends(self.tokenizer.text_to_tokens(punc_norm(text), language),
                              self.start, self.stop)


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


def t3_file_of(source) -> str:
    """The T3 weights file ``source`` was located for (``CHATTERBOX_MTL_T3``); v2 by default."""
    chosen = [name for name in T3_FILES.values() if name in source.files]
    return chosen[0] if chosen else T3_FILES["v2"]


def load_multilingual(source, *, device: str, t3_dtype: str = "float32"):
    """Upstream's multilingual modules with ``source`` loaded into them (the files
    ``ChatterboxMultilingualTTS.from_local`` reads); ``ConfigError`` on any mismatch."""
    from .architecture import build_s3gen, build_t3, build_voice_encoder, skip_random_init
    from .model import (ChatterboxModel, _load_state, load_builtin_voice, load_sizes,
                        load_t3_weights, model_signature, set_t3_format)

    variant = "multilingual"
    directory = source.directory
    sizes = load_sizes(directory)

    with skip_random_init():
        ve = build_voice_encoder(sizes)
    _load_state(ve, load_state_file(directory / "ve.pt"), "ve.pt")

    name = t3_file_of(source)
    with skip_random_init():
        t3 = build_t3(sizes, multilingual=True)
    load_t3_weights(t3, directory / name)

    with skip_random_init():
        s3gen = build_s3gen(sizes)
    # Upstream loads s3gen.pt strictly; computed buffers may be missing here as
    # for the original's s3gen.safetensors (a re-export may leave them out).
    _load_state(s3gen, load_state_file(directory / "s3gen.pt"), "s3gen.pt", strict=False,
                allowed_missing=("_mel_filters", "window", "trim_fade"))

    tokenizer = MultilingualTokenizer(directory / TOKENIZER_FILE, directory / CANGJIE_FILE)

    for module in (ve, t3, s3gen):
        module.to(device).eval()
    set_t3_format(t3, t3_dtype)
    log.info("multilingual T3 %s; text preprocessing: %s", name,
             "; ".join(f"{k}: {v}" for k, v in tokenizer.describe().items()))
    return ChatterboxModel(
        variant=variant, device=device, t3=t3, s3gen=s3gen, voice_encoder=ve,
        tokenizer=tokenizer, builtin_voice=load_builtin_voice(directory, device),
        signature=model_signature(variant, directory, source.files), source=source, sizes=sizes,
        text_encoder=MultilingualText(tokenizer, t3.hp))


__all__ = ["CANGJIE_FILE", "T3_FILES", "TOKENIZER_FILE", "MultilingualText", "MultilingualTokenizer",
           "load_multilingual", "load_state_file", "t3_file_of"]

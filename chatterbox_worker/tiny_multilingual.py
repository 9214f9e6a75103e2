"""Random-weights multilingual checkpoints in upstream's file layout (``tiny_model --variant multilingual``).

Writes what ``ChatterboxMultilingualTTS.from_local`` reads: ``ve.pt`` and
``s3gen.pt`` (``torch.save`` of state dicts), ``t3_mtl23ls_v2.safetensors``
and ``t3_mtl23ls_v3.safetensors`` (other random weights, so the
``CHATTERBOX_MTL_T3`` setting visibly changes the model),
``grapheme_mtl_merged_expanded_v1.json``, ``Cangjie5_TC.json`` and a built-in
voice ``conds.pt``.

The grapheme tokenizer is character level with upstream's special ids
(``[START]`` 255, ``[STOP]`` 0, ``[SPACE]`` 2), one token per language tag
(``[en]``, ``[zh]``, ...) and per Cangjie code letter (``[cj_a]``..), and the
characters of the 23 languages' scripts after upstream's lower-casing and
NFKD (Latin with combining marks, Greek, Cyrillic, Hebrew, Arabic,
Devanagari, kana, Hangul jamo, CJK punctuation and a few ideographs). The
Cangjie table covers those ideographs with made-up codes (not real Cangjie),
two of them sharing a code so that upstream's index suffix is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .engine.architecture import (TINY, ModelSizes, build_s3gen, build_t3, build_voice_encoder,
                                  state_dict_to_save)
from .engine.multilingual import (CANGJIE_FILE, T3_FILES, TEXT_VOCAB_SIZE,
                                  TOKENIZER_FILE, MultilingualTokenizer)
from .engine.variants import MULTILINGUAL_LANGUAGES as LANGUAGES

SPECIAL_IDS = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5,
               "[MASK]": 6, "[START]": 255}
CANGJIE_SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789."
# Ideographs of the tests' Chinese and Japanese sentences and some common ones.
IDEOGRAPHS = ("你好今天气真不错我们明见日本語中文是的人大小上下东西南北学生说话言早晚"
              "月水火山木金土年时间有一个愉快周末世界朋友家国电视语音合成谢请问")
SCRIPT_RANGES = [
    (0x20, 0x7E),  # ASCII
    (0xA0, 0x17F),  # Latin-1 and Extended-A (ß, ø, æ, ł, ı, œ: no NFKD decomposition)
    (0x300, 0x36F),  # combining marks (accents after NFKD)
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x5FF),  # Hebrew
    (0x600, 0x6FF),  # Arabic
    (0x900, 0x97F),  # Devanagari
    (0x1100, 0x11FF),  # Hangul jamo (upstream decomposes syllables)
    (0x2010, 0x2027),  # dashes, quotes, ellipsis
    (0x3000, 0x303F),  # CJK punctuation
    (0x3040, 0x30FF),  # hiragana, katakana
]


def grapheme_vocab() -> dict:
    """Token -> id for the tiny grapheme tokenizer (fewer than T3's 2454 text ids)."""
    vocab = dict(SPECIAL_IDS)
    tags = [f"[{code}]" for code in LANGUAGES] + [f"[cj_{c}]" for c in CANGJIE_SYMBOLS]
    chars = [chr(i) for lo, hi in SCRIPT_RANGES for i in range(lo, hi + 1)] + list(IDEOGRAPHS)
    taken = set(vocab.values())
    next_id = 0
    for token in tags + chars:
        if token in vocab:
            continue
        while next_id in taken:
            next_id += 1
        vocab[token] = next_id
        taken.add(next_id)
    if len(vocab) > TEXT_VOCAB_SIZE:
        raise AssertionError(f"{len(vocab)} tokens do not fit T3's {TEXT_VOCAB_SIZE} text ids")
    return vocab


def write_grapheme_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models

    vocab = grapheme_vocab()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tags = [t for t in vocab if t.startswith("[") and t.endswith("]") and len(t) > 1]
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in tags])
    tokenizer.save(str(path))


def write_cangjie(path: Path) -> None:
    """``word<TAB>code`` lines, as upstream's table; codes derived from the code point."""
    entries = []
    unique = list(dict.fromkeys(IDEOGRAPHS))
    for i, glyph in enumerate(unique):
        n = ord(glyph)
        code = "".join("abcdefghijklmnopqrstuvwxy"[(n // 25 ** k) % 25] for k in range(1 + i % 4))
        entries.append(f"{glyph}\t{code}")
    # Two glyphs on one code: upstream appends the glyph's index to the second.
    entries.append(f"{unique[1]}\t{entries[0].split(chr(9))[1]}")
    path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")


def write_multilingual_checkpoint(directory: Path, *, seed: int = 0,
                                  sizes: ModelSizes = TINY) -> Path:
    """Write a random multilingual checkpoint to ``directory`` and return it."""
    from safetensors.torch import save_file

    from .engine.model import ChatterboxModel
    from .engine.weights import WeightSource
    from .tiny_model import save_builtin_voice, spread_weights

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ve, t3, s3gen = build_voice_encoder(sizes), build_t3(sizes, multilingual=True), build_s3gen(sizes)
    spread_weights(t3)
    for module in (ve, t3, s3gen):
        module.eval()
    torch.save(state_dict_to_save(ve), directory / "ve.pt")
    torch.save(state_dict_to_save(s3gen), directory / "s3gen.pt")
    save_file(state_dict_to_save(t3), str(directory / T3_FILES["v2"]))
    other = build_t3(sizes, multilingual=True)
    spread_weights(other)
    save_file(state_dict_to_save(other), str(directory / T3_FILES["v3"]))
    del other
    write_grapheme_tokenizer(directory / TOKENIZER_FILE)
    write_cangjie(directory / CANGJIE_FILE)
    sizes.save(directory)

    tokenizer = MultilingualTokenizer(directory / TOKENIZER_FILE, directory / CANGJIE_FILE)
    model = ChatterboxModel(variant="multilingual", device="cpu", t3=t3, s3gen=s3gen,
                            voice_encoder=ve, tokenizer=tokenizer, builtin_voice=None,
                            signature="", sizes=sizes, source=WeightSource(directory, "model_dir"))
    save_builtin_voice(model, directory, seed=seed)
    return directory


__all__ = ["write_multilingual_checkpoint", "grapheme_vocab"]

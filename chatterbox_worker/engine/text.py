"""Splitting long text into pieces the model speaks well, and sizing each piece's token budget.

Chatterbox drifts into gibberish past roughly 350 characters per call, so long
text is cut at sentence ends into pieces of at most ``MAX_PIECE_CHARS``;
a sentence longer than that is cut at clause punctuation, then between words.
Sentence and clause ends of the multilingual model's scripts count too (CJK
。！？ and ，、；：, Arabic ؟ ، ؛, Devanagari । ॥); Chinese and Japanese
pieces are packed without spaces, and a character of Chinese, Japanese or
Korean, a syllable or more of speech, gets a longer share of the budget.
"""

from __future__ import annotations

import math
import re
from typing import List

MAX_PIECE_CHARS = 300

# Speech tokens per second of audio (S3 tokenizer rate).
TOKENS_PER_SECOND = 25
# Slowest plausible speaking rate we budget for, in characters per second;
# ordinary English speech runs at 12-16. Budget = time at this rate + 1 s.
SLOW_CHARS_PER_SECOND = 7.0
# Upstream's fixed cap (40 s of audio); the learned position table allows 4096.
MAX_TOKENS_PER_PIECE = 1000

# Written without spaces between words or sentences: pieces are joined with none.
UNSPACED_LANGUAGES = ("zh", "ja")
# Slowest plausible rates where a character is a syllable or more (Mandarin
# runs at 4-5 characters a second, Japanese and Korean at 5-7), and the
# piece limit that keeps their pieces within the per-piece token cap.
SLOW_CHARS_PER_SECOND_BY_LANGUAGE = {"zh": 3.0, "ja": 3.5, "ko": 3.5}
DENSE_PIECE_CHARS = 100

# A sentence end and the spaces after it; a closing quote or bracket right
# after the end stays with its sentence (it used to be dropped with the space).
_SENTENCE_END = re.compile(r"(?:(?<=[.!?…])(?![\"')\]])|(?<=[.!?…][\"')\]]))\s+")
# The other scripts' sentence ends, spaces after them optional; a closing
# quote or bracket right after one stays with its sentence.
_ENDERS, _CLOSERS = "。！？؟।॥", r"」』）〕】”’\"')\]"
_WIDE_SENTENCE_END = re.compile(rf"(?:(?<=[{_ENDERS}])(?![{_CLOSERS}])|(?<=[{_ENDERS}][{_CLOSERS}]))\s*")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+|(?<=[，、；：،؛])\s*")


def token_budget(piece: str, language: str = "en") -> int:
    """Most speech tokens one piece may produce: enough for slow speech, never a runaway.

    A model that misses its stop token (or a random-weights one that never
    emits it) stops here instead of hallucinating for upstream's 40 seconds.
    """
    rate = SLOW_CHARS_PER_SECOND_BY_LANGUAGE.get(language, SLOW_CHARS_PER_SECOND)
    seconds = 1.0 + len(piece) / rate
    return min(MAX_TOKENS_PER_PIECE, max(TOKENS_PER_SECOND, math.ceil(seconds * TOKENS_PER_SECOND)))


def _split_long(sentence: str, limit: int) -> List[str]:
    """Cut one over-long sentence at clause punctuation, then between words, then anywhere."""
    parts: List[str] = []
    for clause in _CLAUSE_END.split(sentence):
        while len(clause) > limit:
            cut = clause.rfind(" ", 0, limit + 1)
            # Never between the words of a bracketed tag (turbo's "[clear throat]"):
            # each half would be spoken as text.
            opened = clause.rfind("[", 0, cut)
            if cut > 0 and opened > clause.rfind("]", 0, cut) and clause.rfind(" ", 0, opened) > 0:
                cut = clause.rfind(" ", 0, opened)
            if cut <= 0:
                cut = limit
            parts.append(clause[:cut].strip())
            clause = clause[cut:].strip()
        if clause:
            parts.append(clause)
    return parts


def split_text(text: str, limit: int = MAX_PIECE_CHARS, language: str = "en") -> List[str]:
    """Pieces of ``text`` in order, each at most ``limit`` characters, cut at the best boundary.

    ``language``: the text's language code (the request's ``language``)."""
    text = " ".join(text.split())
    if not text:
        return []
    if language in SLOW_CHARS_PER_SECOND_BY_LANGUAGE:
        limit = min(limit, DENSE_PIECE_CHARS)
    sentences: List[str] = []
    for part in _SENTENCE_END.split(text):
        for sentence in _WIDE_SENTENCE_END.split(part):
            sentence = sentence.strip()
            if not sentence:
                continue
            sentences.extend(_split_long(sentence, limit) if len(sentence) > limit else [sentence])
    space = "" if language in UNSPACED_LANGUAGES else " "
    pieces: List[str] = []
    for sentence in sentences:
        # Pack whole sentences together while they fit: fewer, longer pieces
        # keep prosody across sentences and cost fewer model calls.
        if pieces and len(pieces[-1]) + len(space) + len(sentence) <= limit:
            pieces[-1] = pieces[-1] + space + sentence
        else:
            pieces.append(sentence)
    return pieces

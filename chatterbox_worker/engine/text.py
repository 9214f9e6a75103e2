"""Splitting long text into pieces the model speaks well, and sizing each piece's token budget.

Chatterbox drifts into gibberish past roughly 350 characters per call, so long
text is cut at sentence ends into pieces of at most ``MAX_PIECE_CHARS``;
a sentence longer than that is cut at clause punctuation, then between words.
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

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")


def token_budget(piece: str) -> int:
    """Most speech tokens one piece may produce: enough for slow speech, never a runaway.

    A model that misses its stop token (or a random-weights one that never
    emits it) stops here instead of hallucinating for upstream's 40 seconds.
    """
    seconds = 1.0 + len(piece) / SLOW_CHARS_PER_SECOND
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
    sentences: List[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = sentence.strip()
        if not sentence:
            continue
        sentences.extend(_split_long(sentence, limit) if len(sentence) > limit else [sentence])
    pieces: List[str] = []
    for sentence in sentences:
        # Pack whole sentences together while they fit: fewer, longer pieces
        # keep prosody across sentences and cost fewer model calls.
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= limit:
            pieces[-1] = pieces[-1] + " " + sentence
        else:
            pieces.append(sentence)
    return pieces

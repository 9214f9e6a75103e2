from chatterbox_worker.engine.text import (DENSE_PIECE_CHARS, MAX_PIECE_CHARS, MAX_TOKENS_PER_PIECE,
                                           split_text, token_budget)


def test_short_text_is_one_piece():
    assert split_text("  Hello   there. ") == ["Hello there."]


def test_sentences_are_packed_up_to_the_limit_and_never_split_midway():
    sentences = [f"Sentence number {i} is here." for i in range(40)]
    pieces = split_text(" ".join(sentences))
    assert len(pieces) > 1
    assert all(len(p) <= MAX_PIECE_CHARS for p in pieces)
    assert " ".join(pieces) == " ".join(sentences)
    for piece in pieces:
        assert piece.endswith(".")


def test_an_overlong_sentence_is_cut_at_clauses_then_words():
    text = ", ".join(["a clause with several words in it"] * 30) + "."
    pieces = split_text(text)
    assert all(len(p) <= MAX_PIECE_CHARS for p in pieces)
    assert " ".join(pieces).replace(" ", "") == text.replace(" ", "")
    unbroken = "x" * 700
    assert [len(p) for p in split_text(unbroken)] == [300, 300, 100]


def test_token_budget_grows_with_text_and_is_capped():
    short, longer = token_budget("Hi."), token_budget("A much longer sentence than that one.")
    assert 25 <= short < longer <= MAX_TOKENS_PER_PIECE
    # ~25 tokens per second: a sentence read at 14 chars/s fits with room to spare.
    text = "x" * 140
    assert token_budget(text) >= 25 * 140 / 14
    assert token_budget("y" * 5000) == MAX_TOKENS_PER_PIECE


def test_chinese_and_japanese_split_at_their_full_stops_and_pack_without_spaces():
    text = "你好，今天天气真不错。我们明天见！「你好。」他说。" * 6
    pieces = split_text(text, language="zh")
    assert "".join(pieces) == text  # nothing lost, no space added
    assert all(p.endswith(("。", "！", "」")) for p in pieces)  # only at sentence ends
    assert all(len(p) <= DENSE_PIECE_CHARS for p in pieces) and len(pieces) > 1
    assert split_text("今日は良い天気です。明日も晴れるでしょう！", 12, "ja") == [
        "今日は良い天気です。", "明日も晴れるでしょう！"]


def test_arabic_and_hindi_split_at_their_question_marks_and_dandas():
    assert split_text("مرحبا بالعالم؟ كيف حالك؟ أنا بخير.", 16, "ar") == [
        "مرحبا بالعالم؟", "كيف حالك؟", "أنا بخير."]
    assert split_text("नमस्ते दुनिया। आप कैसे हैं? मैं ठीक हूँ॥", 16, "hi") == [
        "नमस्ते दुनिया।", "आप कैसे हैं?", "मैं ठीक हूँ॥"]
    # Clause marks of these scripts cut an over-long sentence before words do.
    long_ar = "، ".join(["كلمة أخرى هنا"] * 40) + "."
    assert all(p.endswith(("،", ".")) for p in split_text(long_ar, 60, "ar"))


def test_a_dense_script_character_gets_more_time():
    piece = "字" * 100
    assert token_budget(piece, "zh") > token_budget(piece, "en") * 2
    assert token_budget(piece, "zh") <= MAX_TOKENS_PER_PIECE
    assert token_budget("Hi.", "fr") == token_budget("Hi.")  # alphabetic scripts: unchanged


def test_a_long_sentence_is_never_cut_inside_a_bracketed_tag():
    """Turbo's two-word tag "[clear throat]" would be spoken as text if cut in half."""
    for shift in range(12):
        text = "word " * (57 + shift) + "and then [clear throat] " + "more words here " * 20
        pieces = split_text(text.strip())
        assert all(len(p) <= MAX_PIECE_CHARS for p in pieces)
        assert any("[clear throat]" in p for p in pieces), shift
        assert " ".join(pieces) == " ".join(text.split())


def test_a_closing_quote_or_bracket_after_a_sentence_end_stays_with_its_sentence():
    text = 'She said "Stop." Then she left. (Quietly.) It was over! Really?'
    assert split_text(text, limit=16) == ['She said "Stop."', "Then she left.", "(Quietly.)",
                                          "It was over!", "Really?"]
    # Nothing is lost when the sentences are packed back together.
    assert split_text(text) == [text]

import pytest

from chatterbox_worker.errors import InvalidInput
from chatterbox_worker.schemas import GenerateRequest, parse_request


def parse(data, limit=5000):
    return parse_request(data, max_text_chars=limit)


def test_text_without_action_is_generate_with_contract_defaults():
    r = parse({"text": "  Hello.  "})
    assert isinstance(r, GenerateRequest)
    assert r.text == "Hello." and r.format == "wav" and r.sample_rate == 24000
    assert r.stream is False and r.output == "auto" and r.seed is None
    assert (r.exaggeration, r.cfg_weight, r.temperature) == (0.5, 0.5, 0.8)


@pytest.mark.parametrize("data,needle", [
    ({"text": ""}, "text: must not be empty"),
    ({"text": "   "}, "text: must not be empty"),
    ({"text": "x" * 11}, "limit is 10"),
    ({"text": "hi", "speed": 2}, "speed: unknown field"),
    ({"text": "hi", "format": "ogg"}, "format"),
    ({"text": "hi", "exaggeration": 3}, "exaggeration"),
    ({"text": "hi", "cfg_weight": -0.1}, "cfg_weight"),
    ({"text": "hi", "temperature": 0}, "temperature"),
    ({"text": "hi", "seed": "7"}, "seed"),
    ({"text": "hi", "seed": -1}, "seed"),
    ({"text": "hi", "stream": "yes"}, "stream"),
    ({"text": "hi", "voice_id": "../etc/passwd"}, "voice_id"),
    ({"text": "hi", "format": "opus", "sample_rate": 44100}, "not supported by opus"),
    ({"text": "hi", "sample_rate": 4000}, "between 8000 and 48000"),
    ({"action": "dance"}, "unknown action 'dance'"),
    ({}, "needs an 'action'"),
    ("hello", "JSON object"),
])
def test_bad_input_names_what_to_fix(data, needle):
    with pytest.raises(InvalidInput) as info:
        parse(data, limit=10)
    assert needle in str(info.value)
    assert info.value.code == "invalid_input"


def test_cfg_weight_zero_and_integers_for_floats_are_accepted():
    r = parse({"text": "hi", "cfg_weight": 0, "exaggeration": 1})
    assert r.cfg_weight == 0 and r.exaggeration == 1


def test_upload_needs_exactly_one_source():
    with pytest.raises(InvalidInput, match="exactly one"):
        parse({"action": "upload_voice", "voice_id": "a", "audio_base64": "x", "voice_base64": "y"})
    assert parse({"action": "upload_voice", "voice_id": "a", "audio_url": ["http://x"]}).audio_url


def test_voice_ids_follow_the_pattern():
    assert parse({"action": "get_voice", "voice_id": "Narrator_2-b"}).voice_id == "Narrator_2-b"
    for bad in ["-lead", "a" * 65, "has space", "dot.pth", ""]:
        with pytest.raises(InvalidInput):
            parse({"action": "delete_voice", "voice_id": bad})

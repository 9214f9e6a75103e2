import pytest

from chatterbox_worker.errors import InvalidInput
from chatterbox_worker.schemas import GenerateRequest, parse_request


def parse(data, limit=5000):
    return parse_request(data, max_text_chars=limit)


def test_null_sampling_fields_mean_the_models_default():
    r = parse({"text": "hi", "temperature": None, "top_k": None, "exaggeration": None})
    assert (r.temperature, r.top_k, r.exaggeration) == (None, None, None)


def test_text_without_action_is_generate_with_contract_defaults():
    r = parse({"text": "  Hello.  "})
    assert isinstance(r, GenerateRequest)
    assert r.text == "Hello." and r.format == "wav" and r.sample_rate == 24000
    assert r.stream is False and r.output == "auto" and r.seed is None
    # Sampling fields left out stay None: the served model's defaults fill them
    # (tests/engine/test_variants.py).
    assert (r.exaggeration, r.cfg_weight, r.temperature, r.top_k) == (None, None, None, None)


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


@pytest.mark.parametrize("data,message", [
    ({"text": "hi", "temperature": "hot"}, "temperature: must be a number from 0.05 to 5"),
    ({"text": "hi", "temperature": True}, "temperature: must be a number from 0.05 to 5"),
    ({"text": "hi", "temperature": 9}, "temperature: must be a number from 0.05 to 5"),
    ({"text": "hi", "exaggeration": 3}, "exaggeration: must be a number from 0 to 2"),
    ({"text": "hi", "top_k": 1.5}, "top_k: must be a whole number from 0 to 10000 (0: off)"),
    ({"text": "hi", "cfg_weight": [1]}, "cfg_weight: must be a number from 0 to 1"),
    ({"text": "hi", "top_p": 0}, "top_p: must be a number greater than 0 and at most 1"),
    ({"text": "hi", "min_p": "a"}, "min_p: must be a number from 0 to 1"),
    ({"text": "hi", "repetition_penalty": 0.5}, "repetition_penalty: must be a number from 1 to 2"),
    ({"text": "hi", "seed": 1.5},
     "seed: must be a whole number from 0 to 9223372036854775807, or null for a random seed"),
    ({"text": "hi", "sample_rate": "x"},
     "sample_rate: must be a whole number of samples per second, 8000 to 48000"),
    ({"text": "hi", "format": "ogg"}, "format: must be one of: wav, pcm_s16le, flac, mp3, opus"),
    ({"text": "hi", "output": "disk"}, "output: must be one of: auto, inline, s3"),
    ({"text": "hi", "stream": "yes"}, "stream: must be true or false"),
    ({"text": 5}, "text: must be a string"),
    ({"text": "hi", "language": 3}, 'language: must be a language code string such as "en"'),
    ({"text": "hi", "voice_id": 5},
     "voice_id: must be 1-64 letters, digits, '_' or '-', starting with a letter or digit"),
    ({"action": "upload_voice", "voice_id": "a", "audio_base64": [5]},
     "audio_base64: must be a base64 string, or a list of them (one per clip)"),
    ({"action": "upload_voice", "voice_id": "a", "audio_url": {"u": 1}},
     "audio_url: must be an http(s) URL string, or a list of them (one per clip)"),
    ({"action": "upload_voice"}, "voice_id: is required"),
    ({"action": "get_voice", "voice_id": "a", "export": 1}, "export: must be true or false"),
    ({"text": "hi", "min_p": 2, "repetition_penalty": 0.5},
     "min_p: must be a number from 0 to 1; repetition_penalty: must be a number from 1 to 2"),
])
def test_every_field_error_is_one_plain_sentence(data, message):
    """No pydantic internals (``temperature.float: Input should be a valid number``), one
    sentence per field that says what the field must be."""
    with pytest.raises(InvalidInput) as info:
        parse(data)
    assert info.value.message == message


def test_no_field_error_uses_the_validation_library_wording():
    bad = {"text": 5, "voice_id": 5, "format": 5, "output": 5, "sample_rate": "x", "stream": 5,
           "seed": "x", "exaggeration": "x", "cfg_weight": "x", "temperature": "x", "top_p": "x",
           "min_p": "x", "repetition_penalty": "x", "language": 5}
    with pytest.raises(InvalidInput) as info:
        parse(bad)
    message = info.value.message
    assert message.count(": must be") == len(bad)
    for internal in ("Input should", "valid number", "valid integer", ".float", ".int",
                     "list[str]", "unable to parse"):
        assert internal not in message


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

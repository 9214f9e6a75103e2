import pytest

from chatterbox_worker.config import ENVIRONMENT, Settings, load_settings
from chatterbox_worker.errors import ConfigError


def test_defaults_follow_the_contract():
    s = load_settings({})
    assert s.variant == "original"
    assert s.max_text_chars == 5000
    assert s.s3_url_ttl_s == 3600
    assert s.watermark is True
    assert not s.s3_configured


def test_concurrency_follows_the_device_unless_set():
    assert load_settings({"CHATTERBOX_DEVICE": "cpu"}).concurrency == 1
    assert load_settings({"CHATTERBOX_DEVICE": "cuda"}).concurrency == 8
    assert load_settings({"CHATTERBOX_DEVICE": "cuda", "MAX_CONCURRENCY": "2"}).concurrency == 2
    import torch

    expected = 8 if torch.cuda.is_available() else 1
    assert load_settings({}).concurrency == expected


def test_values_are_read_and_typed():
    s = load_settings({"MAX_TEXT_CHARS": "120", "CHATTERBOX_WATERMARK": "false",
                       "CHATTERBOX_DEVICE": "cpu", "VOICES_DIR": "/tmp/v", "MAX_CONCURRENCY": "3"})
    assert s.max_text_chars == 120 and s.watermark is False and s.device == "cpu"
    assert str(s.voices_dir) == "/tmp/v" and s.concurrency == 3


@pytest.mark.parametrize("variable,value", [
    ("MAX_TEXT_CHARS", "lots"), ("MAX_TEXT_CHARS", "0"), ("CHATTERBOX_VARIANT", "large"),
    ("CHATTERBOX_DEVICE", "tpu"), ("S3_URL_TTL_S", "-5"), ("CHATTERBOX_WATERMARK", "maybe"),
])
def test_malformed_values_stop_with_one_line_naming_the_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        load_settings({variable: value})
    message = str(info.value)
    assert variable in message and "\n" not in message


def test_secrets_are_never_echoed():
    with pytest.raises(ConfigError) as info:
        load_settings({"BUCKET_SECRET_ACCESS_KEY": "x" * 3, "MAX_TEXT_CHARS": "nope"})
    assert "xxx" not in str(info.value)


def test_every_setting_has_an_environment_variable():
    assert set(ENVIRONMENT) == set(Settings.model_fields)

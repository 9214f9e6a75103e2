"""chatterbox_worker/client.py's pure parts: the format a file name asks for, errors in the CLI's words."""

from pathlib import Path

import pytest

from chatterbox_worker.client import UsageError, cli_message, output_format


@pytest.mark.parametrize("name,expected", [
    ("a.wav", "wav"), ("a.MP3", "mp3"), ("a.flac", "flac"), ("a.opus", "opus"), ("a.ogg", "opus"),
    ("a.pcm", "pcm_s16le"), ("a.raw", "pcm_s16le"), ("noext", "wav"),
])
def test_the_format_follows_the_file_extension(name, expected):
    assert output_format(Path(name)) == expected


def test_an_explicit_format_wins_over_the_extension():
    assert output_format(Path("speech.wav"), "mp3") == "mp3"


@pytest.mark.parametrize("name", ["speech.m4a", "speech.aac", "speech.txt"])
def test_an_extension_that_names_no_format_is_refused(name):
    with pytest.raises(UsageError) as info:
        output_format(Path(name))
    message = str(info.value)
    assert f"'{name}'" in message and "--format" in message and ".mp3" in message


@pytest.mark.parametrize("worker_error,cli_error", [
    ("voice_exists: voice 'a' already exists; pass overwrite: true to replace it",
     "voice_exists: voice 'a' already exists; pass --overwrite to replace it"),
    ("invalid_input: cfg_weight: must be a number from 0 to 1",
     "invalid_input: --cfg-weight: must be a number from 0 to 1"),
    ("invalid_input: min_p: must be a number from 0 to 1; repetition_penalty: must be a number "
     "from 1 to 2", "invalid_input: --min-p: must be a number from 0 to 1; --repetition-penalty: "
     "must be a number from 1 to 2"),
    ("output_too_large: the audio is 9 bytes, above INLINE_MAX_BYTES (8); use format 'opus' or "
     "'mp3', shorter text, or output 's3'",
     "output_too_large: the audio is 9 bytes, above INLINE_MAX_BYTES (8); use --format opus or mp3 "
     "(or a .opus or .mp3 file name), shorter text, or --s3"),
    ("invalid_voice_file: this voice was made for model m1; this worker runs m2. Upload it again "
     "with rebuild: true to remake it from its reference audio",
     "invalid_voice_file: this voice was made for model m1; this worker runs m2. Upload it again "
     "with --rebuild to remake it from its reference audio"),
    ("voice_not_found: Voice 'x' not found.", "voice_not_found: Voice 'x' not found."),
])
def test_worker_errors_name_the_cli_flags(worker_error, cli_error):
    assert cli_message(worker_error) == cli_error

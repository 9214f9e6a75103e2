"""A turbo worker (CHATTERBOX_VARIANT=turbo) over RunPod's local dev API: one-shot and streamed,
with the built-in voice and an uploaded one, with event tags in the text (issue 13's done-when)."""

import base64
import io

import pytest
import soundfile

from tests.conftest import worker_env
from tests.e2e.worker_process import running_worker

pytestmark = pytest.mark.e2e

TAGGED = "Hello from turbo [laugh], with a tag or two [clear throat]."


@pytest.fixture(scope="module")
def turbo_worker(turbo_settings_env, tmp_path_factory):
    env = worker_env(**turbo_settings_env)
    with running_worker(env, tmp_path_factory.mktemp("turbo-worker")) as process:
        yield process


def test_turbo_speaks_one_shot_and_streamed_with_the_builtin_and_an_uploaded_voice(turbo_worker):
    from tests.speech import long_speech_wav

    health = turbo_worker.call(action="health")
    assert health["model"]["variant"] == "turbo"

    one_shot = turbo_worker.call(text=TAGGED, seed=4)
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(one_shot["audio_base64"])))
    assert rate == 24000 and 1.0 < len(samples) / rate < 12.0
    # The same tokens streamed: the same length of audio (raw PCM chunks, 16-bit).
    pcm, result = turbo_worker.streamed(text=TAGGED, seed=4, format="pcm_s16le")
    assert len(pcm) // 2 == len(samples)
    assert result["duration_s"] == pytest.approx(one_shot["duration_s"], abs=0.001)

    audio = base64.b64encode(long_speech_wav(7.0)).decode()
    made = turbo_worker.call(action="upload_voice", voice_id="turbo-voice", audio_base64=audio)
    assert made["voice_id"] == "turbo-voice" and made["reference_s"] > 5
    mine = turbo_worker.call(text=TAGGED, seed=4, voice_id="turbo-voice")
    assert mine["voice_id"] == "turbo-voice" and mine["audio_base64"] != one_shot["audio_base64"]
    pcm, result = turbo_worker.streamed(text=TAGGED, seed=4, voice_id="turbo-voice",
                           format="pcm_s16le")
    assert result["voice_id"] == "turbo-voice"
    assert result["duration_s"] == pytest.approx(mine["duration_s"], abs=0.001)


def test_turbo_refuses_what_it_cannot_do_naming_the_model(turbo_worker):
    from tests.speech import SENTENCES, speech_wav

    refused = {
        "cfg_weight": turbo_worker.call(text="Hi.", cfg_weight=0.5),
        "tag": turbo_worker.call(text="Hi [laughs]."),
        "language": turbo_worker.call(text="Hallo.", language="de"),
    }
    assert refused["cfg_weight"]["error"].startswith("invalid_input: cfg_weight: the turbo model")
    assert refused["tag"]["error"].startswith("invalid_input: text: [laughs] is not an event tag")
    assert refused["language"]["error"].startswith("invalid_input: language: 'de'")
    # The neutral value of an ignored field is accepted.
    assert "audio_base64" in turbo_worker.call(text="Hi.", cfg_weight=0, min_p=0, exaggeration=0,
                                  top_k=50, seed=1)

    short = base64.b64encode(speech_wav(SENTENCES[3])).decode()  # about 4 s of speech
    error = turbo_worker.call(action="upload_voice", voice_id="short", audio_base64=short)["error"]
    assert error.startswith("invalid_audio: audio_base64 has ")
    assert "the turbo model needs more than 5 s" in error

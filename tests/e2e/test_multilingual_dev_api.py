"""A multilingual worker (CHATTERBOX_VARIANT=multilingual) over RunPod's local dev API:
one-shot and streamed, built-in and uploaded voice, four languages including Chinese and Japanese."""

import base64
import io

import pytest
import soundfile

from tests.conftest import worker_env
from tests.e2e.worker_process import running_worker

pytestmark = pytest.mark.e2e

TEXTS = {"de": "Guten Morgen, wie geht es dir?", "zh": "你好，今天天气真不错。",
         "ja": "今日は日本語で話します。", "ar": "مرحبا بالعالم، كيف حالك؟"}


@pytest.fixture(scope="module")
def mtl_worker(multilingual_checkpoint, tmp_path_factory):
    env = worker_env(CHATTERBOX_VARIANT="multilingual", CHATTERBOX_MODEL_DIR=multilingual_checkpoint,
                     VOICES_DIR=tmp_path_factory.mktemp("mtl-voices"), CHATTERBOX_WARMUP="0")
    with running_worker(env, tmp_path_factory.mktemp("mtl-worker")) as process:
        yield process


def test_one_shot_and_streamed_in_four_languages_with_both_voices(mtl_worker):
    from tests.speech import SENTENCES, speech_wav

    assert mtl_worker.call(action="health")["model"]["variant"] == "multilingual"
    audio = base64.b64encode(speech_wav(SENTENCES[1])).decode()
    assert mtl_worker.call(action="upload_voice", voice_id="mtl-voice", audio_base64=audio)["model"] \
        .startswith("chatterbox-multilingual-")

    one_shot = {}
    for language, text in TEXTS.items():
        for voice in (None, "mtl-voice"):
            item = mtl_worker.call(text=text, language=language, voice_id=voice, seed=8)
            samples, rate = soundfile.read(io.BytesIO(base64.b64decode(item["audio_base64"])))
            assert rate == 24000 and len(samples) > 0 and item["voice_id"] == voice
            one_shot[language, voice] = item
    # Each language and each voice is its own take.
    assert len({item["audio_base64"] for item in one_shot.values()}) == len(one_shot)

    for language, voice in (("zh", None), ("ja", "mtl-voice")):
        data, result = mtl_worker.streamed(text=TEXTS[language], language=language, voice_id=voice,
                                seed=8, format="pcm_s16le")
        # Streamed and one-shot takes have the same tokens, so the same length.
        assert len(data) / 2 / 24000 == pytest.approx(one_shot[language, voice]["duration_s"], abs=0.001)
        assert result["duration_s"] == one_shot[language, voice]["duration_s"]


def test_a_language_the_model_does_not_speak_is_refused(mtl_worker):
    error = mtl_worker.call(text="Sawubona.", language="zu")["error"]
    assert error.startswith("invalid_input: language: 'zu' is not spoken by the multilingual model")
    assert "ar, da, de, el, en" in error

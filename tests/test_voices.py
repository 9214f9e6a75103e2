"""Voice files: round trip, validation before use, refusal of code, cache invalidation."""

import io
import pathlib

import pytest
import torch

from chatterbox_worker.engine.conditionals import VoiceConditionals
from chatterbox_worker.errors import InvalidVoiceFile, VoiceNotFound
from chatterbox_worker.tiny_model import synthetic_reference
from chatterbox_worker.voices import VoiceStore, parse_voice_file, voice_file_bytes

SIGNATURE = "chatterbox-original-test"


def conditionals(seed: int) -> VoiceConditionals:
    g = torch.Generator().manual_seed(seed)
    return VoiceConditionals(
        speaker_emb=torch.randn(1, 256, generator=g),
        cond_prompt_speech_tokens=torch.randint(0, 6561, (1, 150), generator=g),
        prompt_token=torch.randint(0, 6561, (1, 100), generator=g),
        prompt_token_len=torch.tensor([100]),
        prompt_feat=torch.randn(1, 200, 80, generator=g),
        embedding=torch.randn(1, 192, generator=g))


def voice_bytes(voice_id="narrator", seed=0, model=SIGNATURE, **overrides) -> bytes:
    data = voice_file_bytes(voice_id, conditionals(seed), model=model, variant="original",
                            reference_audio=synthetic_reference(seconds=3, seed=seed),
                            reference_sample_rate=24000)
    if not overrides:
        return data
    raw = torch.load(io.BytesIO(data), weights_only=True)
    for key, value in overrides.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    buffer = io.BytesIO()
    torch.save(raw, buffer)
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    return VoiceStore(tmp_path, model_signature=SIGNATURE, variant="original")


def test_round_trip_keeps_every_tensor_and_the_metadata():
    voice = parse_voice_file(voice_bytes(seed=3))
    for name, tensor in conditionals(3).tensors().items():
        assert torch.equal(voice.conditionals.tensors()[name], tensor)
    meta = voice.metadata()
    assert meta["voice_id"] == "narrator" and meta["model"] == SIGNATURE
    assert meta["reference_s"] == 3.0 and meta["created_at"].endswith("+00:00")
    assert voice.reference_audio.dtype == torch.int16


def test_unknown_voice_has_the_exact_message(store):
    with pytest.raises(VoiceNotFound) as info:
        store.load("nobody")
    assert info.value.as_item() == {"error": "voice_not_found: Voice 'nobody' not found."}


@pytest.mark.parametrize("overrides,needle", [
    ({"conditionals": None}, "'conditionals' is missing"),
    ({"format": "something-else"}, "not a voice file"),
    ({"format_version": 99}, "version 99"),
    ({"reference_audio": torch.zeros(10)}, "int16"),
    ({"voice_id": "../../etc"}, "not a valid voice id"),
])
def test_malformed_files_are_refused_before_use(overrides, needle):
    with pytest.raises(InvalidVoiceFile, match=needle.replace("(", r"\(")):
        parse_voice_file(voice_bytes(**overrides))


@pytest.mark.parametrize("name,value,needle", [
    ("speaker_emb", torch.zeros(1, 255), "shape"),
    ("prompt_feat", torch.zeros(1, 200, 80, dtype=torch.float64), "dtype"),
    ("prompt_feat", torch.full((1, 200, 80), float("nan")), "NaN"),
    ("prompt_token", torch.full((1, 100), 9000), "outside the speech vocabulary"),
    ("prompt_token_len", torch.tensor([99]), "does not match"),
    ("cond_prompt_speech_tokens", torch.zeros(1, 501, dtype=torch.long), "501 tokens; at most 500"),
    ("prompt_token", torch.zeros(1, 0, dtype=torch.long), "0 tokens; 1 to 1000"),
    ("speaker_emb", torch.full((1, 256), 3e38), "beyond"),
    ("prompt_feat", torch.full((1, 200, 80), -2e4), "beyond"),
    ("speaker_emb", torch.zeros(1, 256).to_sparse(), "not a plain tensor"),
    ("cond_prompt_speech_tokens", torch.zeros(1, 150, dtype=torch.long).to_sparse(),
     "not a plain tensor"),
    ("speaker_emb", torch.empty(1, 256, device="meta"), "not a plain tensor"),
])
def test_bad_tensors_are_refused(name, value, needle):
    tensors = conditionals(0).tensors()
    tensors[name] = value
    with pytest.raises(InvalidVoiceFile, match=needle):
        parse_voice_file(voice_bytes(conditionals=tensors))


def test_a_nested_tensor_is_refused():
    """torch.load rebuilds nested tensors too; they have no shape to check (a 500 before)."""
    import warnings

    tensors = conditionals(0).tensors()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: nested tensors are a prototype
        tensors["speaker_emb"] = torch.nested.nested_tensor([torch.zeros(256)])
        data = voice_bytes(conditionals=tensors)
    with pytest.raises(InvalidVoiceFile, match="not a plain tensor"):
        parse_voice_file(data)


def test_garbage_is_refused():
    with pytest.raises(InvalidVoiceFile, match="not a readable voice file"):
        parse_voice_file(b"this is not a torch file")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_file_whose_pickle_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": "chatterbox-worker-voice", "x": _Payload(str(marker))}, buffer)
    # The payload does run under a plain unpickler: the test would catch a regression.
    with pytest.raises(InvalidVoiceFile):
        parse_voice_file(buffer.getvalue())
    assert not marker.exists()
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert marker.exists()


def test_voice_for_another_model_is_refused_naming_both(store):
    store.path_for("old").write_bytes(voice_bytes("old", model="chatterbox-original-0ld"))
    with pytest.raises(InvalidVoiceFile) as info:
        store.load("old")
    assert "chatterbox-original-0ld" in info.value.message and SIGNATURE in info.value.message
    assert "rebuild" in info.value.message


def test_file_must_hold_the_voice_it_is_named_for(store):
    store.path_for("alice").write_bytes(voice_bytes("bob"))
    with pytest.raises(InvalidVoiceFile, match="holds voice 'bob'"):
        store.load("alice")


def test_replacement_of_equal_size_is_seen_on_the_next_load(store):
    path = store.path_for("narrator")
    first, second = voice_bytes(seed=1), voice_bytes(seed=2)
    assert len(first) == len(second)
    path.write_bytes(first)
    stat = path.stat()
    assert torch.equal(store.load("narrator").conditionals.speaker_emb, conditionals(1).speaker_emb)
    path.write_bytes(second)
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert torch.equal(store.load("narrator").conditionals.speaker_emb, conditionals(2).speaker_emb)
    path.unlink()
    with pytest.raises(VoiceNotFound):
        store.load("narrator")


def test_cache_is_bounded_by_the_bytes_its_voices_hold(tmp_path):
    probe = VoiceStore(tmp_path / "probe", model_signature=SIGNATURE, variant="original")
    probe.path_for("p").parent.mkdir()
    probe.path_for("p").write_bytes(voice_bytes("p", seed=0))
    each = probe.load("p").memory_bytes
    assert each > 0
    store = VoiceStore(tmp_path, model_signature=SIGNATURE, variant="original",
                       cache_bytes=int(2.5 * each))
    for i in range(4):
        store.path_for(f"v{i}").write_bytes(voice_bytes(f"v{i}", seed=i))
        store.load(f"v{i}")
    assert sorted(store.cached()) == ["v2", "v3"]
    store.load("v2")  # used again: now the most recent
    store.path_for("v4").write_bytes(voice_bytes("v4", seed=4))
    store.load("v4")
    assert sorted(store.cached()) == ["v2", "v4"]
    assert store._cached_bytes == 2 * each
    assert store.voice_ids() == ["v0", "v1", "v2", "v3", "v4"]


def test_a_voice_over_the_cache_bound_is_still_served(tmp_path):
    store = VoiceStore(tmp_path, model_signature=SIGNATURE, variant="original", cache_bytes=1)
    for i in range(2):
        store.path_for(f"v{i}").write_bytes(voice_bytes(f"v{i}", seed=i))
        assert store.load(f"v{i}").voice_id == f"v{i}"
    assert sorted(store.cached()) == ["v1"]


def test_status_reports_unusable_directories(tmp_path):
    ok = VoiceStore(tmp_path / "new", model_signature=SIGNATURE, variant="original")
    assert ok.status() == "ok"
    afile = tmp_path / "file"
    afile.write_text("x")
    assert "not a directory" in VoiceStore(afile, model_signature="s", variant="original").status()

import shutil
from pathlib import Path

import pytest

from chatterbox_worker.engine.variants import VARIANTS
from chatterbox_worker.engine.weights import locate_weights
from chatterbox_worker.errors import ConfigError

FILES = VARIANTS["original"].required_files


def fake_checkpoint(directory: Path, files=FILES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in files:
        (directory / name).write_bytes(b"x")
    return directory


def hub_cache(root: Path, files=FILES, commit="abc123") -> Path:
    repo = root / "models--ResembleAI--chatterbox"
    fake_checkpoint(repo / "snapshots" / commit, files)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def no_hub(variant):
    raise AssertionError("the Hub must not be reached when an earlier source has the weights")


def offline_hub(variant):
    raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")


def test_model_dir_wins_and_is_never_skipped(tmp_path):
    model_dir = fake_checkpoint(tmp_path / "mine")
    baked = fake_checkpoint(tmp_path / "baked")
    found = locate_weights("original", model_dir=model_dir, baked_dir=baked,
                           volume_hf_cache=tmp_path / "cache", hub=no_hub)
    assert (found.source, found.directory) == ("model_dir", model_dir)

    (model_dir / "s3gen.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing s3gen.safetensors"):
        locate_weights("original", model_dir=model_dir, baked_dir=baked,
                       volume_hf_cache=tmp_path / "cache", hub=no_hub)


def test_order_is_baked_then_volume_cache_then_hub(tmp_path):
    baked, cache = tmp_path / "baked", tmp_path / "cache"
    snapshot = hub_cache(cache)
    fake_checkpoint(baked)
    kw = dict(model_dir=None, baked_dir=baked, volume_hf_cache=cache)
    assert locate_weights("original", hub=no_hub, **kw).source == "baked"
    shutil.rmtree(baked)
    found = locate_weights("original", hub=no_hub, **kw)
    assert (found.source, found.directory) == ("volume_cache", snapshot)
    shutil.rmtree(cache)
    hub_dir = fake_checkpoint(tmp_path / "downloaded")
    found = locate_weights("original", hub=lambda v: hub_dir, **kw)
    assert (found.source, found.directory) == ("hub", hub_dir)


def test_incomplete_sources_are_skipped(tmp_path):
    baked, cache = tmp_path / "baked", tmp_path / "cache"
    fake_checkpoint(baked, FILES[:2])
    hub_cache(cache, FILES[:3])
    hub_dir = fake_checkpoint(tmp_path / "downloaded")
    found = locate_weights("original", model_dir=None, baked_dir=baked, volume_hf_cache=cache,
                           hub=lambda v: hub_dir)
    assert found.source == "hub"


def test_nothing_found_names_every_source_tried_in_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        locate_weights("original", model_dir=None, baked_dir=tmp_path / "baked",
                       volume_hf_cache=tmp_path / "cache", hub=offline_hub)
    message = str(info.value)
    assert "\n" not in message
    for needle in ("image", "volume cache", "Hugging Face Hub", "couldn't connect"):
        assert needle in message


def test_unserved_variant_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'nope'"):
        locate_weights("nope", model_dir=None, baked_dir=tmp_path, volume_hf_cache=tmp_path,
                       hub=no_hub)


def test_the_real_hub_download_is_tried_last_into_the_volume_cache(tmp_path, monkeypatch):
    # HF_HUB_OFFLINE=1 (set for every test): huggingface_hub refuses at once,
    # which exercises the real download path without the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    volume = tmp_path / "runpod-volume"
    volume.mkdir()
    cache = volume / "huggingface-cache" / "hub"
    with pytest.raises(ConfigError) as info:
        locate_weights("original", model_dir=None, baked_dir=tmp_path / "baked", volume_hf_cache=cache)
    assert "Hugging Face Hub (ResembleAI/chatterbox)" in str(info.value)
    assert cache.is_dir()  # the download was pointed at the volume's cache

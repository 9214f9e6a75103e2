"""Where the model weights come from, in the order docs/API.md gives.

1. ``CHATTERBOX_MODEL_DIR``: a local checkpoint directory (upstream layout);
2. weights baked into the image (``CHATTERBOX_BAKED_DIR``);
3. the network volume's Hugging Face cache (RunPod's cached models);
4. the Hugging Face Hub (``ResembleAI/chatterbox``), the only step that uses
   the network.

A source is taken only when every file the variant needs is there, so a half
copied directory is skipped with a reason instead of failing mid-load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ..errors import ConfigError, reason

HUB_REPO = "ResembleAI/chatterbox"

# Files each variant loads (upstream layout). conds.pt, the built-in voice, is
# optional upstream; we fetch it when we can but do not require it.
VARIANT_FILES = {
    "original": ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"),
}
OPTIONAL_FILES = ("conds.pt",)


@dataclass(frozen=True)
class WeightSource:
    directory: Path
    source: str  # "model_dir", "baked", "volume_cache", "hub"


def required_files(variant: str) -> Sequence[str]:
    try:
        return VARIANT_FILES[variant]
    except KeyError:
        raise ConfigError(f"CHATTERBOX_VARIANT={variant!r} is not served by this worker yet; "
                          f"use one of: {', '.join(VARIANT_FILES)}") from None


def _missing(directory: Path, names: Sequence[str]) -> List[str]:
    return [n for n in names if not (directory / n).is_file() or (directory / n).stat().st_size == 0]


def _hub_cache_snapshot(cache_dir: Path, names: Sequence[str]) -> Optional[Path]:
    """The newest snapshot of the Hub repo in a Hugging Face cache that holds every file."""
    repo_dir = cache_dir / ("models--" + HUB_REPO.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text().strip())
    candidates += sorted((p for p in snapshots.iterdir() if p.is_dir()),
                         key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in candidates:
        if candidate.is_dir() and not _missing(candidate, names):
            return candidate
    return None


def download_from_hub(variant: str, cache_dir: Optional[Path] = None) -> Path:
    """Fetch the variant's files from the Hub; returns the local snapshot directory.

    With ``cache_dir`` (the network volume's Hugging Face cache, when it can be
    written) the download lands where the next cold worker looks first."""
    from huggingface_hub import snapshot_download

    patterns = list(required_files(variant)) + list(OPTIONAL_FILES)
    return Path(snapshot_download(repo_id=HUB_REPO, allow_patterns=patterns,
                                  cache_dir=str(cache_dir) if cache_dir else None))


def _writable_cache(cache_dir: Path) -> Optional[Path]:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache_dir if os.access(cache_dir, os.W_OK) else None


def locate_weights(variant: str, *, model_dir: Optional[Path], baked_dir: Path,
                   volume_hf_cache: Path,
                   hub: Optional[Callable[[str], Path]] = None) -> WeightSource:
    """Find the first usable weight source, or raise ``ConfigError`` naming all that were tried."""
    names = required_files(variant)
    tried = []
    if model_dir is not None:
        missing = _missing(Path(model_dir), names)
        if not missing:
            return WeightSource(Path(model_dir), "model_dir")
        # An explicit directory is the operator's choice: never fall back past it.
        raise ConfigError(f"CHATTERBOX_MODEL_DIR={model_dir} is not a complete {variant!r} checkpoint: "
                          f"missing {', '.join(missing)}")
    if not _missing(baked_dir, names):
        return WeightSource(baked_dir, "baked")
    tried.append(f"image ({baked_dir}): not there")
    snapshot = _hub_cache_snapshot(volume_hf_cache, names)
    if snapshot is not None:
        return WeightSource(snapshot, "volume_cache")
    tried.append(f"volume cache ({volume_hf_cache}): no complete {HUB_REPO} snapshot")
    if hub is None:
        # Download into the volume's cache when a volume is attached (its root,
        # two levels up, exists) and writable: later cold workers find it there.
        cache = _writable_cache(volume_hf_cache) if volume_hf_cache.parent.parent.is_dir() else None
        hub = lambda v: download_from_hub(v, cache)  # noqa: E731
    try:
        directory = hub(variant)
    except Exception as exc:  # any Hub failure: offline, auth, rate limit
        tried.append(f"Hugging Face Hub ({HUB_REPO}): {reason(exc, 200)}")
        raise ConfigError("no model weights found; tried " + "; ".join(tried)) from None
    missing = _missing(directory, names)
    if missing:
        tried.append(f"Hugging Face Hub ({HUB_REPO}): download lacks {', '.join(missing)}")
        raise ConfigError("no model weights found; tried " + "; ".join(tried))
    return WeightSource(directory, "hub")

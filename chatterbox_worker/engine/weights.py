"""Where the model weights come from, in the order docs/API.md gives.

1. ``CHATTERBOX_MODEL_DIR``: a local checkpoint directory (upstream layout);
2. weights baked into the image (``CHATTERBOX_BAKED_DIR``);
3. the network volume's Hugging Face cache (RunPod's cached models);
4. the Hugging Face Hub (the variant's repository, ``variants.Variant.hub_repo``),
   the only step that uses the network.

A source is taken only when every file the variant needs is there, so a half
copied directory is skipped with a reason instead of failing mid-load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import ConfigError, reason

from .variants import variant as variant_spec

# The original model's repository (each variant names its own: ``Variant.hub_repo``).
HUB_REPO = "ResembleAI/chatterbox"


@dataclass(frozen=True)
class WeightSource:
    directory: Path
    source: str  # "model_dir", "baked", "volume_cache", "hub"
    # The weight files it was chosen for; empty: the variant's required files.
    files: Tuple[str, ...] = ()


def required_files(variant: str) -> Sequence[str]:
    """The files ``variant`` loads (upstream layout); ``ConfigError`` for a variant not served.

    conds.pt, the built-in voice, is optional upstream: fetched when it can be,
    never required."""
    return variant_spec(variant).required_files


def _missing(directory: Path, names: Sequence[str]) -> List[str]:
    return [n for n in names if not (directory / n).is_file() or (directory / n).stat().st_size == 0]


def _hub_cache_snapshot(cache_dir: Path, repo: str, names: Sequence[str]) -> Optional[Path]:
    """The newest snapshot of ``repo`` in a Hugging Face cache that holds every file."""
    repo_dir = cache_dir / ("models--" + repo.replace("/", "--"))
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


def download_from_hub(variant: str, cache_dir: Optional[Path] = None,
                      files: Optional[Sequence[str]] = None) -> Path:
    """Fetch the variant's files from the Hub; returns the local snapshot directory.

    With ``cache_dir`` (the network volume's Hugging Face cache, when it can be
    written) the download lands where the next cold worker looks first."""
    from huggingface_hub import snapshot_download

    spec = variant_spec(variant)
    patterns = list(files or spec.required_files) + list(spec.optional_files)
    return Path(snapshot_download(repo_id=spec.hub_repo, allow_patterns=patterns,
                                  cache_dir=str(cache_dir) if cache_dir else None))


def _writable_cache(cache_dir: Path) -> Optional[Path]:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache_dir if os.access(cache_dir, os.W_OK) else None


def locate_weights(variant: str, *, model_dir: Optional[Path], baked_dir: Path,
                   volume_hf_cache: Path,
                   hub: Optional[Callable[[str], Path]] = None,
                   files: Optional[Sequence[str]] = None) -> WeightSource:
    """Find the first usable weight source, or raise ``ConfigError`` naming all that were tried.

    ``files``: the weight files to look for when a setting changes the
    variant's set (``variants.weight_files``); the source records them."""
    names = tuple(files) if files else tuple(required_files(variant))
    repo = variant_spec(variant).hub_repo
    tried = []
    if model_dir is not None:
        missing = _missing(Path(model_dir), names)
        if not missing:
            return WeightSource(Path(model_dir), "model_dir", names)
        # An explicit directory is the operator's choice: never fall back past it.
        raise ConfigError(f"CHATTERBOX_MODEL_DIR={model_dir} is not a complete {variant!r} checkpoint: "
                          f"missing {', '.join(missing)}")
    if not _missing(baked_dir, names):
        return WeightSource(baked_dir, "baked", names)
    tried.append(f"image ({baked_dir}): not there")
    snapshot = _hub_cache_snapshot(volume_hf_cache, repo, names)
    if snapshot is not None:
        return WeightSource(snapshot, "volume_cache", names)
    tried.append(f"volume cache ({volume_hf_cache}): no complete {repo} snapshot")
    if hub is None:
        # Download into the volume's cache when a volume is attached (its root,
        # two levels up, exists) and writable: later cold workers find it there.
        cache = _writable_cache(volume_hf_cache) if volume_hf_cache.parent.parent.is_dir() else None
        hub = lambda v: download_from_hub(v, cache, names)  # noqa: E731
    try:
        directory = hub(variant)
    except Exception as exc:  # any Hub failure: offline, auth, rate limit
        tried.append(f"Hugging Face Hub ({repo}): {reason(exc, 200)}")
        raise ConfigError("no model weights found; tried " + "; ".join(tried)) from None
    missing = _missing(directory, names)
    if missing:
        tried.append(f"Hugging Face Hub ({repo}): download lacks {', '.join(missing)}")
        raise ConfigError("no model weights found; tried " + "; ".join(tried))
    return WeightSource(directory, "hub", names)

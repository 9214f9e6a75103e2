"""Bake the model weights into the image (run by the Dockerfile's builder stage).

    python builder/fetch_models.py --variant original --dest /opt/chatterbox/weights
    python builder/fetch_models.py --variant multilingual --mtl-t3 v3 --dest ...

Downloads only the files the variant loads, then checks each against the size
and SHA-256 that the Hub reports for it, so a truncated or corrupted download
fails the build instead of the first job.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_worker.engine.variants import variant as variant_spec, weight_files  # noqa: E402


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(variant: str, dest: Path, revision: str | None = None, mtl_t3: str = "v2") -> None:
    from huggingface_hub import HfApi, hf_hub_download

    spec = variant_spec(variant)
    repo = spec.hub_repo
    info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    listed = {s.rfilename: s for s in info.siblings}
    wanted = list(weight_files(variant, mtl_t3=mtl_t3)) + [f for f in spec.optional_files if f in listed]
    dest.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        if name not in listed:
            raise SystemExit(f"{repo}@{info.sha} has no {name}")
        local = Path(hf_hub_download(repo, name, revision=info.sha))
        target = dest / name
        shutil.copyfile(local, target)
        meta = listed[name]
        expected_size = meta.lfs.size if meta.lfs else meta.size
        if expected_size is not None and target.stat().st_size != expected_size:
            raise SystemExit(f"{name}: {target.stat().st_size} bytes, the Hub says {expected_size}")
        if meta.lfs is not None and sha256_of(target) != meta.lfs.sha256:
            raise SystemExit(f"{name}: SHA-256 differs from the Hub's")
        print(f"fetched {name} ({target.stat().st_size} bytes, verified)")
    (dest / "REVISION").write_text(f"{repo}@{info.sha}\n")
    # Which model was baked: the entrypoint prepares the volume's download
    # cache when the worker is asked to serve another one.
    (dest / "VARIANT").write_text(f"{variant}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="original")
    parser.add_argument("--dest", type=Path, default=Path("/opt/chatterbox/weights"))
    parser.add_argument("--revision", default=None, help="Hub commit to pin (default: main)")
    parser.add_argument("--mtl-t3", choices=("v2", "v3"), default="v2",
                        help="multilingual: which T3 weights to bake (CHATTERBOX_MTL_T3 must match)")
    args = parser.parse_args()
    fetch(args.variant, args.dest, args.revision, args.mtl_t3)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python handler.py`` without RunPod: run ``test_input.json`` for real and save the audio.

The runpod SDK's local test mode calls a generator handler and never iterates
it (it logs a generator object and exits 0 without doing the job). This runs
the job, saves its audio to ``output/<job id>.<ext>``, prints that path on a
line of its own and exits non-zero when the job failed.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from .audio import EXTENSIONS


def read_job(argv: List[str], default_file: Path) -> dict:
    """The job from ``--test_input '{...}'`` (as runpod accepts it) or ``test_input.json``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--test_input", default=None)
    args, _ = parser.parse_known_args(argv)
    raw = args.test_input if args.test_input is not None else default_file.read_text()
    job = json.loads(raw)
    if not isinstance(job, dict) or "input" not in job:
        raise ValueError("a test job is a JSON object with an 'input' object")
    job.setdefault("id", "local-test")
    return job


def run_job(handler: Callable[[dict], Iterable[dict]], job: dict, output_dir: Path,
            out=sys.stdout) -> int:
    """Iterate the handler, save the audio it returns; exit status 0 on success, 1 on failure."""
    chunks: List[bytes] = []
    result: Optional[dict] = None
    for item in handler(job):
        if "error" in item:
            print(f"job failed: {item['error']}", file=sys.stderr)
            return 1
        if item.get("type") == "chunk":
            chunks.append(base64.b64decode(item["audio_base64"]))
        elif item.get("type") == "result" or "status" in item or "voices" in item or "voice_id" in item:
            result = item
    if result is None:
        print("job failed: the handler returned no result", file=sys.stderr)
        return 1
    audio = base64.b64decode(result["audio_base64"]) if "audio_base64" in result else b"".join(chunks)
    shown = {k: v for k, v in result.items() if k not in ("audio_base64", "voice_base64")}
    print(json.dumps(shown), file=sys.stderr)
    if "audio_url" in result and not audio:
        print(result["audio_url"], file=out)  # the audio went to S3
    elif audio:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / f"{job['id']}.{EXTENSIONS.get(result.get('format'), 'bin')}"
        path.write_bytes(audio)
        print(path, file=out)
    return 0

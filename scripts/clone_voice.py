"""Build a voice offline from a folder of recordings of one speaker and store it.

    python scripts/clone_voice.py --input_dir DIR --output_voice_id ID [--voices_dir DIR] [--overwrite]

Uses the same model settings as the worker (CHATTERBOX_MODEL_DIR, ...), so the
voice fits the model the endpoint serves. 1-5 minutes of clean speech in total
is typical. Prints a summary on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input_dir", type=Path, required=True)
    parser.add_argument("--output_voice_id", required=True)
    parser.add_argument("--voices_dir", type=Path, default=None,
                        help="default: VOICES_DIR, as the worker uses it")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from chatterbox_worker.engine.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    from chatterbox_worker.cloning import build_voice
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine
    from chatterbox_worker.errors import ConfigError, WorkerError
    from chatterbox_worker.schemas import is_voice_id
    from chatterbox_worker.voices import VoiceStore

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if not is_voice_id(args.output_voice_id):
        print("--output_voice_id must be 1-64 letters, digits, '_' or '-'", file=sys.stderr)
        return 2
    if not args.input_dir.is_dir():
        print(f"--input_dir {args.input_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        voices_dir = args.voices_dir or settings.voices_dir
        store = VoiceStore(voices_dir, model_signature="", variant=settings.variant)
        if store.exists(args.output_voice_id) and not args.overwrite:
            print(f"voice '{args.output_voice_id}' already exists in {voices_dir}; "
                  f"pass --overwrite to replace it", file=sys.stderr)
            return 1
        try:  # before minutes of model loading and cloning, not after
            Path(voices_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=voices_dir):
                pass
        except OSError as exc:
            print(f"clone_voice: cannot write to --voices_dir {voices_dir}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        progress("loading the model")
        engine = load_engine(settings.model_copy(update={"warmup": False}))
        data, report = build_voice(engine, args.input_dir, args.output_voice_id, progress=progress)
        store.save(args.output_voice_id, data, overwrite=args.overwrite)
    except (ConfigError, WorkerError) as exc:
        print(f"clone_voice: {getattr(exc, 'code', 'error')}: {getattr(exc, 'message', exc)}",
              file=sys.stderr)
        return 1
    summary = {"voice_id": args.output_voice_id, "voices_dir": str(voices_dir),
               "model": engine.model.signature, **report.summary()}
    print(json.dumps(summary, indent=1))
    for segment in report.dropped:
        progress(f"dropped {segment.source} @ {segment.start_s:.1f}s ({segment.seconds:.1f}s): "
                 f"{segment.dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

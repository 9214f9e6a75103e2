"""Call the Chatterbox worker on RunPod (or RunPod's local dev API) from the command line.

    export RUNPOD_API_KEY=... ENDPOINT_ID=...
    python scripts/client.py generate "Hello there." -o hello.mp3 [--stream] [--voice ID] [--seed N]
        [--exaggeration X] [--cfg-weight X] [--temperature X] [--top-p X] [--top-k N]
        [--min-p X] [--repetition-penalty X] [--language en] [--format F] [--sample-rate HZ] [--s3]
    python scripts/client.py upload narrator --audio ref.wav [--audio more.wav] [--overwrite]
    python scripts/client.py voices | voice narrator [--export FILE] | delete narrator | health
    python scripts/client.py rebuild-voices   # after switching the endpoint's model
    python scripts/client.py --local http://127.0.0.1:8000 generate "Hi." -o hi.wav

Exit codes: 0 done, 1 the job failed (the worker's error is printed), 2 bad usage,
3 the endpoint could not be reached.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from chatterbox_worker.client import (FORMATS, Endpoint, JobFailed, UsageError,  # noqa: E402
                                      cli_message, generate, output_format, stderr_progress)


# The generate job's sampling fields (docs/API.md), each a --flag of its own;
# the worker checks the ranges and its error names the flag. Left out, a field
# takes the served model's default (the original model's is shown).
SAMPLING = {
    "exaggeration": (0.25, 2.0, 0.5, "emotion intensity (not used by turbo: send nothing or 0)"),
    "cfg_weight": (0.0, 1.0, 0.5, "guidance weight, 0 turns guidance off"),
    "temperature": (0.05, 5.0, 0.8, "sampling temperature"),
    "top_p": ("above 0", 1.0, 1.0, "nucleus sampling"),
    "min_p": (0.0, 1.0, 0.05, "min-p sampling"),
    "repetition_penalty": (1.0, 2.0, 1.2, "penalty on repeated speech tokens"),
}


def number(text: str) -> float:
    """A finite number (JSON has no NaN or infinity)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=os.environ.get("ENDPOINT_ID"), help="RunPod endpoint id")
    p.add_argument("--local", default=None, help="URL of a local dev API instead of RunPod")
    p.add_argument("--timeout", type=float, default=600.0)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="speak text into a file")
    g.add_argument("text")
    g.add_argument("-o", "--out", type=Path, required=True)
    g.add_argument("--voice", default=None)
    g.add_argument("--format", default=None, choices=sorted(set(FORMATS.values())),
                   help="default: from the file's extension (" + ", ".join(FORMATS)
                   + "); wav when it has none")
    g.add_argument("--sample-rate", type=int, default=None)
    g.add_argument("--seed", type=int, default=None, help="same seed and inputs: same audio")
    for flag, (low, high, default, meaning) in SAMPLING.items():
        g.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=number, default=None,
                       metavar="X",
                       help=f"{meaning}; {low} to {high}, default {default} (the model's)")
    g.add_argument("--top-k", dest="top_k", type=int, default=None, metavar="N",
                   help="top-k sampling, 0 to 10000 (0: off); only the turbo model uses it")
    g.add_argument("--language", default=None, help="language code (default en; the multilingual "
                   "model speaks 23 languages, the others English only)")
    g.add_argument("--stream", action="store_true", help="write audio as chunks arrive")
    g.add_argument("--s3", action="store_true", help="have the worker upload the audio to its S3 "
                   "bucket (output: s3); the client downloads it from the presigned URL")
    u = sub.add_parser("upload", help="store a voice from reference audio or an exported voice file")
    u.add_argument("voice_id")
    u.add_argument("--audio", type=Path, action="append", default=[])
    u.add_argument("--voice-file", type=Path, default=None)
    u.add_argument("--overwrite", action="store_true")
    u.add_argument("--rebuild", action="store_true")
    sub.add_parser("voices", help="list stored voices")
    v = sub.add_parser("voice", help="one voice's metadata")
    v.add_argument("voice_id")
    v.add_argument("--export", type=Path, default=None, help="save the voice file here")
    d = sub.add_parser("delete", help="delete a voice")
    d.add_argument("voice_id")
    sub.add_parser("rebuild-voices", help="remake every stored voice made for another model "
                   "for the one the endpoint serves now")
    sub.add_parser("health", help="worker health")
    return p




def b64_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def run(args, endpoint: Endpoint) -> int:
    if args.command == "generate":
        job = {"text": args.text, "format": output_format(args.out, args.format),
               "stream": args.stream}
        for key, value in (("voice_id", args.voice), ("sample_rate", args.sample_rate),
                           ("seed", args.seed), ("language", args.language),
                           ("top_k", args.top_k),
                           *((name, getattr(args, name)) for name in SAMPLING)):
            if value is not None:
                job[key] = value
        if args.s3:
            job["output"] = "s3"
        partial = args.out.with_name(args.out.name + ".part")
        try:
            with open(partial, "wb") as out:
                result = generate(endpoint, job, out, progress=stderr_progress)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(args.out)
        shown = {k: v for k, v in result.items() if k != "audio_base64"}
        print(json.dumps({"file": str(args.out), **shown}))
        return 0
    if args.command == "upload":
        if bool(args.audio) == bool(args.voice_file):
            raise UsageError("upload needs --audio FILE (one or more) or --voice-file FILE")
        if args.rebuild and not args.voice_file:
            raise UsageError("--rebuild applies only to --voice-file")
        job = {"action": "upload_voice", "voice_id": args.voice_id, "overwrite": args.overwrite}
        if args.voice_file:
            job.update(voice_base64=b64_file(args.voice_file), rebuild=args.rebuild)
        else:
            clips = [b64_file(p) for p in args.audio]
            job["audio_base64"] = clips[0] if len(clips) == 1 else clips
        print(json.dumps(endpoint.call(job)))
        return 0
    if args.command == "voice":
        item = endpoint.call({"action": "get_voice", "voice_id": args.voice_id,
                              "export": args.export is not None})
        if args.export is not None:
            args.export.write_bytes(base64.b64decode(item.pop("voice_base64")))
        print(json.dumps(item))
        return 0
    job = {"voices": {"action": "list_voices"}, "health": {"action": "health"},
           "rebuild-voices": {"action": "rebuild_voices"},
           "delete": {"action": "delete_voice", "voice_id": getattr(args, "voice_id", None)}}[args.command]
    print(json.dumps(endpoint.call(job), indent=1))
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.local:
        endpoint = Endpoint(args.local.rstrip("/"), local=True, timeout_s=args.timeout)
    else:
        key = os.environ.get("RUNPOD_API_KEY")
        if not args.endpoint or not key:
            print("set RUNPOD_API_KEY and --endpoint (or ENDPOINT_ID), or use --local URL", file=sys.stderr)
            return 2
        endpoint = Endpoint.runpod(args.endpoint, key)
        endpoint.timeout_s = args.timeout
    try:
        return run(args, endpoint)
    except UsageError as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"job failed: {cli_message(str(exc))}", file=sys.stderr)
        return 1
    except requests.RequestException as exc:
        print(f"cannot reach the endpoint: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())

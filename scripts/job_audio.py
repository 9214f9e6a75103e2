"""Save the audio of a RunPod job answer (from curl) to a file, or print the job's error.

    curl ... /runsync ... | python3 scripts/job_audio.py out.wav
    curl ... /stream/ID   | python3 scripts/job_audio.py --append out.mp3   # once per poll

Reads one answer of /runsync, /status/{id} or /stream/{id} (RunPod or its
local dev API) on stdin. Writes the audio it carries: streamed chunks, an
inline result (``audio_base64``), or a result in S3 (``audio_url``,
downloaded). Prints the job's status (``IN_PROGRESS``, ``COMPLETED``, ...)
on stdout, so a polling loop knows when to stop. Exit codes: 0 no error so
far, 1 the job failed (its error is printed on stderr), 2 bad usage or an
answer that is not a job's.

Python 3 standard library only: it runs anywhere curl does.
"""

import base64
import json
import sys
import urllib.request

FAILED = ("FAILED", "CANCELLED", "TIMED_OUT")


def items_of(answer: dict) -> list:
    """The items a /runsync, /status or /stream answer carries, in order."""
    if answer.get("stream") is not None:
        return [entry.get("output", entry) if isinstance(entry, dict) else entry
                for entry in answer["stream"]]
    output = answer.get("output")
    if output is None:
        return []
    return output if isinstance(output, list) else [output]


def main(argv: list) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    args = [a for a in argv if a != "--append"]
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.strip().splitlines()[0] + "\nusage: job_audio.py [--append] OUT < answer.json",
              file=sys.stderr)
        return 2
    try:
        answer = json.load(sys.stdin)
    except ValueError as exc:
        print(f"not a JSON answer: {exc}", file=sys.stderr)
        return 2
    if not isinstance(answer, dict) or "status" not in answer:
        print(f"not a job answer: {json.dumps(answer)[:300]}", file=sys.stderr)
        return 2
    status = answer["status"]
    items = [item for item in items_of(answer) if isinstance(item, dict)]
    # RunPod puts a failed job's error in "error"; the dev API keeps the
    # error item in "output" and says COMPLETED.
    errors = [item["error"] for item in items if "error" in item]
    if status in FAILED or errors:
        print(f"job {status}: {answer.get('error') or '; '.join(map(str, errors)) or 'no error given'}",
              file=sys.stderr)
        return 1
    with open(args[0], "ab" if "--append" in argv else "wb") as out:
        for item in items:
            if item.get("type") == "chunk" or "audio_base64" in item:
                out.write(base64.b64decode(item["audio_base64"]))
            elif "audio_url" in item and "chunks" not in item:
                # A one-shot result in S3 (a streamed one already came as chunks).
                with urllib.request.urlopen(item["audio_url"], timeout=120) as response:
                    while block := response.read(1 << 20):
                        out.write(block)
    print(status)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

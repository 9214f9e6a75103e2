"""A small client for the worker: a RunPod endpoint, or RunPod's local dev API.

Used by ``scripts/client.py``. It speaks RunPod's public HTTP API
(``/run``, ``/runsync``, ``/status/{id}``, ``/stream/{id}``, ``/cancel/{id}``)
with ``requests``; the dev API differs only in using POST for ``/status`` and
``/stream`` and in answering ``/stream`` once, when the job is done.
"""

from __future__ import annotations

import base64
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import requests

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


class JobFailed(Exception):
    """The job ended with an error item or a failed status; the message is the worker's."""


@dataclass
class Endpoint:
    base_url: str  # https://api.runpod.ai/v2/<endpoint id>, or http://127.0.0.1:8000
    api_key: Optional[str] = None
    local: bool = False
    timeout_s: float = 600.0
    poll_s: float = 0.25

    @classmethod
    def runpod(cls, endpoint_id: str, api_key: str) -> "Endpoint":
        return cls(f"https://api.runpod.ai/v2/{endpoint_id}", api_key=api_key)

    def _request(self, method: str, path: str, payload=None) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        response = requests.request(method, self.base_url + path, json=payload, headers=headers,
                                    timeout=(10, max(30.0, self.timeout_s)))
        response.raise_for_status()
        return response.json()

    def submit(self, job_input: dict) -> str:
        return self._request("POST", "/run", {"input": job_input})["id"]

    def cancel(self, job_id: str) -> None:
        if not self.local:
            self._request("POST", f"/cancel/{job_id}")

    def items(self, job_id: str) -> Iterator[dict]:
        """Every item the job yields, as soon as the endpoint hands it out."""
        method = "POST" if self.local else "GET"
        deadline = time.monotonic() + self.timeout_s
        while True:
            answer = self._request(method, f"/stream/{job_id}")
            for entry in answer.get("stream", []) or []:
                yield entry["output"] if isinstance(entry, dict) and "output" in entry else entry
            status = answer.get("status")
            if status in DONE or self.local:
                if status and status != "COMPLETED" and answer.get("error"):
                    raise JobFailed(str(answer["error"]))
                return
            if time.monotonic() > deadline:
                self.cancel(job_id)
                raise JobFailed(f"no result after {self.timeout_s:.0f}s; job cancelled")
            time.sleep(self.poll_s)

    def call(self, job_input: dict) -> dict:
        """Run one job to completion; its last item (``JobFailed`` on an error item)."""
        last = None
        for item in self.items(self.submit(job_input)):
            last = item
        return check(last)


def check(item: Optional[dict]) -> dict:
    if item is None:
        raise JobFailed("the job returned nothing")
    if "error" in item:
        raise JobFailed(str(item["error"]))
    return item


def generate(endpoint: Endpoint, job_input: dict, out, *,
             progress: Callable[[str], None] = lambda m: None) -> dict:
    """Run a generate job, writing its audio to ``out`` as it arrives; the result item."""
    started = time.monotonic()
    result = None
    received = 0
    for item in endpoint.items(endpoint.submit(job_input)):
        if "error" in item:
            raise JobFailed(str(item["error"]))
        if item.get("type") == "chunk":
            data = base64.b64decode(item["audio_base64"])
            out.write(data)
            out.flush()
            received += len(data)
            progress(f"chunk {item['index']}: {received} bytes after {time.monotonic() - started:.2f}s")
        elif item.get("type") == "result":
            result = item
    result = check(result)
    if "audio_base64" in result:
        out.write(base64.b64decode(result["audio_base64"]))
    elif "audio_url" in result and not received:
        with requests.get(result["audio_url"], stream=True, timeout=(10, 120)) as response:
            response.raise_for_status()
            for block in response.iter_content(256 * 1024):
                out.write(block)
    return result


# Output file extensions and the format each one means.
FORMATS = {".wav": "wav", ".pcm": "pcm_s16le", ".raw": "pcm_s16le", ".flac": "flac",
           ".mp3": "mp3", ".opus": "opus", ".ogg": "opus"}


class UsageError(Exception):
    """A command line the client refuses before sending anything (exit code 2)."""


def output_format(path: Path, given: Optional[str] = None) -> str:
    """The format to ask for: ``given`` (``--format``), else the one ``path``'s extension names.

    A name without an extension gets WAV; an extension that names no format is
    refused, so ``speech.m4a`` never silently holds WAV bytes.
    """
    if given:
        return given
    suffix = path.suffix.lower()
    if not suffix:
        return "wav"
    if suffix not in FORMATS:
        raise UsageError(f"cannot tell the audio format from the file name '{path.name}': "
                         f"{suffix} is not one of {', '.join(FORMATS)}; rename the file or "
                         f"give --format ({', '.join(sorted(set(FORMATS.values())))})")
    return FORMATS[suffix]


# The worker's error messages name the job's JSON fields; the command line
# user knows the flags. Field names at the start of an invalid_input sentence,
# and the fixes the worker suggests, are said in the CLI's words.
FIELD_FLAGS = {
    "voice_id": "--voice", "format": "--format", "sample_rate": "--sample-rate",
    "seed": "--seed", "stream": "--stream", "output": "--s3", "exaggeration": "--exaggeration",
    "cfg_weight": "--cfg-weight", "temperature": "--temperature", "top_p": "--top-p",
    "top_k": "--top-k", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty", "language": "--language",
    "overwrite": "--overwrite", "rebuild": "--rebuild", "audio_base64": "--audio",
    "voice_base64": "--voice-file", "export": "--export",
}
FIX_PHRASES = (
    ("pass overwrite: true", "pass --overwrite"),
    ("Export it and upload it again with voice_base64 and rebuild: true",
     "Export it (voice ID --export FILE) and upload it again with --voice-file FILE --rebuild"),
    ("Upload it again with rebuild: true", "Upload it again with --rebuild"),
    ("use get_voice with export: true", "export it with: voice ID --export FILE"),
    ("with get_voice and export: true", "with: voice ID --export FILE"),
    ("use format 'opus' or 'mp3'", "use --format opus or mp3 (or a .opus or .mp3 file name)"),
    ("or output 's3'", "or --s3"),
    ("output 's3' needs S3 storage", "--s3 needs S3 storage"),
    ("rebuild applies only to voice_base64", "--rebuild applies only to --voice-file"),
)
_FIELD_AT_SENTENCE = re.compile(r"(^invalid_input: |; )(" + "|".join(FIELD_FLAGS) + r"): ")


def cli_message(error: str) -> str:
    """The worker's error as a command-line user reads it: flags instead of JSON fields."""
    for said, meant in FIX_PHRASES:
        error = error.replace(said, meant)
    return _FIELD_AT_SENTENCE.sub(lambda m: f"{m.group(1)}{FIELD_FLAGS[m.group(2)]}: ", error)


def stderr_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__: List[str] = ["Endpoint", "FORMATS", "JobFailed", "UsageError", "check", "cli_message",
                      "generate", "output_format", "stderr_progress"]

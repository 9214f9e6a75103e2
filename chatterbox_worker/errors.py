"""One exception tree for everything a job can fail with.

Each class carries the API error code of ``docs/API.md``; ``jobs`` turns any of them
into the single ``{"error": "<code>: <message>"}`` item a failed job yields.
"""

from __future__ import annotations

import re


class WorkerError(Exception):
    """Base of every error a client may see; ``code`` is the API error code."""

    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def as_item(self) -> dict:
        return {"error": f"{self.code}: {self.message}"}


class InvalidInput(WorkerError):
    code = "invalid_input"


class VoiceNotFound(WorkerError):
    code = "voice_not_found"

    def __init__(self, voice_id: str):
        super().__init__(f"Voice '{voice_id}' not found.")
        self.voice_id = voice_id


class VoiceExists(WorkerError):
    code = "voice_exists"


class InvalidAudio(WorkerError):
    code = "invalid_audio"


class InvalidVoiceFile(WorkerError):
    code = "invalid_voice_file"


class OutputTooLarge(WorkerError):
    code = "output_too_large"


class StorageUnavailable(WorkerError):
    code = "storage_unavailable"


class ModelUnavailable(WorkerError):
    """The model is still loading (server mode), or could not be loaded."""

    code = "model_unavailable"


class InternalError(WorkerError):
    code = "internal_error"


class ConfigError(Exception):
    """Malformed settings or unusable weights: the worker stops at start-up with one line."""


# Terminal escape sequences (colour codes some libraries put in their messages)
# and control characters: never part of a message a client reads.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b.?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """Client data, or a third party's message, as an error may quote it: printable and short.

    Longer text is cut with a visible marker, so a 200 KB field cannot make a
    200 KB error and a reader knows the quote is incomplete. Our own message
    text around the quote is never cut.
    """
    text = value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub(" ", _ESCAPE_SEQUENCE.sub("", text)).encode("utf-8", "replace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}… [{len(text) - limit} more characters]"
    return text


def reason(exc: BaseException, limit: int = 120) -> str:
    """First line of an exception's message (or its type), quotable in an error."""
    text = str(exc).strip()
    return excerpt(text.splitlines()[0], limit) if text else type(exc).__name__

"""One exception tree for everything a job can fail with.

Each class carries the API error code of ``API.md``; ``jobs`` turns any of them
into the single ``{"error": "<code>: <message>"}`` item a failed job yields.
"""

from __future__ import annotations


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


class InternalError(WorkerError):
    code = "internal_error"


class ConfigError(Exception):
    """Malformed settings or unusable weights: the worker stops at start-up with one line."""

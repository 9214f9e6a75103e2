"""The voice store: ``<VOICES_DIR>/<voice_id>.pth`` files on the network volume.

A voice file is a ``torch.save`` of a plain dict that ``torch.load(...,
weights_only=True)`` reads without running code: the conditionals, the model
signature they were made for, metadata, and the cleaned reference audio
(int16) so the voice can be rebuilt for another model. Every load checks keys,
types, dtypes and shapes before any of it is used.

Loaded voices are cached by the SHA-256 of the file's bytes: a voice replaced
or deleted by another worker on the shared volume is seen on the next job,
which metadata (mtime, size) on a network filesystem does not guarantee.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from .engine.conditionals import VoiceConditionals, check_tensors
from .errors import InvalidVoiceFile, StorageUnavailable, VoiceExists, VoiceNotFound
from .schemas import VOICE_ID_RE

log = logging.getLogger(__name__)

FILE_FORMAT = "chatterbox-worker-voice"
FILE_VERSION = 1
MAX_VOICE_FILE_BYTES = 32 * 1024 * 1024
META_KEYS = {"format": str, "format_version": int, "voice_id": str, "created_at": str,
             "reference_s": float, "model": str, "variant": str, "conditionals": dict,
             "reference_audio": torch.Tensor, "reference_sample_rate": int}


@dataclass(frozen=True)
class StoredVoice:
    voice_id: str
    created_at: str
    reference_s: float
    model: str
    variant: str
    size_bytes: int
    conditionals: VoiceConditionals
    reference_audio: torch.Tensor
    reference_sample_rate: int

    def metadata(self) -> dict:
        return {"voice_id": self.voice_id, "created_at": self.created_at,
                "reference_s": round(self.reference_s, 3), "model": self.model,
                "size_bytes": self.size_bytes}


def _fsync_directory(directory: Path) -> None:
    """Make a rename or unlink durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def voice_file_bytes(voice_id: str, conditionals: VoiceConditionals, *, model: str, variant: str,
                     reference_audio: np.ndarray, reference_sample_rate: int,
                     created_at: Optional[str] = None) -> bytes:
    """Serialise a voice to the bytes of its ``.pth`` file (format version ``FILE_VERSION``)."""
    audio = np.clip(np.asarray(reference_audio, dtype=np.float32), -1.0, 1.0)
    payload = {
        "format": FILE_FORMAT, "format_version": FILE_VERSION, "voice_id": voice_id,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference_s": round(len(audio) / reference_sample_rate, 3), "model": model,
        "variant": variant, "conditionals": conditionals.tensors(),
        "reference_audio": torch.from_numpy(np.round(audio * 32767.0).astype(np.int16)),
        "reference_sample_rate": int(reference_sample_rate),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def parse_voice_file(data: bytes, *, device: str = "cpu") -> StoredVoice:
    """Validate and decode a voice file's bytes (``InvalidVoiceFile`` on any problem)."""
    if len(data) > MAX_VOICE_FILE_BYTES:
        raise InvalidVoiceFile(f"voice file is {len(data)} bytes; the limit is {MAX_VOICE_FILE_BYTES}")
    try:
        # weights_only refuses any pickle that would construct arbitrary objects.
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise InvalidVoiceFile(f"not a readable voice file ({reason})") from None
    if not isinstance(raw, dict) or raw.get("format") != FILE_FORMAT:
        raise InvalidVoiceFile("not a voice file of this worker (use get_voice with export: true)")
    for key, kind in META_KEYS.items():
        value = raw.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidVoiceFile(f"field '{key}' is missing or not a {kind.__name__}")
    if raw["format_version"] != FILE_VERSION:
        raise InvalidVoiceFile(f"voice file version {raw['format_version']} is not supported "
                               f"(this worker reads version {FILE_VERSION})")
    if not VOICE_ID_RE.match(raw["voice_id"]):
        raise InvalidVoiceFile("field 'voice_id' is not a valid voice id")
    audio = raw["reference_audio"]
    if audio.dtype != torch.int16 or audio.dim() != 1:
        raise InvalidVoiceFile("field 'reference_audio' must be 1-D int16 samples")
    if not 8000 <= raw["reference_sample_rate"] <= 48000:
        raise InvalidVoiceFile("field 'reference_sample_rate' is out of range")
    try:
        check_tensors(raw["conditionals"])
    except ValueError as exc:
        raise InvalidVoiceFile(f"conditionals: {exc}") from None
    return StoredVoice(
        voice_id=raw["voice_id"], created_at=raw["created_at"],
        reference_s=float(raw["reference_s"]), model=raw["model"], variant=raw["variant"],
        size_bytes=len(data),
        conditionals=VoiceConditionals.from_tensors(raw["conditionals"], device=device),
        reference_audio=audio, reference_sample_rate=raw["reference_sample_rate"])


class VoiceStore:
    """Voice files in one directory, shared by every worker of an endpoint."""

    def __init__(self, directory: Path, *, model_signature: str, variant: str,
                 device: str = "cpu", cache_size: int = 32):
        self.directory = Path(directory)
        self.model_signature = model_signature
        self.variant = variant
        self.device = device
        self.cache_size = cache_size
        self._cache: "OrderedDict[str, StoredVoice]" = OrderedDict()
        self._lock = threading.Lock()

    def path_for(self, voice_id: str) -> Path:
        if not VOICE_ID_RE.match(voice_id):  # never let an id name another path
            raise ValueError(f"bad voice id {voice_id!r}")
        return self.directory / f"{voice_id}.pth"

    def status(self) -> str:
        """'ok', or why voices cannot be stored here."""
        if not self.directory.exists():
            parent = self.directory.parent
            if parent.is_dir() and os.access(parent, os.W_OK):
                return "ok"
            return f"voices directory {self.directory} does not exist and cannot be created"
        if not self.directory.is_dir():
            return f"{self.directory} is not a directory"
        if not os.access(self.directory, os.W_OK):
            return f"voices directory {self.directory} is read-only"
        return "ok"

    def _read(self, voice_id: str) -> bytes:
        path = self.path_for(voice_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise VoiceNotFound(voice_id) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read voice '{voice_id}': {exc.strerror}") from None

    def _parse_cached(self, data: bytes) -> StoredVoice:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        parsed = parse_voice_file(data, device=self.device)
        with self._lock:
            self._cache[digest] = parsed
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return parsed

    def load(self, voice_id: str) -> StoredVoice:
        """The voice as stored now; ``VoiceNotFound`` or ``InvalidVoiceFile`` otherwise."""
        cached = self._parse_cached(self._read(voice_id))
        if cached.voice_id != voice_id:
            raise InvalidVoiceFile(f"file {voice_id}.pth holds voice '{cached.voice_id}'")
        if cached.model != self.model_signature:
            raise InvalidVoiceFile(
                f"voice '{voice_id}' was made for model {cached.model}; this worker runs "
                f"{self.model_signature}. Export it and upload it again with voice_base64 and "
                f"rebuild: true to remake it for this model")
        return cached

    def save(self, voice_id: str, data: bytes, *, overwrite: bool) -> None:
        """Write a voice file atomically: readers see the old file or the new one, never a mix.

        The bytes go to a temporary file in the same directory, are flushed to
        disk, then renamed over the target (``overwrite``) or hard-linked to it,
        which fails if another worker created the id first (no lost update).
        """
        path = self.path_for(voice_id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{voice_id}.", suffix=".tmp", dir=self.directory)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write to the voices directory: {exc.strerror}") from None
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise VoiceExists(f"voice '{voice_id}' already exists; pass overwrite: true "
                                      f"to replace it") from None
            _fsync_directory(self.directory)
        except OSError as exc:
            raise StorageUnavailable(f"cannot write voice '{voice_id}': {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, voice_id: str) -> None:
        try:
            self.path_for(voice_id).unlink()
        except FileNotFoundError:
            raise VoiceNotFound(voice_id) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot delete voice '{voice_id}': {exc.strerror}") from None
        _fsync_directory(self.directory)

    def exists(self, voice_id: str) -> bool:
        return self.path_for(voice_id).exists()

    def read_file(self, voice_id: str) -> bytes:
        """The stored file's bytes (for export), checked like any load."""
        data = self._read(voice_id)
        parse_voice_file(data)
        return data

    def metadata(self, voice_id: str) -> dict:
        """A voice's metadata; a voice for another model is listed, not refused."""
        data = self._read(voice_id)
        return self._parse_cached(data).metadata()

    def list_metadata(self) -> List[dict]:
        """Metadata of every readable voice, sorted by id; unreadable files are logged and skipped."""
        out = []
        for voice_id in self.voice_ids():
            try:
                out.append(self.metadata(voice_id))
            except VoiceNotFound:
                continue  # deleted while listing
            except InvalidVoiceFile as exc:
                log.warning("voice file %s.pth is unreadable: %s", voice_id, exc.message)
        return out

    def voice_ids(self) -> List[str]:
        try:
            names = [p.stem for p in self.directory.glob("*.pth")]
        except OSError as exc:
            raise StorageUnavailable(f"cannot list voices: {exc.strerror}") from None
        return sorted(n for n in names if VOICE_ID_RE.match(n))

    def count(self) -> Optional[int]:
        try:
            return len(self.voice_ids())
        except StorageUnavailable:
            return None

    def cached(self) -> Dict[str, str]:
        with self._lock:
            return {v.voice_id: k for k, v in self._cache.items()}

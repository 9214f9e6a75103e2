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
import stat
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .engine.conditionals import TENSOR_SPEC, VoiceConditionals, check_tensors
from .errors import InvalidVoiceFile, StorageUnavailable, VoiceExists, VoiceNotFound, reason
from .schemas import is_voice_id

log = logging.getLogger(__name__)

FILE_FORMAT = "chatterbox-worker-voice"
FILE_VERSION = 1
MAX_VOICE_FILE_BYTES = 32 * 1024 * 1024
# Parsed voices kept in memory per worker, by the bytes their tensors hold.
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
# torch.save writes a zip of a few uncompressed entries (the pickle, one per
# tensor storage, version records). Anything else is not ours: a compressed
# entry could expand to gigabytes inside torch.load.
MAX_ARCHIVE_ENTRIES = 64
# Reference audio a voice may carry, at its stored rate: every clip of the
# largest upload (10 x 60 s with short gaps) fits; the 180 s the cloning
# script keeps does too.
MAX_REFERENCE_SECONDS = 10 * (60.0 + 0.25)
REFERENCE_RATE_RANGE = (8000, 48000)
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

    @property
    def memory_bytes(self) -> int:
        """What holding this voice in the cache costs: its tensors (conditionals may sit on the GPU)."""
        tensors = [*(getattr(self.conditionals, name) for name in TENSOR_SPEC), self.reference_audio]
        return sum(t.numel() * t.element_size() for t in tensors)

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


def check_archive(data: bytes) -> None:
    """``InvalidVoiceFile`` unless ``data`` is a torch zip archive whose entries stay small.

    Checked from the zip directory alone, before torch reads anything: every
    entry stored uncompressed (compressed and stored sizes equal) and all of
    them together within ``MAX_VOICE_FILE_BYTES``. torch's older non-zip
    format is refused too: it declares storage sizes that torch allocates
    before it reads them.
    """
    if len(data) > MAX_VOICE_FILE_BYTES:
        raise InvalidVoiceFile(f"voice file is {len(data)} bytes; the limit is {MAX_VOICE_FILE_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise InvalidVoiceFile(f"not a readable voice file ({reason(exc)}); export voices "
                               f"with get_voice and export: true") from None
    if not entries or len(entries) > MAX_ARCHIVE_ENTRIES:
        raise InvalidVoiceFile(f"voice file holds {len(entries)} entries; a voice file has at most "
                               f"{MAX_ARCHIVE_ENTRIES}")
    total = 0
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
            raise InvalidVoiceFile("voice file has compressed entries; voice files are written "
                                   "uncompressed by torch.save")
        total += entry.file_size
    if total > MAX_VOICE_FILE_BYTES:
        raise InvalidVoiceFile(f"voice file entries add up to {total} bytes; the limit is "
                               f"{MAX_VOICE_FILE_BYTES}")


def _check_tensor_memory(name: str, value: torch.Tensor) -> None:
    """A tensor may not claim more values than its stored bytes hold: a zero stride
    could make one stored value look like billions, which the next operation
    (a NaN check, a resample) would then allocate for real. (torch itself checks
    that a view stays inside its storage.) Sparse and meta tensors, which
    ``torch.load`` also rebuilds, hold no such storage and are refused first (nested
    ones too: they have no shape to check)."""
    if value.is_nested or value.layout is not torch.strided or value.device.type != "cpu":
        raise InvalidVoiceFile(f"field '{name}' is not a plain tensor ({value.layout}, "
                               f"{value.device.type})")
    if value.numel() * value.element_size() > value.untyped_storage().nbytes():
        raise InvalidVoiceFile(f"field '{name}' is not a plain tensor")


def parse_voice_file(data: bytes, *, device: str = "cpu") -> StoredVoice:
    """Validate and decode a voice file's bytes (``InvalidVoiceFile`` on any problem)."""
    check_archive(data)
    try:
        # weights_only refuses any pickle that would construct arbitrary objects.
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InvalidVoiceFile(f"not a readable voice file ({reason(exc, 160)})") from None
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
    if not is_voice_id(raw["voice_id"]):
        raise InvalidVoiceFile("field 'voice_id' is not a valid voice id")
    tensors = {"reference_audio": raw["reference_audio"], **{
        f"conditionals.{k}": v for k, v in raw["conditionals"].items() if isinstance(v, torch.Tensor)}}
    for name, value in tensors.items():
        _check_tensor_memory(name, value)
    audio = raw["reference_audio"]
    if audio.dtype != torch.int16 or audio.dim() != 1:
        raise InvalidVoiceFile("field 'reference_audio' must be 1-D int16 samples")
    rate = raw["reference_sample_rate"]
    low, high = REFERENCE_RATE_RANGE
    if not low <= rate <= high:
        raise InvalidVoiceFile(f"field 'reference_sample_rate' is {rate}; it must be {low}-{high}")
    if len(audio) > MAX_REFERENCE_SECONDS * rate:
        raise InvalidVoiceFile(f"field 'reference_audio' holds {len(audio) / rate:.0f} s of audio; "
                               f"at most {MAX_REFERENCE_SECONDS:.0f} s")
    try:
        check_tensors(raw["conditionals"])
    except ValueError as exc:
        raise InvalidVoiceFile(f"conditionals: {exc}") from None
    return StoredVoice(
        voice_id=raw["voice_id"], created_at=raw["created_at"],
        reference_s=float(raw["reference_s"]), model=raw["model"], variant=raw["variant"],
        size_bytes=len(data),
        conditionals=VoiceConditionals.from_tensors(raw["conditionals"], device=device),
        reference_audio=audio, reference_sample_rate=rate)


class VoiceStore:
    """Voice files in one directory, shared by every worker of an endpoint."""

    def __init__(self, directory: Path, *, model_signature: str, variant: str,
                 device: str = "cpu", cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.directory = Path(directory)
        self.model_signature = model_signature
        self.variant = variant
        self.device = device
        # Parsed voices, least recently used first, bounded by the memory they
        # hold (a voice's stored reference alone can be 58 MB), not by count.
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[str, StoredVoice]" = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def path_for(self, voice_id: str) -> Path:
        if not is_voice_id(voice_id):  # never let an id name another path
            raise ValueError(f"bad voice id {voice_id!r}")
        return self.directory / f"{voice_id}.pth"

    def status(self) -> str:
        """'ok', or why voices cannot be stored here."""
        if not self.directory.exists():
            # An upload creates the directory and any missing parents: it can
            # when the nearest folder that exists is writable.
            ancestor = self.directory.absolute().parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK):
                return "ok"
            return f"voices directory {self.directory} does not exist and cannot be created"
        if not self.directory.is_dir():
            return f"{self.directory} is not a directory"
        if not os.access(self.directory, os.W_OK):
            return f"voices directory {self.directory} is read-only"
        return "ok"

    def _read(self, voice_id: str) -> bytes:
        """The file's bytes, once it is known to be a regular file of plausible size.

        Opened non-blocking so a FIFO planted under a voice's name cannot hang
        the worker; a directory, device or oversized file is refused unread.
        """
        path = self.path_for(voice_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise VoiceNotFound(voice_id) from None
        except OSError as exc:
            raise StorageUnavailable(f"cannot read voice '{voice_id}': {exc.strerror}") from None
        info = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_size > MAX_VOICE_FILE_BYTES:
            problem = f"is {info.st_size} bytes; the limit is {MAX_VOICE_FILE_BYTES}"
        if problem:
            os.close(fd)
            raise InvalidVoiceFile(f"{voice_id}.pth {problem}")
        with os.fdopen(fd, "rb") as fh:
            try:
                data = fh.read(MAX_VOICE_FILE_BYTES + 1)
            except OSError as exc:
                raise StorageUnavailable(f"cannot read voice '{voice_id}': {exc.strerror}") from None
        if len(data) > MAX_VOICE_FILE_BYTES:  # grew after fstat
            raise InvalidVoiceFile(f"{voice_id}.pth is larger than {MAX_VOICE_FILE_BYTES} bytes")
        return data

    def _parse_cached(self, data: bytes) -> StoredVoice:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
                return cached
        parsed = parse_voice_file(data, device=self.device)
        with self._lock:
            if digest not in self._cache:
                self._cache[digest] = parsed
                self._cached_bytes += parsed.memory_bytes
            # The newest voice stays even when it alone is over the bound: it is in use.
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= evicted.memory_bytes
        return parsed

    def validated(self, voice_id: str, data: bytes) -> StoredVoice:
        """``data`` parsed as the file of ``voice_id`` (which it must hold, not a copy of
        another voice); cached, so a save of the same bytes is not parsed again."""
        cached = self._parse_cached(data)
        if cached.voice_id != voice_id:
            raise InvalidVoiceFile(f"file {voice_id}.pth holds voice '{cached.voice_id}'")
        return cached

    def load(self, voice_id: str) -> StoredVoice:
        """The voice as stored now; ``VoiceNotFound`` or ``InvalidVoiceFile`` otherwise."""
        cached = self.validated(voice_id, self._read(voice_id))
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
            raise StorageUnavailable(f"cannot write to the voices directory {self.directory}: "
                                     f"{exc.strerror}") from None
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

    def export(self, voice_id: str) -> Tuple[bytes, StoredVoice]:
        """The stored file's bytes and what they hold, checked like any load."""
        data = self._read(voice_id)
        return data, self.validated(voice_id, data)

    def metadata(self, voice_id: str) -> dict:
        """A voice's metadata; a voice for another model is listed, not refused."""
        return self.validated(voice_id, self._read(voice_id)).metadata()

    def list_metadata(self) -> List[dict]:
        """Metadata of every readable voice, sorted by id; unreadable files are logged and skipped."""
        out = []
        for voice_id in self.voice_ids():
            try:
                metadata = self.metadata(voice_id)
            except VoiceNotFound:
                continue  # deleted while listing
            except (InvalidVoiceFile, StorageUnavailable) as exc:  # a copy under another name too
                log.warning("voice file %s.pth is skipped: %s", voice_id, exc.message)
                continue
            out.append(metadata)
        return out

    def voice_ids(self) -> List[str]:
        """Ids of the regular ``<id>.pth`` files; other entries are skipped and logged."""
        ids = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if not entry.name.endswith(".pth") or entry.name.startswith("."):
                        continue  # not a voice (temporary files of a save in progress among them)
                    voice_id = entry.name[:-len(".pth")]
                    if not is_voice_id(voice_id):
                        log.warning("voices directory: skipped %r (not a valid voice id)",
                                    entry.name[:80])
                    elif not entry.is_file():
                        log.warning("voices directory: skipped %s (not a regular file)", entry.name)
                    else:
                        ids.append(voice_id)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageUnavailable(f"cannot list voices: {exc.strerror}") from None
        return sorted(ids)

    def count(self) -> Optional[int]:
        try:
            return len(self.voice_ids())
        except StorageUnavailable:
            return None

    def cached(self) -> Dict[str, str]:
        with self._lock:
            return {v.voice_id: k for k, v in self._cache.items()}

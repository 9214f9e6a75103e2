"""The voice actions of docs/API.md: upload (from audio, a URL or an exported file), get, list, delete.

Takes validated requests, returns result items; the voice files themselves are
``voices.VoiceStore``'s, the reference audio ``reference``'s, the model work
the engine's.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import List, Sequence

import numpy as np

from . import reference
from .engine import Engine
from .errors import (InvalidAudio, InvalidInput, InvalidVoiceFile, VoiceExists, VoiceNotFound,
                     WorkerError)
from .fetch import fetch_audio
from .schemas import DeleteVoiceRequest, GetVoiceRequest, UploadVoiceRequest
from .voices import (MAX_VOICE_FILE_BYTES, StoredVoice, VoiceStore, parse_voice_file,
                     voice_file_bytes)

log = logging.getLogger(__name__)

MAX_CLIPS = 10
CLIP_GAP_S = 0.25  # silence between clips in the stored reference audio


def _b64(value: str, what: str, error=InvalidAudio, *, max_bytes: int) -> bytes:
    """Decoded base64, line breaks allowed (MIME wraps at 76); the size is checked first."""
    compact = "".join(value.split())
    if len(compact) > 4 * -(-max_bytes // 3):
        raise error(f"{what} is about {len(compact) * 3 // 4} bytes; the limit is {max_bytes}")
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{what} is not valid base64") from None


def is_voice_archive(data: bytes) -> bool:
    """Whether ``data`` looks like a voice file (``torch.save`` writes a zip archive);
    no audio container starts like one."""
    return data[:4] == b"PK\x03\x04"


def _as_list(value) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def stored_reference(clips: Sequence[np.ndarray], first: int) -> np.ndarray:
    """All cleaned clips in one array, the prompt clip first, for rebuilding the voice later."""
    order = [first] + [i for i in range(len(clips)) if i != first]
    gap = np.zeros(int(CLIP_GAP_S * reference.SAMPLE_RATE), dtype=np.float32)
    parts = []
    for n, i in enumerate(order):
        if n:
            parts.append(gap)
        parts.append(clips[i])
    return np.concatenate(parts)


class VoiceLibrary:
    def __init__(self, engine: Engine, store: VoiceStore, *, allow_private_urls: bool = False):
        self.engine = engine
        self.store = store
        self.allow_private_urls = allow_private_urls

    @property
    def signature(self) -> str:
        return self.engine.model.signature

    def upload(self, request: UploadVoiceRequest) -> dict:
        self._check_free(request.voice_id, request.overwrite)
        if request.voice_base64 is not None:
            voice = parse_voice_file(_b64(request.voice_base64, "voice_base64", InvalidVoiceFile,
                                          max_bytes=MAX_VOICE_FILE_BYTES))
            data = self._import(request.voice_id, voice, rebuild=request.rebuild)
        else:
            data = self._from_audio(request)
        return self._store(request.voice_id, data, overwrite=request.overwrite)

    def upload_files(self, voice_id: str, files: List[bytes], *, labels: List[str],
                     overwrite: bool = False, rebuild: bool = False) -> dict:
        """Upload from raw files: one voice file exported by this project, or reference clips."""
        self._check_free(voice_id, overwrite)
        if not files:
            raise InvalidInput("give at least one file")
        if any(is_voice_archive(data) for data in files):
            if len(files) != 1:
                raise InvalidInput("an exported voice file comes alone, not with other files")
            if len(files[0]) > MAX_VOICE_FILE_BYTES:
                raise InvalidVoiceFile(f"{labels[0]} is {len(files[0])} bytes; the limit is "
                                       f"{MAX_VOICE_FILE_BYTES}")
            data = self._import(voice_id, parse_voice_file(files[0]), rebuild=rebuild)
        else:
            if rebuild:
                raise InvalidInput("rebuild applies only to an exported voice file")
            data = self._from_raw_clips(voice_id, files, labels)
        return self._store(voice_id, data, overwrite=overwrite)

    def _check_free(self, voice_id: str, overwrite: bool) -> None:
        if not overwrite and self.store.exists(voice_id):
            raise VoiceExists(f"voice '{voice_id}' already exists; pass overwrite: true "
                              f"to replace it")

    def _store(self, voice_id: str, data: bytes, *, overwrite: bool) -> dict:
        # Whatever goes to the volume passes the checks every later load makes:
        # nothing is written that the worker would then refuse to read.
        voice = self.store.validated(voice_id, data)
        self.store.save(voice_id, data, overwrite=overwrite)
        # What was written, not a second read: a delete racing this upload must not turn
        # the answer into voice_not_found after the file was saved.
        return voice.metadata()

    def _from_audio(self, request: UploadVoiceRequest) -> bytes:
        field = "audio_base64" if request.audio_base64 is not None else "audio_url"
        sources = _as_list(getattr(request, field))
        if len(sources) > MAX_CLIPS:
            raise InvalidInput(f"at most {MAX_CLIPS} reference clips per voice")
        labels = [f"{field}[{i}]" if len(sources) > 1 else field for i in range(len(sources))]
        if field == "audio_base64":
            raw = [_b64(s, label, max_bytes=reference.MAX_FILE_BYTES)
                   for s, label in zip(sources, labels)]
        else:
            raw = [fetch_audio(url, max_bytes=reference.MAX_FILE_BYTES,
                               allow_private=self.allow_private_urls) for url in sources]
        return self._from_raw_clips(request.voice_id, raw, labels)

    def _from_raw_clips(self, voice_id: str, raw: List[bytes], labels: List[str]) -> bytes:
        if len(raw) > MAX_CLIPS:
            raise InvalidInput(f"at most {MAX_CLIPS} reference clips per voice")
        spec = self.engine.variant
        own = spec.min_reference_s > reference.MIN_SECONDS  # the model needs more than the default
        clips = [reference.clean(reference.decode(data, label=label), label=label,
                                 min_seconds=spec.min_reference_s if own else reference.MIN_SECONDS,
                                 needed_by=spec.title if own else None)
                 for data, label in zip(raw, labels)]
        first = reference.cleanest(clips)
        audio = [c.audio for c in clips]
        conditionals = self.engine.voice_from_clips(audio, prompt_clip=first)
        return voice_file_bytes(voice_id, conditionals, model=self.signature,
                                variant=self.engine.model.variant,
                                reference_audio=stored_reference(audio, first),
                                reference_sample_rate=reference.SAMPLE_RATE)

    def _import(self, voice_id: str, voice: StoredVoice, *, rebuild: bool) -> bytes:
        if voice.model == self.signature:
            conditionals = voice.conditionals
        elif rebuild:
            # The same limit as an uploaded clip. The stored audio starts with
            # the clip the voice's prompt came from, so its first minute is
            # the best single clip to rebuild from.
            clip = self._reference_audio(voice)[: int(reference.MAX_SECONDS * reference.SAMPLE_RATE)]
            spec = self.engine.variant
            if len(clip) <= spec.min_reference_s * reference.SAMPLE_RATE:
                raise InvalidVoiceFile(
                    f"the voice file's reference audio is {len(clip) / reference.SAMPLE_RATE:.1f} s "
                    f"long; the {spec.title} model needs more than {spec.min_reference_s:g} s to "
                    f"rebuild from")
            conditionals = self.engine.voice_from_clips([clip])
        else:
            raise InvalidVoiceFile(
                f"this voice was made for model {voice.model}; this worker runs {self.signature}. "
                f"Upload it again with rebuild: true to remake it from its reference audio")
        return voice_file_bytes(voice_id, conditionals, model=self.signature,
                                variant=self.engine.model.variant,
                                reference_audio=self._reference_audio(voice),
                                reference_sample_rate=reference.SAMPLE_RATE,
                                created_at=None)

    @staticmethod
    def _reference_audio(voice: StoredVoice) -> np.ndarray:
        audio = voice.reference_audio.numpy().astype(np.float32) / 32767.0
        if voice.reference_sample_rate != reference.SAMPLE_RATE:
            import librosa

            audio = librosa.resample(audio, orig_sr=voice.reference_sample_rate,
                                     target_sr=reference.SAMPLE_RATE)
        if len(audio) < reference.MIN_SECONDS * reference.SAMPLE_RATE:
            raise InvalidVoiceFile("the voice file's reference audio is too short to rebuild from")
        return audio.astype(np.float32)

    def get(self, request: GetVoiceRequest) -> dict:
        if not request.export:
            return self.store.metadata(request.voice_id)
        data, voice = self.store.export(request.voice_id)
        item = voice.metadata()
        item["voice_base64"] = base64.b64encode(data).decode("ascii")
        return item

    def list(self) -> dict:
        return {"voices": self.store.list_metadata()}

    def rebuild_all(self) -> dict:
        """Every stored voice made for another model, remade for this one from its reference audio.

        For an operator who switched the endpoint's model: one job instead of
        an export and upload per voice. Voices already made for this model
        are left as they are; a voice that cannot be rebuilt is reported with
        its error and left untouched (nothing is half written: each file is
        replaced atomically, ``VoiceStore.save``).
        """
        rebuilt, current, failed = [], [], []
        for voice_id in self.store.voice_ids():
            try:
                _, voice = self.store.export(voice_id)
                if voice.model == self.signature:
                    current.append(voice_id)
                    continue
                data = self._import(voice_id, voice, rebuild=True)
                self._store(voice_id, data, overwrite=True)
                rebuilt.append(voice_id)
            except VoiceNotFound:
                continue  # deleted meanwhile
            except WorkerError as exc:
                failed.append({"voice_id": voice_id, "error": f"{exc.code}: {exc.message}"})
        log.info("rebuild_voices: %d rebuilt, %d already current, %d failed", len(rebuilt),
                 len(current), len(failed))
        return {"model": self.signature, "rebuilt": rebuilt, "current": current, "failed": failed}

    def delete(self, request: DeleteVoiceRequest) -> dict:
        self.store.delete(request.voice_id)
        return {"deleted": request.voice_id}

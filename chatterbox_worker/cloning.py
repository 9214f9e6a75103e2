"""Offline voice building from a folder of recordings (``scripts/clone_voice.py`` is its CLI).

Reads every audio file, cuts it into 5-15 s segments at pauses, drops the
segments that would teach the model the wrong thing (clipped, noisy, too
quiet, too short), and makes one voice from the rest: the speaker embedding
averages the best segments, the prompt comes from the cleanest one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import reference
from .errors import InvalidAudio

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".webm"}
MIN_SEGMENT_S = 5.0
MAX_SEGMENT_S = 15.0
SPLIT_TOP_DB = 35
MAX_CLIPPED_FRACTION = 0.001
MIN_SNR_DB = 15.0
MIN_RMS = 0.003
MAX_SEGMENTS = 12  # the speaker embedding gains little past a dozen clean segments
MAX_STORED_S = 180.0
# One recording in the folder (the operator's own files, longer than an upload's clip).
MAX_RECORDING_S = 3600.0
MAX_RECORDING_BYTES = 1024 * 1024 * 1024

SR = reference.SAMPLE_RATE


@dataclass
class Segment:
    source: str
    start_s: float
    audio: np.ndarray
    snr_db: float = 0.0
    dropped: Optional[str] = None

    @property
    def seconds(self) -> float:
        return len(self.audio) / SR


@dataclass
class CloneReport:
    files_read: List[str] = field(default_factory=list)
    files_failed: Dict[str, str] = field(default_factory=dict)
    kept: List[Segment] = field(default_factory=list)
    dropped: List[Segment] = field(default_factory=list)

    @property
    def seconds_used(self) -> float:
        return sum(s.seconds for s in self.kept)

    def summary(self) -> dict:
        reasons: Dict[str, int] = {}
        for s in self.dropped:
            reasons[s.dropped] = reasons.get(s.dropped, 0) + 1
        return {"files_read": len(self.files_read), "files_failed": self.files_failed,
                "segments_kept": len(self.kept), "segments_dropped": len(self.dropped),
                "dropped_by_reason": reasons, "seconds_used": round(self.seconds_used, 1),
                "prompt_from": (f"{self.kept[0].source} @ {self.kept[0].start_s:.1f}s"
                                if self.kept else None)}


def segments_at_pauses(audio: np.ndarray) -> List[Tuple[int, int]]:
    """(start, end) sample spans of 5-15 s, cut in the pauses between stretches of sound."""
    import librosa

    spans = librosa.effects.split(audio, top_db=SPLIT_TOP_DB, frame_length=1024, hop_length=256)
    out: List[Tuple[int, int]] = []
    start = end = None
    for s, e in spans:
        s, e = int(s), int(e)
        if start is None:
            start, end = s, e
        elif (e - start) / SR <= MAX_SEGMENT_S:
            end = e
        else:
            out.append((start, end))
            start, end = s, e
        while (end - start) / SR > MAX_SEGMENT_S:  # one long stretch without a pause
            cut = start + int(MAX_SEGMENT_S * SR)
            out.append((start, cut))
            start = cut
    if start is not None:
        out.append((start, end))
    return out


def assess(segment: Segment, clipped_fraction: float) -> Optional[str]:
    """Why a segment should not be used, or None."""
    if segment.seconds < MIN_SEGMENT_S:
        return "too short"
    if clipped_fraction > MAX_CLIPPED_FRACTION:
        return "clipped"
    if float(np.sqrt(np.mean(segment.audio ** 2))) < MIN_RMS:
        return "silent"
    if segment.snr_db < MIN_SNR_DB:
        return "noisy"
    return None


def collect_segments(directory: Path, progress: Callable[[str], None] = lambda m: None) -> CloneReport:
    report = CloneReport()
    files = sorted(p for p in Path(directory).iterdir()
                   if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    for n, path in enumerate(files, 1):
        progress(f"[{n}/{len(files)}] {path.name}")
        try:
            if path.stat().st_size > MAX_RECORDING_BYTES:
                raise InvalidAudio(f"{path.name} is larger than {MAX_RECORDING_BYTES} bytes")
            audio = reference.decode(path.read_bytes(), label=path.name,
                                     max_seconds=MAX_RECORDING_S, max_bytes=MAX_RECORDING_BYTES)
        except InvalidAudio as exc:
            report.files_failed[path.name] = exc.message
            continue
        report.files_read.append(path.name)
        for start, end in segments_at_pauses(audio):
            raw = audio[start:end]
            clipped = float(np.mean(np.abs(raw) >= 0.999))
            segment = Segment(path.name, start / SR, raw, snr_db=reference.estimate_snr_db(raw))
            segment.dropped = assess(segment, clipped)
            (report.dropped if segment.dropped else report.kept).append(segment)
    report.kept.sort(key=lambda s: s.snr_db, reverse=True)
    return report


def build_voice(engine, directory: Path, voice_id: str, *,
                progress: Callable[[str], None] = lambda m: None) -> Tuple[bytes, CloneReport]:
    """A voice file's bytes made from every usable segment in ``directory``, and the report."""
    from .voice_library import stored_reference
    from .voices import voice_file_bytes

    report = collect_segments(directory, progress)
    if not report.kept:
        raise InvalidAudio(f"no usable speech in {directory}: {report.summary()['dropped_by_reason'] or 'no audio files'}")
    best = report.kept[:MAX_SEGMENTS]
    clips = [reference.clean(s.audio, label=f"{s.source}@{s.start_s:.1f}s", max_seconds=MAX_SEGMENT_S + 1).audio
             for s in best]
    progress(f"building the voice from {len(clips)} segments ({sum(len(c) for c in clips) / SR:.1f} s)")
    conditionals = engine.voice_from_clips(clips, prompt_clip=0)
    stored = stored_reference(clips, 0)[: int(MAX_STORED_S * SR)]
    data = voice_file_bytes(voice_id, conditionals, model=engine.model.signature,
                            variant=engine.model.variant, reference_audio=stored,
                            reference_sample_rate=SR)
    return data, report

"""Text -> one take of speech: split, decode, vocode, join, watermark.

The ``Engine`` is the one object the worker keeps warm. Every request brings
its own voice, parameters and seed; the engine holds no state between
requests except the model weights.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..errors import InvalidAudio
from .conditionals import S3GEN_SR, VoiceConditionals, build_conditionals, from_upstream
from .decode import SamplingParams, text_tokens_for
from .batch_decode import BatchDecoder, DecodeRequest
from .fast_decode import FastDecoder
from .flow_graphs import FlowGraphs
from .turbo_batch import TurboBatchDecoder
from .turbo_fast import TurboFastDecoder
from .model import ChatterboxModel, t3_format
from .priority_lock import FIRST_AUDIO, STREAM, WHOLE, PriorityLock
from .scheduler import Scheduler
from .text import split_text, token_budget
from .variants import VARIANTS, Variant
from .vocoder import (FLOW_STEPS, StreamingVocoder, StreamSchedule, VocoderWork, Watermarker,
                      speakable, vocode_batch, whole_audio, whole_work)
from .vocoder_batch import VocoderBatcher

# Between pieces of long text: fades so no piece starts or ends on a click,
# and a short pause where a sentence break would be anyway.
PIECE_FADE_S = 0.01
PIECE_PAUSE_S = 0.08
SEED_MODULUS = 2**63


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: VoiceConditionals
    seed: int
    exaggeration: float = 0.5
    sampling: SamplingParams = field(default_factory=SamplingParams)
    language: str = "en"  # one of the served variant's languages (checked by the service)
    label: str = ""  # who asked ("job=..." or "request=..."), for the worker's log lines


@dataclass
class Synthesis:
    audio: np.ndarray  # float32 mono in [-1, 1] at sample_rate
    sample_rate: int
    pieces: int
    speech_tokens: int  # all tokens T3 made
    audio_tokens: int  # of those, the ones vocoded (special ids are dropped)
    total_s: float

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


class Cancelled(Exception):
    """The caller asked to stop; raised between decode steps."""


def fade_edges(audio: np.ndarray, seconds: float, sample_rate: int) -> np.ndarray:
    """Raised-cosine fade in and out over ``seconds`` at each end (a copy)."""
    n = min(len(audio) // 2, int(seconds * sample_rate))
    audio = np.array(audio, dtype=np.float32)
    if n:
        ramp = np.sin(np.linspace(0, np.pi / 2, n, dtype=np.float32)) ** 2
        audio[:n] *= ramp
        audio[-n:] *= ramp[::-1]
    return audio


def join_pieces(pieces: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    """One take from separately made pieces: edges faded, with a short pause between."""
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    pause = np.zeros(int(PIECE_PAUSE_S * sample_rate), dtype=np.float32)
    out: List[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if i:
            out.append(pause)
        out.append(fade_edges(piece, PIECE_FADE_S, sample_rate) if len(pieces) > 1 else piece)
    return np.concatenate(out).astype(np.float32)


class _PieceEdges:
    """The fades ``join_pieces`` puts on a piece's edges, applied chunk by chunk.

    The fade-out needs the piece's last ``n`` samples, which are only known at
    the end, so the last ``n`` samples seen are always held back."""

    def __init__(self, n: int):
        self.n = n
        self.received = 0
        self.held = np.zeros(0, dtype=np.float32)
        self.ramp = np.sin(np.linspace(0, np.pi / 2, n, dtype=np.float32)) ** 2

    def shape(self, audio: np.ndarray, last: bool) -> np.ndarray:
        if not self.n:
            return audio
        audio = np.array(audio, dtype=np.float32)
        if self.received < self.n:
            k = min(self.n - self.received, len(audio))
            audio[:k] *= self.ramp[self.received:self.received + k]
        self.received += len(audio)
        audio = np.concatenate([self.held, audio])
        if last:
            k = min(self.n, len(audio))
            if k:
                audio[len(audio) - k:] *= self.ramp[::-1][self.n - k:]
            self.held = np.zeros(0, dtype=np.float32)
            return audio
        self.held = audio[-self.n:].copy()
        return audio[:-self.n]


class Engine:
    """The warm model and what it can do for each request; safe to call from many threads."""

    sample_rate = S3GEN_SR

    def __init__(self, model: ChatterboxModel, *, watermark: bool = True, max_batch: int = 1,
                 cuda_graphs: bool = True, flow_steps: int = FLOW_STEPS,
                 batch_vocoder: Optional[bool] = None):
        """``max_batch``: most requests decoding at once (the worker's concurrency);
        ``cuda_graphs``: on CUDA, replay T3's decode step and the vocoder's flow
        solve from CUDA graphs (off: eager, for debugging);
        ``flow_steps``: the vocoder's flow-matching steps (upstream: 10);
        ``batch_vocoder``: run concurrent jobs' vocoder calls as one batch
        (``vocoder_batch``); None: on CUDA only. There a call is bound by
        kernel launches and a batch costs about one call; on a CPU it is bound
        by arithmetic (four full-size rows: 18.1 s together, 19.7 s one by one)
        and a batch only delays its first rows, and the exact path keeps each
        job's audio bit for bit its audio alone."""
        self.model = model
        self.flow_steps = flow_steps
        self.max_batch = max_batch
        self.warm_up_s: Optional[float] = None  # what ``warm_up`` took, once run
        self.cuda_graphs = cuda_graphs and str(model.device).startswith("cuda")
        # On CUDA the decode step (``FastDecoder``) and the vocoder's flow solve
        # (``FlowGraphs``) replay CUDA graphs: both are bound by kernel launches there.
        self.flow_graphs = (FlowGraphs(model.s3gen.flow.decoder,
                                       meanflow=getattr(model.s3gen, "meanflow", False))
                            if self.cuda_graphs else None)
        self.watermarker = Watermarker(watermark, device=model.device)
        # T3 decoding of every job runs on the scheduler's one thread, where
        # concurrent jobs share each step (continuous batching). Vocoder calls
        # and building a voice take this lock, one at a time (the watermark has
        # its own: a chunk ready to go out never waits for another job's call):
        # two at once would only split the same device (and double the
        # activations in memory); concurrent streams share a call instead
        # (``vocoder_calls``). It is held per call, so one job's vocoding
        # never waits for another's whole take, only for the call in
        # progress. Waiters are served by urgency: a stream's first chunk, then
        # later chunks, then whole takes (``priority_lock``); a token that
        # completes no chunk takes no lock at all.
        self._lock = PriorityLock()
        self._scheduler: Optional[Scheduler] = None
        self._scheduler_guard = threading.Lock()
        self._builtin = from_upstream(model.builtin_voice) if model.builtin_voice is not None else None
        on_cuda = str(model.device).startswith("cuda")
        if batch_vocoder is None:
            batch_vocoder = on_cuda
        self.batch_vocoder = bool(batch_vocoder) and max_batch > 1
        # On CUDA HiFT batches too, and calls of other lengths share a call padded
        # (one-shot takes above all). On a CPU both would cost more than they save.
        self.batch_hift = self.batch_vocoder and on_cuda
        self.vocoder_calls = VocoderBatcher(self._lock, self._vocode,
                                            max_batch=max_batch if self.batch_vocoder else 1,
                                            padding=self.batch_vocoder and on_cuda)

    @property
    def _end_tokens(self) -> torch.Tensor:
        """What upstream appends to every piece's tokens before vocoding (turbo: 3 silence tokens)."""
        return torch.tensor(self.variant.end_tokens, dtype=torch.long)

    @property
    def variant(self) -> Variant:
        """What the served model is: languages, sampling defaults, ignored fields."""
        return VARIANTS[self.model.variant]

    @property
    def builtin_voice(self) -> Optional[VoiceConditionals]:
        return self._builtin

    def voice_from_clips(self, clips_24k: Sequence[np.ndarray], prompt_clip: int = 0) -> VoiceConditionals:
        """A voice from cleaned 24 kHz clips (``InvalidAudio`` for one shorter than the model needs)."""
        spec = self.variant
        for i, clip in enumerate(clips_24k):
            seconds = len(clip) / self.sample_rate
            # Upstream turbo asserts its reference is longer than 5 s.
            if spec.min_reference_s and seconds <= spec.min_reference_s:
                which = f"reference clip {i + 1}" if len(clips_24k) > 1 else "the reference clip"
                raise InvalidAudio(f"{which} has {seconds:.1f} s of sound after trimming silence; "
                                   f"the {spec.title} model needs more than "
                                   f"{spec.min_reference_s:g} s")
        with self._lock.hold(WHOLE):
            return build_conditionals(self.model, clips_24k, prompt_clip)

    def check_text(self, text: str) -> None:
        """Refuse text the served model's tokenizer cannot read as meant (``InvalidInput``):
        turbo refuses a bracketed word that is not one of its event tags."""
        check = getattr(self.model.text_encoder, "check", None)
        if check is not None:
            check(text)

    def speech_tokens(self, request: SynthesisRequest, piece: str, generator: torch.Generator,
                      max_tokens: Optional[int] = None):
        """Iterator over the speech tokens of one piece of text; ``close()`` it to cancel.

        The tokens come from the scheduler's thread, decoded beside every other
        running request, and are bit for bit those ``decode_speech_tokens``
        gives alone (``batch_decode``).
        """
        t3_cond, _ = request.voice.for_request(request.exaggeration)
        text_tokens = text_tokens_for(self.model, piece, request.language)
        budget = max_tokens or token_budget(piece, request.language)
        return self.scheduler.submit(DecodeRequest(t3_cond=t3_cond, text_tokens=text_tokens,
                                                   params=request.sampling, max_new_tokens=budget,
                                                   generator=generator, label=request.label))

    @property
    def scheduler(self) -> Scheduler:
        """The decode scheduler, started with the first request."""
        with self._scheduler_guard:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.model.t3, decoder=self._new_decoder)
            return self._scheduler

    @property
    def decoder_kind(self) -> str:
        """``exact`` (float32 on CPU: tokens bit for bit those of the
        single-request loop, ``BatchDecoder``) or ``fast`` (static cache,
        padded batch, CUDA graphs on GPU: ``FastDecoder``). Turbo's GPT-2
        backbone: ``TurboBatchDecoder`` (exact) or ``TurboFastDecoder``."""
        exact = t3_format(self.model.t3) == "float32" and str(self.model.device) == "cpu"
        return "exact" if exact else "fast"

    def _new_decoder(self):
        turbo = getattr(self.model.t3, "is_gpt", False)
        if self.decoder_kind == "exact":
            return TurboBatchDecoder(self.model.t3) if turbo else BatchDecoder(self.model.t3)
        fast = TurboFastDecoder if turbo else FastDecoder
        return fast(self.model.t3, slots=self.max_batch, cuda_graphs=self.cuda_graphs)

    def _decode_piece(self, request: SynthesisRequest, piece: str, generator: torch.Generator,
                      max_tokens: Optional[int],
                      cancelled: Optional[Callable[[], bool]]) -> List[int]:
        """All speech tokens of one piece, checking ``cancelled`` before every decode step."""
        tokens: List[int] = []
        steps = self.speech_tokens(request, piece, generator, max_tokens)
        try:
            while cancelled is None or not cancelled():
                token = next(steps, None)
                if token is None:
                    return tokens
                tokens.append(token)
        finally:
            steps.close()  # frees the KV cache now, not when the collector runs
        raise Cancelled()

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.model.device).manual_seed(seed % SEED_MODULUS)

    def synthesize(self, request: SynthesisRequest, *,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancelled: Optional[Callable[[], bool]] = None,
                   max_tokens: Optional[int] = None) -> Synthesis:
        """The whole take at once (``stream: false``): each piece vocoded whole, as upstream does."""
        started = time.perf_counter()
        pieces = split_text(request.text, language=request.language)
        audio: List[np.ndarray] = []
        n_tokens = n_audio_tokens = 0
        generator = self.new_generator(request.seed)
        for index, piece in enumerate(pieces):
            tokens = self._decode_piece(request, piece, generator, max_tokens, cancelled)
            n_tokens += len(tokens)
            tokens = speakable(tokens)
            n_audio_tokens += len(tokens)
            tokens = torch.cat([tokens, self._end_tokens])
            _, gen = request.voice.for_request(request.exaggeration)
            work = whole_work(self.model, tokens, gen, seed=(request.seed + index) % SEED_MODULUS)
            if work is None:
                audio.append(np.zeros(0, dtype=np.float32))
            else:  # with other jobs' takes in one call where the batcher may
                audio.append(whole_audio(self.model, self.vocoder_calls.run(work, WHOLE)[0]))
            if progress is not None:
                progress(index + 1, len(pieces))
        take = self.watermarker.apply(join_pieces(audio, self.sample_rate), self.sample_rate)
        take = np.clip(take, -1.0, 1.0).astype(np.float32)
        return Synthesis(audio=take, sample_rate=self.sample_rate, pieces=len(pieces),
                         speech_tokens=n_tokens, audio_tokens=n_audio_tokens, total_s=time.perf_counter() - started)

    def stream(self, request: SynthesisRequest, *, schedule: StreamSchedule = StreamSchedule(),
               max_tokens: Optional[int] = None) -> Iterator[np.ndarray]:
        """The take as float32 chunks at 24 kHz, each yielded as soon as it is vocoded.

        Same tokens, pauses and fades as ``synthesize`` with the same seed.
        Closing the iterator (a cancelled job) stops decoding at once.
        """
        pieces = split_text(request.text, language=request.language)
        pause = np.zeros(int(PIECE_PAUSE_S * self.sample_rate), dtype=np.float32)
        fade = int(PIECE_FADE_S * self.sample_rate) if len(pieces) > 1 else 0
        generator = self.new_generator(request.seed)
        first = True  # no audio of this take has gone out yet
        for index, piece in enumerate(pieces):
            if index:
                yield pause
            _, gen = request.voice.for_request(request.exaggeration)
            vocoder = StreamingVocoder(self.model, gen, seed=(request.seed + index) % SEED_MODULUS,
                                       schedule=schedule, steps=self.flow_steps)
            edges = _PieceEdges(fade)
            tokens = self.speech_tokens(request, piece, generator, max_tokens)
            with self.vocoder_calls.following(vocoder, tokens) as live:
                try:
                    for token in tokens:
                        if not vocoder.add([token]):
                            continue
                        urgency = FIRST_AUDIO if first else STREAM
                        audio = vocoder.complete(*self.vocoder_calls.run(vocoder.due(), urgency, live))
                        if audio.size:
                            chunk = self._mark(edges.shape(audio, last=False))
                            with live.handing_over():
                                yield chunk
                            first = False
                finally:
                    tokens.close()  # a closed stream leaves the decoder before its next step
                vocoder.add(self._end_tokens)  # vocoded with the rest
                urgency = FIRST_AUDIO if first else STREAM
                work = vocoder.final()
                audio = (vocoder.flush() if work is None
                         else vocoder.complete(*self.vocoder_calls.run(work, urgency, live)))
            yield self._mark(edges.shape(audio, last=True))
            first = False

    def _vocode(self, works: List[VocoderWork]) -> list:
        """One vocoder call for the ``works`` ``vocoder_calls`` grouped (it holds the lock)."""
        return vocode_batch(self.model, works, self.flow_steps, batch_hift=self.batch_hift,
                            graphs=self.flow_graphs)

    def _mark(self, audio: np.ndarray) -> np.ndarray:
        marked = self.watermarker.apply(audio, self.sample_rate)
        return np.clip(marked, -1.0, 1.0).astype(np.float32)

    def warm_up(self) -> Optional[float]:
        """One short synthesis so the first job pays no lazy initialisation; seconds taken."""
        if self._builtin is None:
            return None
        started = time.perf_counter()
        # The served model's own defaults, so warm-up runs the paths jobs take (turbo's top-k).
        values = self.variant.sampling({})
        sampling = SamplingParams(**{k: values[k] for k in SamplingParams.__dataclass_fields__})
        request = SynthesisRequest(text="Warming up.", voice=self._builtin, seed=0,
                                   exaggeration=values["exaggeration"], sampling=sampling)
        self.synthesize(request, max_tokens=25)
        if self.flow_graphs is not None:
            # Streamed takes too: a first chunk's vocoder call has a shape of its own, whose
            # CUDA graph is made on its second use (``FlowGraphs``): here, not in a job's wait.
            for _ in range(2):
                for _ in self.stream(request, max_tokens=25):
                    pass
        self.warm_up_s = time.perf_counter() - started
        return self.warm_up_s

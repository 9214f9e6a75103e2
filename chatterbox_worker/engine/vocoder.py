"""Speech tokens -> 24 kHz audio with S3Gen, whole or in chunks, and the Perth watermark.

``flow_mels`` is upstream's ``CausalMaskedDiffWithXvec.inference`` followed by
``CausalConditionalCFM.forward`` (same encoder, same masks, same 10 cosine
Euler steps with classifier-free guidance), except that the flow-matching
noise is passed in instead of drawn inside. Given the noise upstream would
draw, it returns upstream's mels (tested). Passing it in is what lets a
streamed take and a one-shot take use the *same* noise: ``NoiseBank`` draws
it frame by frame, so any span of frames is the same whichever call asks.

One-shot vocoding (``vocode_whole``) runs the whole token sequence at once,
as upstream does. ``StreamingVocoder`` vocodes growing prefixes in chunks:
each chunk is recomputed with some left context and a shorter voice prompt
(the prompt's mel frames are re-processed at every flow step, the dominant
cost on a CPU), the last tokens wait for S3Gen's 3-token look-ahead, HiFT's
sine source is carried over, and seams are crossfaded.

A vocoder call's whole input is a ``VocoderWork``; ``vocode_batch`` runs
calls together (the flow as one batch, padded where lengths differ; HiFT as one
batch per length where that pays: ``hift``), which is how concurrent jobs share
the vocoder.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .flow import flow_solve, sync_free_chunk_mask
from .hift import hift, hift_batch

SPEECH_VOCAB_SIZE = 6561  # ids at or above this are special (start/stop/unused)
SAMPLES_PER_TOKEN = 960  # 25 tokens/s at 24 kHz; 2 mel frames of 480 samples each
MELS_PER_TOKEN = 2
LOOKAHEAD_TOKENS = 3  # S3Gen's pre-lookahead layer reads 3 tokens ahead
FLOW_STEPS = 10  # upstream's flow-matching (Euler) steps; CHATTERBOX_FLOW_STEPS changes it


def speakable(tokens) -> torch.Tensor:
    """Keep only real speech ids; S3Gen cannot vocode T3's special tokens."""
    t = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    return t[t < SPEECH_VOCAB_SIZE]


class NoiseBank:
    """Flow-matching noise for one piece: the prompt's frames, then speech frames drawn in order.

    Frames are drawn time-major from the piece's own generator, so frame k has
    the same noise whether a call covers frames 0..k+1 or k-10..k+40.
    """

    BLOCK = 256

    def __init__(self, seed: int, prompt_frames: int):
        self._generator = torch.Generator().manual_seed(seed % 2**63)
        self.prompt = torch.randn(prompt_frames, 80, generator=self._generator).T.unsqueeze(0)
        self._frames = torch.empty(0, 80)

    def speech(self, start: int, end: int) -> torch.Tensor:
        while self._frames.shape[0] < end:
            block = torch.randn(self.BLOCK, 80, generator=self._generator)
            self._frames = torch.cat([self._frames, block])
        return self._frames[start:end].T.unsqueeze(0)

    def for_span(self, prompt_frames: int, start: int, end: int) -> torch.Tensor:
        """(1, 80, prompt_frames + end - start): the last prompt frames, then speech frames."""
        prompt = self.prompt[:, :, self.prompt.shape[2] - prompt_frames:]
        return torch.cat([prompt, self.speech(start, end)], dim=2)


@dataclass(frozen=True)
class Prompt:
    """What S3Gen imitates: prompt tokens, their mel frames, the speaker x-vector."""

    tokens: torch.Tensor  # (1, P) long
    feat: torch.Tensor  # (1, 2P, 80)
    embedding: torch.Tensor  # (1, 192)

    @classmethod
    def from_gen(cls, gen: dict) -> "Prompt":
        tokens = gen["prompt_token"]
        return cls(tokens=tokens, feat=gen["prompt_feat"][:, :tokens.shape[1] * MELS_PER_TOKEN],
                   embedding=gen["embedding"])

    def last(self, n_tokens: Optional[int]) -> "Prompt":
        if n_tokens is None or n_tokens >= self.tokens.shape[1]:
            return self
        return Prompt(tokens=self.tokens[:, -n_tokens:],
                      feat=self.feat[:, -n_tokens * MELS_PER_TOKEN:], embedding=self.embedding)


@dataclass(frozen=True)
class VocoderWork:
    """One vocoder call's input: speech tokens, the voice prompt and the flow's noise;
    HiFT's seed and the sine source carried over from the stream's previous call."""

    tokens: torch.Tensor  # (1, N) long, on the host (copied with the batch's other inputs)
    prompt: Prompt
    noise: torch.Tensor  # (1, 80, prompt frames + 2N)
    seed: int = 0  # HiFT's sine source draws from generators seeded with this
    cache_source: Optional[torch.Tensor] = None  # (1, 1, S): the first S source samples

    @property
    def shape(self) -> tuple:
        """Calls of equal shape can run as one batch (``vocode_batch``)."""
        return (self.tokens.shape[1], self.prompt.tokens.shape[1], self.noise.shape[2])


@torch.inference_mode()
def flow_mels(model, tokens: torch.Tensor, prompt: Prompt, noise: torch.Tensor,
              steps: int = FLOW_STEPS) -> torch.Tensor:
    """Mel frames (1, 80, 2N) for ``tokens`` (1, N); ``noise`` covers prompt and speech frames.

    ``steps`` Euler steps of the flow decoder: each runs its estimator twice
    (with and without guidance), so the vocoder's cost is nearly proportional.
    """
    return flow_mels_batch(model, [VocoderWork(tokens, prompt, noise)], steps)[0]


@torch.inference_mode()
def flow_mels_batch(model, works, steps: int = FLOW_STEPS, graphs=None) -> List[torch.Tensor]:
    """``flow_mels`` of several calls in one batch; each row's mels (1, 80, 2N).

    Upstream's encoder and Euler solver take a padded batch (its
    ``CausalMaskedDiffWithXvec.inference`` pads to the longest row): the
    encoder's attention and the estimator's are masked to each row's length,
    its convolutions look back only (but for the 3-token look-ahead, which
    reads the masked zeros a row alone reads past its end), so each row is
    its call alone up to float rounding (the matrix products sum in another
    order for another row count). Calls of equal ``VocoderWork.shape`` need
    no padding; a batch of one is exactly ``flow_mels``. ``graphs`` (a
    ``FlowGraphs``): the flow's solve replayed from CUDA graphs.
    """
    from chatterbox.models.s3gen.utils.mask import make_pad_mask

    flow = model.s3gen.flow
    batch = len(works)
    device, dtype = works[0].prompt.tokens.device, model.s3gen.dtype
    # The speech tokens and the noise come from the host. Each is stacked there and
    # copied once, before any kernel of this call is queued: a copy from pageable
    # memory waits for the device's queue to drain. Lengths stay on the host too.
    prompts = [w.prompt.tokens.shape[1] for w in works]
    speech = [w.tokens.shape[1] for w in works]
    totals = [p + n for p, n in zip(prompts, speech)]
    longest = max(totals)
    host_tokens = torch.zeros((batch, max(speech)), dtype=torch.long)
    host_noise = torch.zeros((batch, flow.output_size, max(w.noise.shape[2] for w in works)),
                             dtype=dtype)
    for row, w in enumerate(works):
        host_tokens[row, :speech[row]] = w.tokens[0].cpu()
        host_noise[row, :, :w.noise.shape[2]] = w.noise[0].cpu()
    speech_tokens, noise = host_tokens.to(device), host_noise.to(device)
    lengths = torch.tensor(totals).to(device)
    embedding = torch.cat([torch.atleast_2d(w.prompt.embedding.to(device, dtype)) for w in works])
    embedding = flow.spk_embed_affine_layer(F.normalize(embedding, dim=1))
    all_tokens = torch.zeros((batch, longest), dtype=torch.long, device=device)
    for row, w in enumerate(works):
        all_tokens[row, :prompts[row]] = w.prompt.tokens[0]
        all_tokens[row, prompts[row]:totals[row]] = speech_tokens[row, :speech[row]]
    mask = (~make_pad_mask(lengths, longest)).unsqueeze(-1).to(embedding)
    h, h_masks = _encode(flow.encoder, flow.input_embedding(all_tokens.long()) * mask, lengths)
    h_lengths = h_masks.sum(dim=-1).squeeze(dim=-1)
    h = flow.encoder_proj(h)
    conds = torch.zeros([batch, h.shape[1], flow.output_size], device=device, dtype=h.dtype)
    for row, work in enumerate(works):
        conds[row, :work.prompt.feat.shape[1]] = work.prompt.feat[0].to(device, h.dtype)
    mask = (~make_pad_mask(h_lengths, h.shape[1])).unsqueeze(1).to(h)
    feat = flow_solve(flow.decoder, noise, h.transpose(1, 2).contiguous(), mask, embedding,
                      conds.transpose(1, 2), steps=steps,
                      meanflow=getattr(model.s3gen, "meanflow", False), graphs=graphs)
    return [feat[row:row + 1, :, w.prompt.feat.shape[1]:w.noise.shape[2]]
            for row, w in enumerate(works)]


def _encode(encoder, xs: torch.Tensor, lengths: torch.Tensor):
    """Upstream's ``UpsampleConformerEncoder.forward`` as inference calls it (full chunks),
    with one change for padded batches: padded positions are zeroed before the 3-token
    look-ahead. Upstream feeds it the input layer's output there, which is not zero
    (a LayerNorm's bias), so a shorter row's last tokens looked ahead into it where the
    row alone looks at zeros. Multiplying an unpadded row by its all-ones mask changes
    nothing, so a row alone is bit for bit upstream's (tested). Its chunk masks come from
    ``flow.sync_free_chunk_mask`` (the same masks without a read from the device) where
    the encoder uses static chunks, as the released one does."""
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask, make_pad_mask

    def chunk_mask(xs, masks, static_chunk_size):
        if encoder.use_dynamic_chunk:  # random chunks, a training setting: upstream's own
            return add_optional_chunk_mask(xs, masks, True, encoder.use_dynamic_left_chunk, 0,
                                           static_chunk_size, -1)
        return sync_free_chunk_mask(xs, masks, static_chunk_size)

    masks = ~make_pad_mask(lengths, xs.size(1)).unsqueeze(1)  # (B, 1, T)
    if encoder.global_cmvn is not None:
        xs = encoder.global_cmvn(xs)
    xs, pos_emb, masks = encoder.embed(xs, masks)
    chunk_masks = chunk_mask(xs, masks, encoder.static_chunk_size)
    xs = encoder.pre_lookahead_layer(xs * masks.transpose(1, 2).to(xs.dtype))
    xs = encoder.forward_layers(xs, chunk_masks, pos_emb, masks)
    xs, lengths = encoder.up_layer(xs.transpose(1, 2).contiguous(), lengths)
    xs = xs.transpose(1, 2).contiguous()
    masks = ~make_pad_mask(lengths, xs.size(1)).unsqueeze(1)
    xs, pos_emb, masks = encoder.up_embed(xs, masks)
    chunk_masks = chunk_mask(xs, masks, encoder.static_chunk_size * encoder.up_layer.stride)
    xs = encoder.forward_up_layers(xs, chunk_masks, pos_emb, masks)
    if encoder.normalize_before:
        xs = encoder.after_norm(xs)
    return xs, masks


def vocode_batch(model, works: Sequence[VocoderWork], steps: int = FLOW_STEPS, *,
                 batch_hift: bool = False, graphs=None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(audio (N,), HiFT source) of each call, in one batch (``flow_mels_batch``).

    The flow runs as one batch (padded where lengths differ); HiFT, whose
    convolutions see both ways and so cannot be padded, as one batch per
    length with ``batch_hift`` (it pays on CUDA only, see ``hift``), else row
    by row, each row bit for bit its call's HiFT alone.
    """
    mels = flow_mels_batch(model, works, steps, graphs)
    if not batch_hift:
        return [hift(model, m, w.cache_source, seed=w.seed) for m, w in zip(mels, works)]
    results: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(works)
    by_length: dict = {}
    for row, m in enumerate(mels):
        by_length.setdefault(m.shape[2], []).append(row)
    for rows in by_length.values():
        done = hift_batch(model, torch.cat([mels[r] for r in rows]), [works[r].seed for r in rows],
                          [works[r].cache_source for r in rows])
        for row, result in zip(rows, done):
            results[row] = result
    return results


def trim_start(model, audio: torch.Tensor) -> torch.Tensor:
    """Upstream's fade-in over the first 40 ms, which hides the reference clip's spill-over."""
    fade = model.s3gen.trim_fade
    n = min(len(fade), audio.shape[0])
    audio = audio.clone()
    audio[:n] *= fade[:n].to(audio.dtype)
    return audio


def vocode_whole(model, tokens: torch.Tensor, gen: dict, *, seed: int,
                 steps: int = FLOW_STEPS) -> np.ndarray:
    """One-shot: all tokens of a piece at once, as upstream's S3Gen.inference."""
    work = whole_work(model, tokens, gen, seed=seed)
    if work is None:
        return np.zeros(0, dtype=np.float32)
    [(audio, _)] = vocode_batch(model, [work], steps)
    return whole_audio(model, audio)


def whole_work(model, tokens: torch.Tensor, gen: dict, *, seed: int) -> Optional[VocoderWork]:
    """The vocoder call of a one-shot piece (``vocode_whole``); None for no speech tokens."""
    tokens = speakable(tokens).unsqueeze(0)  # on the host, as ``VocoderWork`` wants
    if tokens.shape[1] == 0:
        return None
    prompt = Prompt.from_gen(gen)
    bank = NoiseBank(seed, prompt.feat.shape[1])
    noise = bank.for_span(prompt.feat.shape[1], 0, tokens.shape[1] * MELS_PER_TOKEN)
    return VocoderWork(tokens, prompt, noise, seed=seed)


def whole_audio(model, audio: torch.Tensor) -> np.ndarray:
    """A one-shot call's audio as upstream returns it: faded in, float32 on the host."""
    return trim_start(model, audio).float().cpu().numpy()


@dataclass(frozen=True)
class StreamSchedule:
    """How a streamed piece is cut: chunk sizes in tokens (the last repeats), context sizes."""

    chunk_tokens: tuple = (8, 32, 96, 200)
    left_context_tokens: int = 16
    prompt_tokens: Optional[int] = 50  # last 2 s of the voice prompt; None = all of it
    crossfade_samples: int = 960

    def chunk_size(self, index: int) -> int:
        return self.chunk_tokens[min(index, len(self.chunk_tokens) - 1)]


class StreamingVocoder:
    """Vocodes one piece's tokens as they arrive; ``push`` returns audio ready to play."""

    def __init__(self, model, gen: dict, *, seed: int, schedule: StreamSchedule,
                 steps: int = FLOW_STEPS):
        self.model = model
        self.steps = steps
        self.schedule = schedule
        self.seed = seed
        self.prompt = Prompt.from_gen(gen).last(schedule.prompt_tokens)
        full_prompt_frames = Prompt.from_gen(gen).feat.shape[1]
        self.noise = NoiseBank(seed, full_prompt_frames)
        self.tokens: List[int] = []
        self.emitted = 0  # tokens whose audio has gone out (but for the held-back tail)
        self.chunks = 0
        self.tail = np.zeros(0, dtype=np.float32)
        self._source: Optional[torch.Tensor] = None
        self._source_start = 0  # absolute sample where _source begins
        self._pending: Optional[tuple] = None  # (start, end, final) of the call ``_work`` made

    def push(self, new_tokens) -> Optional[np.ndarray]:
        """Add tokens; returns audio when the next chunk of the schedule is due, else None."""
        return self.take() if self.add(new_tokens) else None

    def add(self, new_tokens) -> bool:
        """Add tokens (cheap, no model call); True when the next chunk is due (``take`` it)."""
        self.tokens.extend(int(t) for t in speakable(new_tokens).tolist())
        return self._ready() - self.emitted >= self.schedule.chunk_size(self.chunks)

    def next_call_shape(self, more: int) -> Optional[tuple]:
        """``VocoderWork.shape`` of the chunk call this stream makes once it has ``more``
        tokens than now; None if they complete no chunk (``vocoder_batch``'s look-ahead)."""
        if self._pending is not None:  # a call made and not yet complete: its next is far
            return None
        due_at = self.emitted + self.schedule.chunk_size(self.chunks) + LOOKAHEAD_TOKENS
        have = len(self.tokens)
        if have + more < due_at:
            return None
        n = max(due_at, have) - max(0, self.emitted - self.schedule.left_context_tokens)
        return (n, self.prompt.tokens.shape[1], self.prompt.feat.shape[1] + n * MELS_PER_TOKEN)

    def take(self) -> np.ndarray:
        """Vocode the chunk that ``add`` said is due."""
        return self._alone(self.due())

    def finish(self) -> np.ndarray:
        """The rest of the piece, tail included."""
        work = self.final()
        return self.flush() if work is None else self._alone(work)

    def due(self) -> VocoderWork:
        """The vocoder call of the chunk that ``add`` said is due (run it, then ``complete``)."""
        return self._work(self._ready(), final=False)

    def final(self) -> Optional[VocoderWork]:
        """The vocoder call of the rest of the piece; None when only the tail is left (``flush``)."""
        return self._work(len(self.tokens), final=True) if len(self.tokens) > self.emitted else None

    def complete(self, audio: torch.Tensor, source: torch.Tensor) -> np.ndarray:
        """The audio to play from the pending call's result (``vocode_batch`` of ``due()``
        or ``final()``): trimmed to what is new, the seam crossfaded. No model call."""
        sched = self.schedule
        start, end, final = self._pending
        # A copy: ``source`` may be a row of a whole batch's source, which a view would keep.
        self._source, self._source_start = source.clone(), start * SAMPLES_PER_TOKEN
        if start == 0:
            audio = trim_start(self.model, audio)
        audio = audio.float().cpu().numpy()
        base = start * SAMPLES_PER_TOKEN  # absolute sample of audio[0]
        fade = len(self.tail)
        begin = self.emitted * SAMPLES_PER_TOKEN - fade
        stop = end * SAMPLES_PER_TOKEN - (0 if final else sched.crossfade_samples)
        piece = audio[begin - base:stop - base].copy()
        if fade:
            ramp = np.sin(np.linspace(0, np.pi / 2, fade, dtype=np.float32)) ** 2
            piece[:fade] = self.tail * (1 - ramp) + piece[:fade] * ramp
        self.tail = (np.zeros(0, dtype=np.float32) if final
                     else audio[stop - base:end * SAMPLES_PER_TOKEN - base].copy())
        self.emitted = end
        self.chunks += 1
        self._pending = None
        return piece

    def flush(self) -> np.ndarray:
        """The held-back tail, when ``final()`` has nothing left to vocode."""
        out, self.tail = self.tail, np.zeros(0, dtype=np.float32)
        return out

    def _ready(self) -> int:
        return len(self.tokens) - LOOKAHEAD_TOKENS

    def _alone(self, work: VocoderWork) -> np.ndarray:
        [(audio, source)] = vocode_batch(self.model, [work], self.steps)
        return self.complete(audio, source)

    def _work(self, end: int, final: bool) -> VocoderWork:
        """The call that vocodes up to token ``end``: left context, every token known so far."""
        sched = self.schedule
        start = max(0, self.emitted - sched.left_context_tokens)
        available = len(self.tokens)
        tokens = torch.tensor(self.tokens[start:available]).unsqueeze(0)  # host: no device wait
        noise = self.noise.for_span(self.prompt.feat.shape[1], start * MELS_PER_TOKEN,
                                    available * MELS_PER_TOKEN)
        self._pending = (start, end, final)
        return VocoderWork(tokens, self.prompt, noise, seed=self.seed * 1000003 + self.chunks,
                           cache_source=self._cached_source(start))

    def _cached_source(self, start: int) -> Optional[torch.Tensor]:
        """The previous call's sine source over samples this call recomputes, for continuity."""
        if self._source is None:
            return None
        begin = start * SAMPLES_PER_TOKEN - self._source_start
        stop = self.emitted * SAMPLES_PER_TOKEN - self._source_start - len(self.tail)
        if begin < 0 or stop <= begin:
            return None
        return self._source[:, :, begin:stop]


class Watermarker:
    """Upstream's Perth implicit watermark; one mark at a time (its own lock, not the vocoder's).

    Perth runs on the model's device. Upstream keeps it on the CPU, where it
    costs ~10 ms per second of audio (2-core EPYC, 8 s: 77 ms, mostly its
    spectrogram arithmetic): one at a time, that caps a GPU worker near 100x
    real time whatever the GPU does."""

    def __init__(self, enabled: bool, device="cpu"):
        self.enabled = enabled
        self._perth = None
        self._lock = threading.Lock()
        if enabled:
            import perth

            # Perth announces itself on stdout; the worker keeps stdout for results.
            with contextlib.redirect_stdout(sys.stderr):
                self._perth = perth.PerthImplicitWatermarker(device=str(device))

    def apply(self, audio: np.ndarray, sample_rate: int) -> np.ndarray:
        if not self.enabled or audio.size == 0:
            return audio
        # Perth leaks memory when called outside inference mode.
        with self._lock, torch.inference_mode():
            marked = self._perth.apply_watermark(audio, sample_rate=sample_rate)
        return np.asarray(marked, dtype=np.float32)

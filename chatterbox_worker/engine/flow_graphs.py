"""The flow decoder's whole solve replayed from CUDA graphs, one per (rows, frames, steps) bucket.

On a GPU a vocoder call is bound by kernel launches, not arithmetic: on the
H100 a call took 0.5-0.7 s of host time against ~0.1 s of device time, and
concurrent jobs' calls queued behind it. At the released size a streamed
chunk's call is 21,964 torch operations, of which the flow solve (10 steps,
each an estimator pass over guided and unguided rows) is 20,226, the encoder
686 and HiFT 1,052 (counted on a CPU with a dispatch mode). A CUDA graph
launches all of the solve's kernels at once.

A graph reads and writes fixed buffers of fixed shapes, so a call is padded
to its bucket: rows to a power of two, frames up to a multiple of
``FRAME_BUCKET``. Padding changes nothing a caller reads: every layer of the
estimator is per row; its convolutions look back only and its attention is
masked to each row's frames, so frames past a row's end never reach frames
before it, and padded rows (wholly masked) are dropped. Rows agree with the
eager solve up to float rounding (tested on CPU with the same buffers run
eagerly: ``capture=False``).

A bucket is made on its second use (``capture_after``): the first runs the
solve eagerly, unpadded, so one-off shapes (a one-shot take of an unusual
length) never pay a capture, about two eager calls' time. Streams reuse a
few shapes all the time (warm-up captures the first chunk's). Buckets are
kept, the least recently used dropped past ``MAX_GRAPHS`` or past
``MAX_HELD_CELLS`` in all (each holds its inputs: 1.6 KB per cell); all
share one memory pool, which is safe because one solve runs at a time
(``_lock``) and its output is copied out before the next. Calls too big for
a graph (``MAX_CELLS``) run eagerly, as does everything after a capture
fails for another reason than memory (logged once). Captures go through
``graph_capture``: one at a time in the process, beside T3's.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import graph_capture
from .flow import flow_solve, solve, time_span
from .memory import is_out_of_memory

log = logging.getLogger(__name__)

FRAME_BUCKET = 64  # mel frames (32 speech tokens, 1.28 s of audio)
MAX_CELLS = 65536  # rows x frames of the largest bucket captured (the batcher's 32768 frames,
# rounded up to buckets); bigger calls are few and long enough to run eagerly
MAX_GRAPHS = 64
MAX_HELD_CELLS = 8 * MAX_CELLS  # the buckets' inputs: at most ~840 MB
_USES_REMEMBERED = 4096  # shapes whose first use is remembered (for ``capture_after``)


def bucket_of(rows: int, frames: int) -> Optional[Tuple[int, int]]:
    """(rows, frames) of the graph a call of this size runs in; None for one too big."""
    rows_bucket = 1
    while rows_bucket < rows:
        rows_bucket *= 2
    frames_bucket = -(-frames // FRAME_BUCKET) * FRAME_BUCKET
    if rows_bucket * frames_bucket > MAX_CELLS:
        return None
    return rows_bucket, frames_bucket


@dataclass
class _Bucket:
    """One bucket's fixed inputs and output; its graph on CUDA."""

    x: torch.Tensor  # (R, 80, F) noise
    mu: torch.Tensor  # (R, 80, F) encoder output
    mask: torch.Tensor  # (R, 1, F)
    spks: torch.Tensor  # (R, 80)
    cond: torch.Tensor  # (R, 80, F) prompt mels
    t_span: torch.Tensor  # (steps + 1,)
    output: Optional[torch.Tensor] = None
    graph: Optional["torch.cuda.CUDAGraph"] = None

    def load(self, x, mu, mask, spks, cond) -> None:
        """Copy a call into the buffers; the rest is zero (a previous call's frames or rows
        must not linger: a NaN there would not stay masked out)."""
        for buffer, value in ((self.x, x), (self.mu, mu), (self.mask, mask), (self.cond, cond)):
            buffer.zero_()
            buffer[:value.shape[0], :, :value.shape[2]].copy_(value)
        self.spks.zero_()
        self.spks[:spks.shape[0]].copy_(spks)


class FlowGraphs:
    """``flow.solve`` of one model's vocoder, through bucketed CUDA graphs (module docstring).

    ``capture=False`` runs the same padded buckets eagerly: the CPU tests'
    way to check the padding, and nothing else's.
    """

    def __init__(self, cfm, *, meanflow: bool, capture: bool = True, max_graphs: int = MAX_GRAPHS,
                 capture_after: int = 1):
        self.cfm = cfm
        self.meanflow = meanflow
        self.capture = capture
        self.max_graphs = max_graphs
        self.capture_after = capture_after  # eager uses of a bucket before it is made
        self.enabled = True
        self._buckets: "OrderedDict[tuple, _Bucket]" = OrderedDict()
        self._uses: "OrderedDict[tuple, int]" = OrderedDict()  # eager uses of buckets not held
        self._pool = None
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured so far (evicted ones included)
        self.replays = 0  # solves run from a bucket
        self.eager = 0  # solves run eagerly (first uses, too big, or graphs disabled)

    @property
    def graphs(self) -> int:
        """Buckets held now."""
        return len(self._buckets)

    def solve(self, x, mu, mask, spks, cond, *, steps: int) -> torch.Tensor:
        """``flow.solve`` of a call (x, mu, cond: (B, 80, T); mask (B, 1, T); spks (B, 80))."""
        rows, frames = x.shape[0], x.shape[2]
        size = bucket_of(rows, frames)
        with self._lock:
            if size is None or not self.enabled:
                return self._eager(x, mu, mask, spks, cond, steps)
            key = (*size, steps, x.dtype, mu.dtype, spks.dtype)
            bucket = self._buckets.get(key)
            if bucket is None:
                uses = self._uses.pop(key, 0)
                if uses < self.capture_after:  # not (yet) a shape worth a graph
                    self._uses[key] = uses + 1
                    while len(self._uses) > _USES_REMEMBERED:
                        self._uses.popitem(last=False)
                    return self._eager(x, mu, mask, spks, cond, steps)
                bucket = self._new_bucket(size, steps, x, mu, spks)
            else:
                self._buckets.move_to_end(key)
            bucket.load(x, mu, mask, spks, cond)
            if bucket.output is None:
                try:
                    self._prepare(bucket)
                except Exception as exc:  # a torch or driver that cannot capture this solve
                    if is_out_of_memory(exc):
                        raise  # not the graph's fault: the batcher reruns a batch's calls alone
                    log.exception("CUDA graph capture of the vocoder's flow solve failed; "
                                  "vocoding without CUDA graphs from now on")
                    self.enabled = False
                    self._buckets.clear()
                    self._pool = None
                    return self._eager(x, mu, mask, spks, cond, steps)
                self._hold(key, bucket)
            if bucket.graph is not None:
                bucket.graph.replay()
            else:
                bucket.output = self._run(bucket)
            self.replays += 1
            # Copied out before the lock goes: the next solve may overwrite the output.
            return bucket.output[:rows, :, :frames].clone()

    def _hold(self, key: tuple, bucket: _Bucket) -> None:
        self._buckets[key] = bucket
        while len(self._buckets) > 1 and (
                len(self._buckets) > self.max_graphs
                or sum(b.x.shape[0] * b.x.shape[2] for b in self._buckets.values()) > MAX_HELD_CELLS):
            self._buckets.popitem(last=False)

    def _eager(self, x, mu, mask, spks, cond, steps: int) -> torch.Tensor:
        self.eager += 1
        return flow_solve(self.cfm, x, mu, mask, spks, cond, steps=steps, meanflow=self.meanflow)

    def _new_bucket(self, size, steps: int, x, mu, spks) -> _Bucket:
        rows, frames = size
        device = x.device
        return _Bucket(x=torch.zeros(rows, 80, frames, dtype=x.dtype, device=device),
                       mu=torch.zeros(rows, 80, frames, dtype=mu.dtype, device=device),
                       mask=torch.zeros(rows, 1, frames, dtype=mu.dtype, device=device),
                       spks=torch.zeros(rows, spks.shape[1], dtype=spks.dtype, device=device),
                       cond=torch.zeros(rows, 80, frames, dtype=mu.dtype, device=device),
                       t_span=time_span(steps, meanflow=self.meanflow, device=device, dtype=mu.dtype))

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        return solve(self.cfm, bucket.x, bucket.t_span, bucket.mu, bucket.mask, bucket.spks,
                     bucket.cond, meanflow=self.meanflow)

    def _prepare(self, bucket: _Bucket) -> None:
        """Capture the bucket's graph (CUDA); without ``capture``, nothing to prepare."""
        if not self.capture:
            return
        if self._pool is None or not self._buckets:
            # A pool none of whose graphs is left (a first capture that ran out of memory)
            # cannot be captured into again: torch asserts its use count. A new one.
            self._pool = torch.cuda.graph_pool_handle()
        bucket.graph, bucket.output = graph_capture.capture(lambda: self._run(bucket), self._pool)
        self.captures += 1
        log.info("captured the vocoder's flow solve for %d row(s), %d frames, %d steps",
                 bucket.x.shape[0], bucket.x.shape[2], bucket.t_span.shape[0] - 1)

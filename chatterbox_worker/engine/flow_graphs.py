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

Buckets are captured the first time they are needed (one eager warm-up run,
then the capture) and kept, the least recently used dropped past
``MAX_GRAPHS``; all share one memory pool, which is safe because one solve
runs at a time (``_lock``) and its output is copied out before the next.
Calls too big for a graph (``MAX_CELLS``) run eagerly, as does everything if
a capture fails (logged once).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .flow import solve, time_span
from .memory import is_out_of_memory

log = logging.getLogger(__name__)

FRAME_BUCKET = 64  # mel frames (32 speech tokens, 1.28 s of audio)
MAX_CELLS = 65536  # rows x frames of the largest bucket captured (the batcher's 32768 frames,
# rounded up to buckets); bigger calls are few and long enough to run eagerly
MAX_GRAPHS = 64


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

    def __init__(self, cfm, *, meanflow: bool, capture: bool = True, max_graphs: int = MAX_GRAPHS):
        self.cfm = cfm
        self.meanflow = meanflow
        self.capture = capture
        self.max_graphs = max_graphs
        self.enabled = True
        self._buckets: "OrderedDict[tuple, _Bucket]" = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self.captures = 0  # graphs captured so far (evicted ones included)
        self.replays = 0  # solves run from a bucket
        self.eager = 0  # solves run eagerly (too big, or graphs disabled)

    @property
    def graphs(self) -> int:
        """Buckets held now."""
        return len(self._buckets)

    def solve(self, x, mu, mask, spks, cond, *, steps: int) -> torch.Tensor:
        """``flow.solve`` of a call (x, mu, cond: (B, 80, T); mask (B, 1, T); spks (B, 80))."""
        rows, frames = x.shape[0], x.shape[2]
        size = bucket_of(rows, frames)
        if size is None or not self.enabled:
            return self._eager(x, mu, mask, spks, cond, steps)
        key = (*size, steps, x.dtype, mu.dtype)
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._new_bucket(size, steps, x, mu)
            else:
                self._buckets.move_to_end(key)
            bucket.load(x, mu, mask, spks, cond)
            if bucket.output is None or (self.capture and bucket.graph is None):
                try:
                    self._prepare(bucket)
                except Exception as exc:  # a torch or driver that cannot capture this solve
                    if is_out_of_memory(exc):
                        raise  # not the graph's fault: the batcher reruns a batch's calls alone
                    log.exception("CUDA graph capture of the vocoder's flow solve failed; "
                                  "vocoding without CUDA graphs from now on")
                    self.enabled = False
                    self._buckets.clear()
                    return self._eager(x, mu, mask, spks, cond, steps)
                self._buckets[key] = bucket
                while len(self._buckets) > self.max_graphs:
                    self._buckets.popitem(last=False)
            if bucket.graph is not None:
                bucket.graph.replay()
            else:
                bucket.output = self._run(bucket)
            self.replays += 1
            # Copied out before the lock goes: the next solve may overwrite the output.
            return bucket.output[:rows, :, :frames].clone()

    def _eager(self, x, mu, mask, spks, cond, steps: int) -> torch.Tensor:
        self.eager += 1
        t_span = time_span(steps, meanflow=self.meanflow, device=x.device, dtype=mu.dtype)
        return solve(self.cfm, x, t_span, mu, mask, spks, cond, meanflow=self.meanflow)

    def _new_bucket(self, size, steps: int, x, mu) -> _Bucket:
        rows, frames = size
        zeros = dict(device=x.device)
        return _Bucket(x=torch.zeros(rows, 80, frames, dtype=x.dtype, **zeros),
                       mu=torch.zeros(rows, 80, frames, dtype=mu.dtype, **zeros),
                       mask=torch.zeros(rows, 1, frames, dtype=mu.dtype, **zeros),
                       spks=torch.zeros(rows, 80, dtype=mu.dtype, **zeros),
                       cond=torch.zeros(rows, 80, frames, dtype=mu.dtype, **zeros),
                       t_span=time_span(steps, meanflow=self.meanflow, device=x.device, dtype=mu.dtype))

    def _run(self, bucket: _Bucket) -> torch.Tensor:
        return solve(self.cfm, bucket.x, bucket.t_span, bucket.mu, bucket.mask, bucket.spks,
                     bucket.cond, meanflow=self.meanflow)

    def _prepare(self, bucket: _Bucket) -> None:
        """Capture the bucket's graph (CUDA); without ``capture``, nothing to prepare."""
        if not self.capture:
            return
        # A warm-up run on a side stream first, as capture requires (lazy
        # initialisation, cuBLAS workspaces). Captured "thread_local": the
        # decode thread keeps reading sampled tokens from the device meanwhile,
        # which a "global" capture would refuse.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._run(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            bucket.output = self._run(bucket)
        bucket.graph = graph
        self.captures += 1
        log.info("captured the vocoder's flow solve for %d row(s), %d frames, %d steps",
                 bucket.x.shape[0], bucket.x.shape[2], bucket.t_span.shape[0] - 1)

"""Several streams' vocoder calls run as one batch when their shapes match.

Each streamed chunk costs one S3Gen call (flow, then HiFT), and S3Gen runs
one call at a time (``Engine``'s vocoder lock). On a GPU a call is bound by
kernel launches, not by arithmetic: one call for eight streams costs about
what one stream's call costs. Streams that started together decode in
lockstep (the scheduler advances every request one token per step), so their
chunks come due together with equal token counts and equal prompt lengths:
exactly the calls that batch without padding.

How: a stream whose chunk is due leaves a ticket, then waits for the vocoder
lock. Streams decode in lockstep but their threads read their tokens one after
another, so the first to find its chunk due would find the lock free and run
alone, the others a moment later. To prevent that, the call that gets the lock
first waits (at most ``GATHER_S``) while another stream the batcher follows
has read too few of the tokens already decoded for it (or is a step or two
behind) to see that its chunk of the same shape is due (``LiveStream.coming``).
Whoever gets the lock runs its own ticket together with every waiting ticket
of the same shape (most urgent first, at most ``max_batch``) and hands
each its result; a stream whose ticket was done for it leaves the lock's
queue at once (``PriorityLock.hold_unless``). Each row draws HiFT's noise
from its own seed (``hift``), so batching never mixes one stream's random
numbers into another's.

With ``padding`` (``Engine`` sets it on CUDA), calls of other lengths share
a batch too, padded to the longest (``flow_mels_batch``): one-shot takes,
which end at their own lengths, and streams out of step. The padding a row
may cost is bounded (``PAD_RATIO``), and so are the frames of one call
(``MAX_FRAMES``): out of memory in a batch of several runs each of its calls
alone instead.

Rows of a batch equal their calls alone up to float rounding, not bit for
bit; ``Engine`` turns batching on only where the decoder already gives up
bit-exactness for speed (the fast path), or when the operator asks.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
from typing import Callable, Iterator, List, Optional, Set, Tuple

import torch

from .memory import is_out_of_memory, release_cached_memory
from .priority_lock import PriorityLock
from .vocoder import VocoderWork

log = logging.getLogger(__name__)

Result = Tuple[torch.Tensor, torch.Tensor]  # (audio (N,), HiFT source (1, 1, S))

# The longest a due call waits for other streams about to ask for a call of its
# shape: a GPU vocoder call takes ~0.5 s, so a few ms that bring more rows into
# it pay; a stream with no such company never waits.
GATHER_S = 0.02
# How many decode steps behind a stream may be and still count as about to ask:
# jobs that arrive a few milliseconds apart join the decoder a step or two apart.
GATHER_STEPS = 3
# Padded batches: the longest row at most this many times the shortest, and at
# most this many frames (rows x longest row) in one call.
PAD_RATIO = 1.5
MAX_FRAMES = 32768


class LiveStream:
    """A streamed piece the batcher looks ahead at: its vocoder and its token feed."""

    def __init__(self, vocoder, tokens):
        self.vocoder = vocoder  # StreamingVocoder
        self.tokens = tokens  # TokenStream: ``unread()`` tokens decoded, not yet read
        self.asking = False  # a call posted, not yet answered (under the batcher's guard)
        self.away = False  # handed a chunk to its consumer, not yet back for more

    @contextlib.contextmanager
    def handing_over(self) -> Iterator[None]:
        """Around a ``yield`` of audio: a consumer may take its time, and tokens pile up
        meanwhile, so the stream is not counted as about to ask while away."""
        self.away = True
        try:
            yield
        finally:
            self.away = False

    def coming(self) -> Optional[tuple]:
        """The shape of the call this stream will ask for once it reads the tokens already
        decoded for it and ``GATHER_STEPS`` more; None if they complete no chunk. Read from
        another thread: a guess, which at worst costs one missed batch or one ``GATHER_S``
        wait."""
        if self.asking or self.away:
            return None
        return self.vocoder.next_call_shape(self.tokens.unread() + GATHER_STEPS)


class _Ticket:
    __slots__ = ("work", "urgency", "order", "result", "error", "done")

    def __init__(self, work: VocoderWork, urgency: int, order: int):
        self.work, self.urgency, self.order = work, urgency, order
        self.result: Optional[Result] = None
        self.error: Optional[BaseException] = None
        self.done = False


class VocoderBatcher:
    """Runs ``VocoderWork`` under ``lock``, batching equal shapes (and, with ``padding``,
    near lengths) when ``max_batch`` > 1."""

    def __init__(self, lock: PriorityLock, run: Callable[[List[VocoderWork]], List[Result]],
                 max_batch: int = 1, padding: bool = False):
        self.lock = lock
        self._run = run
        self.max_batch = max_batch
        self.padding = padding
        # Re-entrant: a stream's generator finalised by the collector while this thread
        # holds the guard leaves ``following`` through the same guard.
        self._guard = threading.Condition(threading.RLock())
        self._waiting: List[_Ticket] = []
        self._live: Set[LiveStream] = set()
        self.gather_s = GATHER_S
        self._order = itertools.count()
        self.batches = 0  # calls made (for tests and metrics)
        self.rows = 0  # works done

    @contextlib.contextmanager
    def following(self, vocoder, tokens) -> Iterator[LiveStream]:
        """Look ahead at a streamed piece while it runs (pass what this yields to ``run``)."""
        live = LiveStream(vocoder, tokens)
        with self._guard:
            self._live.add(live)
        try:
            yield live
        finally:
            with self._guard:
                self._live.discard(live)
                self._guard.notify_all()

    def run(self, work: VocoderWork, urgency: int, live: Optional[LiveStream] = None) -> Result:
        """``work``'s result (audio, HiFT source), computed alone or in a batch with
        other waiting streams' calls; ``live``: the stream asking, if ``following`` it."""
        ticket = _Ticket(work, urgency, next(self._order))
        try:
            with self._guard:
                self._waiting.append(ticket)
                if live is not None:
                    live.asking = True
                self._guard.notify_all()
            with self.lock.hold_unless(urgency, lambda: ticket.done) as acquired:
                if acquired and not ticket.done:
                    self._run_group(ticket)
        finally:
            with self._guard:  # interrupted before anyone took it: withdraw
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                if live is not None:
                    live.asking = False
        if ticket.error is not None:  # (the leader's own error propagated from _run_group)
            raise _own_copy(ticket.error) from ticket.error
        if not ticket.done:
            raise RuntimeError("vocoder batch ended without this call's result")
        return ticket.result

    def _gather(self, ticket: _Ticket) -> None:
        """Wait (guard and vocoder lock held) while a followed stream is about to ask for a
        call that may join ``ticket``'s (``_joins``) and the batch has room for it.

        The leader waits holding the lock, so its turn (a first chunk's urgency) is
        not lost to a call that arrives meanwhile; the streams it waits for need
        no lock to reach their next call (the watermark has its own)."""
        if self.max_batch < 2:
            return
        shape, deadline = ticket.work.shape, time.monotonic() + self.gather_s
        while not ticket.done:
            asked = sum(1 for t in self._waiting if self._joins(shape, t.work.shape))
            coming = (s.coming() for s in self._live)
            if asked >= self.max_batch or not any(c is not None and self._joins(shape, c)
                                                  for c in coming):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._guard.wait(remaining)

    def _joins(self, shape: tuple, other: tuple) -> bool:
        """Whether a call of ``other`` shape may share a batch with one of ``shape``."""
        if other == shape:
            return True
        longest, shortest = max(shape[2], other[2]), min(shape[2], other[2])
        return self.padding and longest <= PAD_RATIO * shortest and 2 * longest <= MAX_FRAMES

    def _group(self, leader: _Ticket) -> List[_Ticket]:
        """The leader and the waiting calls that join it: equal shapes first, then (with
        ``padding``) others within the padding bounds, most urgent and oldest first."""
        def frames(ticket):
            return ticket.work.shape[2]

        others = sorted((t for t in self._waiting if t is not leader),
                        key=lambda t: (t.work.shape != leader.work.shape, t.urgency, t.order))
        group = [leader]
        for ticket in others:
            if len(group) >= self.max_batch:
                break
            if ticket.work.shape != leader.work.shape:
                if not self.padding:
                    break  # sorted: no equal shapes left
                longest = max(frames(ticket), *map(frames, group))
                shortest = min(frames(ticket), *map(frames, group))
                if longest > PAD_RATIO * shortest or longest * (len(group) + 1) > MAX_FRAMES:
                    continue
            group.append(ticket)
        return group

    def _run_group(self, leader: _Ticket) -> None:
        with self._guard:
            self._gather(leader)
            group = self._group(leader)
            for ticket in group:
                self._waiting.remove(ticket)
        try:
            results = self._run_or_split([t.work for t in group])
            for ticket, result in zip(group, results, strict=True):
                if isinstance(result, BaseException):
                    ticket.error = result
                else:
                    ticket.result = result
        except BaseException as exc:  # every stream of the batch learns why
            for ticket in group:
                if ticket.result is None and ticket.error is None:
                    ticket.error = exc
            raise
        finally:
            for ticket in group:
                ticket.done = True

    def _run_or_split(self, works: List[VocoderWork]) -> list:
        """Results of ``works`` in one call; out of memory with several, each alone
        (a call that fails alone gets its own error, the others their results)."""
        device = works[0].prompt.tokens.device
        try:
            return self._counted(works)
        except Exception as exc:
            if len(works) == 1 or not is_out_of_memory(exc):
                raise
            log.warning("out of memory vocoding %d calls together: running each alone", len(works))
        # Released here, after the except: its traceback held the batch's activations.
        release_cached_memory(device)
        results: list = []
        for work in works:
            try:
                results.extend(self._counted([work]))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # Without its traceback, the error keeps none of the failed call's tensors.
                results.append(exc.with_traceback(None))
            if isinstance(results[-1], BaseException):
                release_cached_memory(device)
        return results

    def _counted(self, works: List[VocoderWork]) -> list:
        try:
            return self._run(works)
        finally:
            self.batches += 1
            self.rows += len(works)


def _own_copy(error: BaseException) -> BaseException:
    """The batch's error for one more of its streams: of the same type (callers map errors
    by type), but a new object, so that threads raising it do not rewrite one shared
    traceback; the original is its cause."""
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # a type that cannot be copied from its args
        return RuntimeError(f"the vocoder call this job shared failed: {error}")


__all__ = ["GATHER_S", "LiveStream", "VocoderBatcher"]

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
alone, the others a moment later. To prevent that, a ticket first waits (at
most ``GATHER_S``, without the lock) while another stream the batcher follows
has read too few of the tokens already decoded for it (or is a step or two
behind) to see that its chunk of the same shape is due (``LiveStream.coming``). Whoever gets the lock runs its own ticket together with every waiting
ticket of the same shape (most urgent first, at most ``max_batch``) and hands
each its result; a stream whose ticket was done for it leaves the lock's
queue at once (``PriorityLock.hold_unless``). Each row draws HiFT's noise
from its own seed (``hift``), so batching never mixes one stream's random
numbers into another's.

Rows of a batch equal their calls alone up to float rounding, not bit for
bit; ``Engine`` turns batching on only where the decoder already gives up
bit-exactness for speed (the fast path), or when the operator asks.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from typing import Callable, Iterator, List, Optional, Set, Tuple

import torch

from .priority_lock import PriorityLock
from .vocoder import VocoderWork

Result = Tuple[torch.Tensor, torch.Tensor]  # (audio (N,), HiFT source (1, 1, S))

# The longest a due call waits for other streams about to ask for a call of its
# shape: a GPU vocoder call takes ~0.5 s, so a few ms that bring more rows into
# it pay; a stream with no such company never waits.
GATHER_S = 0.02
# How many decode steps behind a stream may be and still count as about to ask:
# jobs that arrive a few milliseconds apart join the decoder a step or two apart.
GATHER_STEPS = 3


class LiveStream:
    """A streamed piece the batcher looks ahead at: its vocoder and its token feed."""

    def __init__(self, vocoder, tokens):
        self.vocoder = vocoder  # StreamingVocoder
        self.tokens = tokens  # TokenStream: ``unread()`` tokens decoded, not yet read
        self.asking = False  # a call posted, not yet answered (under the batcher's guard)

    def coming(self) -> Optional[tuple]:
        """The shape of the call this stream will ask for once it reads the tokens already
        decoded for it and ``GATHER_STEPS`` more; None if they complete no chunk. Read from another thread: a guess,
        which at worst costs one missed batch or one ``GATHER_S`` wait."""
        if self.asking:
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
    """Runs ``VocoderWork`` under ``lock``, batching equal shapes when ``max_batch`` > 1."""

    def __init__(self, lock: PriorityLock, run: Callable[[List[VocoderWork]], List[Result]],
                 max_batch: int = 1):
        self.lock = lock
        self._run = run
        self.max_batch = max_batch
        self._guard = threading.Condition(threading.Lock())
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
        with self._guard:
            self._waiting.append(ticket)
            if live is not None:
                live.asking = True
            self._guard.notify_all()
            self._gather(ticket)
        try:
            with self.lock.hold_unless(urgency, lambda: ticket.done) as acquired:
                if acquired and not ticket.done:
                    self._run_group(ticket)
        finally:
            with self._guard:  # interrupted before anyone took it: withdraw
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                if live is not None:
                    live.asking = False
        if ticket.error is not None:
            raise ticket.error
        if not ticket.done:
            raise RuntimeError("vocoder batch ended without this call's result")
        return ticket.result

    def _gather(self, ticket: _Ticket) -> None:
        """Wait (guard held, lock not) while a followed stream is about to ask for a call of
        ``ticket``'s shape and the batch has room for it."""
        if self.max_batch < 2:
            return
        shape, deadline = ticket.work.shape, time.monotonic() + self.gather_s
        while not ticket.done:
            asked = sum(1 for t in self._waiting if t.work.shape == shape)
            if asked >= self.max_batch or not any(s.coming() == shape for s in self._live):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._guard.wait(remaining)

    def _run_group(self, leader: _Ticket) -> None:
        with self._guard:
            same = sorted((t for t in self._waiting
                           if t is not leader and t.work.shape == leader.work.shape),
                          key=lambda t: (t.urgency, t.order))
            group = [leader] + same[:max(0, self.max_batch - 1)]
            for ticket in group:
                self._waiting.remove(ticket)
        try:
            results = self._run([t.work for t in group])
        except BaseException as exc:  # every stream of the batch learns why
            for ticket in group:
                ticket.error, ticket.done = exc, True
            raise
        finally:
            self.batches += 1
            self.rows += len(group)
        for ticket, result in zip(group, results):
            ticket.result, ticket.done = result, True


__all__ = ["GATHER_S", "LiveStream", "VocoderBatcher"]

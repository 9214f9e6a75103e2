"""Several streams' vocoder calls run as one batch when their shapes match.

Each streamed chunk costs one S3Gen call (flow, then HiFT), and S3Gen runs
one call at a time (``Engine``'s vocoder lock). On a GPU a call is bound by
kernel launches, not by arithmetic: one call for eight streams costs about
what one stream's call costs. Streams that started together decode in
lockstep (the scheduler advances every request one token per step), so their
chunks come due together with equal token counts and equal prompt lengths:
exactly the calls that batch without padding.

How: a stream whose chunk is due leaves a ticket, then waits for the vocoder
lock. Whoever gets the lock runs its own ticket together with every waiting
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

import itertools
import threading
from typing import Callable, List, Optional, Tuple

import torch

from .priority_lock import PriorityLock
from .vocoder import VocoderWork

Result = Tuple[torch.Tensor, torch.Tensor]  # (audio (N,), HiFT source (1, 1, S))


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
        self._guard = threading.Lock()
        self._waiting: List[_Ticket] = []
        self._order = itertools.count()
        self.batches = 0  # calls made (for tests and metrics)
        self.rows = 0  # works done

    def run(self, work: VocoderWork, urgency: int) -> Result:
        """``work``'s result (audio, HiFT source), computed alone or in a batch with
        other waiting streams' calls."""
        ticket = _Ticket(work, urgency, next(self._order))
        with self._guard:
            self._waiting.append(ticket)
        try:
            with self.lock.hold_unless(urgency, lambda: ticket.done) as acquired:
                if acquired and not ticket.done:
                    self._run_group(ticket)
        finally:
            with self._guard:  # interrupted before anyone took it: withdraw
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
        if ticket.error is not None:
            raise ticket.error
        if not ticket.done:
            raise RuntimeError("vocoder batch ended without this call's result")
        return ticket.result

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


__all__ = ["VocoderBatcher"]

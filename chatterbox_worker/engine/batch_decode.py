"""Continuous batching for T3: many requests share each decode step.

A ``BatchDecoder`` owns T3's decode steps for every running request. A
request joins between steps (its prompt is prefilled alone, exactly as the
single-request loop does), then takes part in one shared forward per step
until it stops, runs out of budget or is removed (cancelled). Each request
keeps its own sampling parameters and ``torch.Generator``, and its tokens are
bit-for-bit those of ``decode.decode_speech_tokens`` run alone, whatever ran
beside it. How that is kept, and what it costs:

- No padding. Each request keeps its own KV cache; in a step every request
  brings exactly one new position per row, so the rows stack without gaps.
  Only attention differs in length between requests, and it runs per request
  on that request's own cache, with the shapes of the single-request loop.
  Positions advance per request: the rotary position is the request's own
  cache length, the learned speech position its own step count.
- Per-request matrix products. CPU BLAS (MKL here) picks its kernel by the
  number of rows: one row (gemv), two or three, and four or more each sum in
  another order, so a row's result changes in the last bits with the rows
  beside it. So each projection runs as one batched product (``bmm``) of
  per-request blocks of 1 or 2 rows, which reproduces the single-request
  kernels bit for bit (weights are still read once per step). Where
  exactness is not promised (bf16, int8, CUDA) the engine uses
  ``fast_decode.FastDecoder`` instead.
- Sampling runs per request with the single-request code (``RowSampler``):
  same guidance mix, same logits processors in the same order, one
  ``torch.multinomial`` draw from the request's own generator.

Checked bit for bit (every logits tensor, not only the tokens) in float32 on
CPU with one thread, on the tiny test checkpoint and on T3 at the released
widths (2 layers). Not yet checked: CUDA, where cuBLAS also picks kernels by
shape and batch count, and several CPU threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional

import torch
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from .decode import RowSampler, SamplingParams, prefill_inputs, speech_embedding


@dataclass(eq=False)  # compared by identity: a request is a key of the decoder's state
class DecodeRequest:
    """What one job asks of T3: its text, voice, sampling and budget."""

    t3_cond: object  # upstream T3Cond, fresh for this request (``VoiceConditionals.for_request``)
    text_tokens: torch.Tensor  # (1, L), from ``decode.text_tokens_for``
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator
    label: str = ""  # who asked ("job=..." or "request=..."), for the worker's log lines

    @property
    def who(self) -> str:
        """The request as log lines name it."""
        return self.label or "a request"


FAILED = object()  # ``RequestBook._pick``: the request's sampling failed and it has left


class StepEvent(NamedTuple):
    """What one step did for one request."""

    request: DecodeRequest
    token: Optional[int]  # the speech token made; None when the request stopped without one
    done: bool  # the request has left the decoder (stop token, budget or error)
    error: Optional[BaseException] = None  # why the request was dropped, when it failed alone


class _Sequence:
    """A running request: its KV cache, sampler and where it stands."""

    def __init__(self, request: DecodeRequest, start_token: int, device):
        self.request = request
        self.sampler = RowSampler(request.params, request.generator, start_token, device)
        self.rows = self.sampler.rows
        self.cache: Optional[DynamicCache] = None  # made by the prefill
        self.steps = 0  # tokens sampled so far (the learned speech position of the next is steps + 1)
        self.pending: Optional[torch.Tensor] = None  # (rows, 1, dim) input of the next forward
        self.logits: Optional[torch.Tensor] = None  # (rows, vocab) to sample from


class RequestBook:
    """The requests a batch decoder holds: joining (prefilled at the next step) and running.

    Shared by the Llama (``BatchDecoder``) and GPT-2 (``turbo_batch``)
    decoders, which differ only in their steps; ``sequence`` makes a
    decoder's own per-request state."""

    sequence: type

    def __init__(self, t3):
        self.t3 = t3
        self._joining: list = []
        self._running: list = []
        self._by_request: Dict[DecodeRequest, object] = {}
        self._failed: List[StepEvent] = []  # requests that failed alone in this step

    def __len__(self) -> int:
        return len(self._by_request)

    def __contains__(self, request: DecodeRequest) -> bool:
        return request in self._by_request

    def add(self, request: DecodeRequest) -> None:
        """Queue ``request``; it is prefilled and joins the shared step at the next ``step``."""
        if request in self._by_request:
            raise ValueError("request already added")
        seq = self.sequence(request, self.t3.hp.start_speech_token, request.text_tokens.device)
        self._by_request[request] = seq
        self._joining.append(seq)

    def _advance(self) -> None:
        """The forward half of a step: who joined is prefilled (each alone, as the
        single-request loop does), then one forward runs every pending token."""
        self._failed = []  # a step that raised took its requests with it: start afresh
        for seq in list(self._joining):
            try:
                self._prefill(seq)
            except Exception as exc:  # this request's own prompt: it fails alone
                self._fail(seq, exc)
        self._running.extend(self._joining)
        self._joining = []
        waiting = [seq for seq in self._running if seq.pending is not None]
        if waiting:
            self._forward(waiting)

    def _fail(self, seq, exc: BaseException) -> None:
        """``seq``'s request leaves the decoder with ``exc``; the others go on."""
        self._failed.append(StepEvent(seq.request, None, True, exc))
        self.remove(seq.request)

    def _pick(self, seq):
        """The request's next token from its logits, or ``FAILED`` when its sampling raised.

        Rows are sampled one by one, so a row that cannot be (logits gone
        non-finite: ``torch.multinomial`` refuses them) fails its own request
        rather than the step of every request beside it."""
        try:
            return seq.sampler.pick(seq.logits)
        except RuntimeError as exc:
            self._fail(seq, exc)
            return FAILED

    def _failures(self) -> List[StepEvent]:
        failed, self._failed = self._failed, []
        return failed

    def remove(self, request: DecodeRequest) -> bool:
        """Drop ``request`` now (cancellation) and free its KV cache; False if it was not running."""
        seq = self._by_request.pop(request, None)
        if seq is None:
            return False
        for queue in (self._joining, self._running):
            if seq in queue:
                queue.remove(seq)
        seq.cache = seq.pending = seq.logits = None
        return True


class BatchDecoder(RequestBook):
    """T3 decode steps shared by every running request (continuous batching).

    Not thread-safe: one scheduler thread calls ``add``, ``remove`` and
    ``step``. Requests added before a ``step`` join in that step.
    """

    sequence = _Sequence

    def __init__(self, t3):
        if getattr(t3, "is_gpt", False):
            raise ValueError("BatchDecoder supports T3's Llama backbone only")
        super().__init__(t3)

    @torch.inference_mode()
    def step(self) -> List[StepEvent]:
        """One token for every running request; finished requests leave the decoder.

        Joining requests are prefilled first (each alone); then one forward
        runs the new token of every other request; then each request samples.
        """
        self._advance()

        events = []
        stop = self.t3.hp.stop_speech_token
        for seq in list(self._running):
            request = seq.request
            if seq.steps >= request.max_new_tokens:  # a budget of 0: nothing to make
                events.append(StepEvent(request, None, True))
                self.remove(request)
                continue
            next_token = self._pick(seq)
            if next_token is FAILED:
                continue
            seq.logits = None
            token = int(next_token)
            if token == stop:
                events.append(StepEvent(request, None, True))
                self.remove(request)
                continue
            seq.sampler.accept(next_token)
            seq.steps += 1
            if seq.steps >= request.max_new_tokens:
                # The single-request loop makes no forward after its last token.
                events.append(StepEvent(request, token, True))
                self.remove(request)
                continue
            embed = speech_embedding(self.t3, next_token, seq.steps - 1)
            seq.pending = embed.expand(seq.rows, -1, -1)
            events.append(StepEvent(request, token, False))
        return self._failures() + events

    def _prefill(self, seq: _Sequence) -> None:
        """The request's prompt through T3 alone, exactly as ``decode_speech_tokens`` does it."""
        t3, request = self.t3, seq.request
        if request.max_new_tokens <= 0:
            return  # nothing will be sampled: the single-request loop's forward is not needed
        inputs = prefill_inputs(t3, request.t3_cond, request.text_tokens, request.params)
        seq.cache = DynamicCache()
        out = t3.tfmr(inputs_embeds=inputs, past_key_values=seq.cache, use_cache=True)
        seq.logits = t3.speech_head(out.last_hidden_state[:, -1, :])

    def _forward(self, seqs: List[_Sequence]) -> None:
        """One new position for each of ``seqs`` through the backbone; sets their logits.

        HF's ``LlamaModel.forward`` and ``LlamaDecoderLayer.forward`` step by
        step, with the same modules, except that projections go through
        ``_linear`` and attention runs per request on its own cache.
        """
        t3 = self.t3
        tfmr = t3.tfmr
        # Requests with guidance (2 rows) first, then those without (1 row):
        # ``_linear`` multiplies runs of equal-sized blocks in one product.
        seqs = sorted(seqs, key=lambda s: -s.rows)
        bounds, groups, row = [], [], 0
        for seq in seqs:
            bounds.append(slice(row, row + seq.rows))
            if groups and groups[-1][2] == seq.rows:
                groups[-1][1] += 1
            else:
                groups.append([row, 1, seq.rows])
            row += seq.rows

        def linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
            return self._linear(x, module, groups)

        hidden = torch.cat([seq.pending for seq in seqs])  # (rows, 1, dim)
        # Rotary tables per request, as HF computes them for one request: the
        # position is the request's own cache length.
        cos, sin = zip(*(tfmr.rotary_emb(seq.pending[:1], torch.tensor(
            [[seq.cache.get_seq_length()]], device=hidden.device)) for seq in seqs))
        cos = torch.cat([c.expand(seq.rows, -1, -1) for c, seq in zip(cos, seqs)])
        sin = torch.cat([s.expand(seq.rows, -1, -1) for s, seq in zip(sin, seqs)])

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(tfmr.config._attn_implementation,
                                                          eager_attention_forward)
        for layer_idx, layer in enumerate(tfmr.layers[: tfmr.config.num_hidden_layers]):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = linear(x, attn.q_proj).view(shape).transpose(1, 2)
            k = linear(x, attn.k_proj).view(shape).transpose(1, 2)
            v = linear(x, attn.v_proj).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outs = []
            for seq, rows in zip(seqs, bounds):
                keys, values = seq.cache.update(k[rows], v[rows], layer_idx)
                # No mask: one query attends to the whole cache, as in HF's decode steps.
                out, _ = attention(attn, q[rows], keys, values, None, dropout=0.0, scaling=attn.scaling)
                outs.append(out)
            x = torch.cat(outs).reshape(*x.shape[:-1], -1).contiguous()
            hidden = residual + linear(x, attn.o_proj)

            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            x = linear(mlp.act_fn(linear(x, mlp.gate_proj)) * linear(x, mlp.up_proj),
                             mlp.down_proj)
            hidden = residual + x
        hidden = tfmr.norm(hidden)
        logits = linear(hidden[:, -1, :], t3.speech_head)
        for seq, rows in zip(seqs, bounds):
            seq.logits = logits[rows]
            seq.pending = None

    def _linear(self, x: torch.Tensor, linear: torch.nn.Linear, groups) -> torch.Tensor:
        """``linear(x)`` over all rows, each request's block as if alone.

        ``groups`` lists runs of requests with equally many rows as
        ``[first row, requests, rows each]``.
        """
        if linear.bias is not None:
            raise ValueError("projections with a bias are not supported (T3's Llama has none)")
        flat = x.reshape(-1, x.shape[-1])
        weight = linear.weight.t()
        parts = []
        for start, count, rows in groups:
            block = flat[start:start + count * rows].view(count, rows, -1)
            # bmm runs the product of each block with the kernel a (rows, in)
            # input alone gets; the weight is shared, not copied (expand).
            parts.append(torch.bmm(block, weight.expand(count, *weight.shape)).reshape(count * rows, -1))
        return torch.cat(parts).view(*x.shape[:-1], -1)


__all__ = ["BatchDecoder", "DecodeRequest", "StepEvent"]

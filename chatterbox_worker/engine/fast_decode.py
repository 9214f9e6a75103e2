"""The fast T3 decode path: a static KV cache, one padded batch, CUDA graphs on GPU.

``FastDecoder`` has the ``BatchDecoder`` interface (``add``, ``remove``,
``step``) so the scheduler can drive either. Where ``BatchDecoder`` keeps
float32 tokens bit-for-bit those of the single-request loop, this one is
built for throughput, on GPU above all:

- **Static KV cache.** One preallocated tensor per K and V,
  ``(layers, rows, heads, max_len, head_dim)``. A request holds a *slot*
  (two rows: conditioned and unconditioned, as classifier-free guidance
  needs; without guidance the second row repeats the first and is weighted
  0). Running slots are kept packed at the front, so a step runs on the
  first ``bucket`` slots only; a request that leaves has the last slot moved
  into its place.
- **Per-row positions.** Each row writes its new K/V at its own position
  (``index_put``) and attends through a mask to its own length, with
  scaled-dot-product attention over the first ``length bucket`` positions
  (a multiple of ``LENGTH_BUCKET``) rather than the whole cache. The cache
  itself grows by length buckets to what the requests admitted so far may
  need (prompt + token budget), up to ``max_len``.
- **CUDA graphs.** On CUDA the step from input embedding to logits is
  captured once per (slot bucket, length bucket) the first time it is needed
  and replayed after: the per-layer kernel launches that dominate a batch-1
  step cost one launch. Slot buckets are powers of two. CPU runs the same
  step eagerly.
- **Sampling on the device, vectorised over the batch**: guidance mix,
  repetition penalty, temperature, min-p, top-p (upstream's order and
  formulas, per-row parameters), then an exponential race with noise from a
  counter-based hash of (request seed, step, token id). A request's draws
  therefore depend on its own seed and step only, never on which requests
  ran beside it or in which slot; the only host synchronisation per step is
  reading the sampled tokens.

What it does not promise: the same tokens as ``decode_speech_tokens`` for a
seed (the random stream differs from ``torch.multinomial``'s), nor bit-equal
logits alone and batched (the padded products sum in another order). That
is why float32 on CPU keeps ``BatchDecoder``: the parity and determinism
guarantees are stated for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .batch_decode import DecodeRequest, StepEvent
from .decode import SamplingParams, prefill_inputs
from . import graph_capture
from .memory import is_out_of_memory, release_cached_memory

log = logging.getLogger(__name__)

# Positions attended to are rounded up to a multiple of this: few graphs, little waste.
LENGTH_BUCKET = 256
# The longest sequence a slot holds: conditioning (34) + a 300-character piece's
# text tokens + 2 + the largest token budget (1000), rounded up.
DEFAULT_MAX_LEN = 1536

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit constant as torch's signed int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STEP_KEY = _signed(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, width: int) -> torch.Tensor:
    """(n, width) uniforms in (0, 1), a pure function of (seed, step, column).

    SplitMix64's finaliser over a key mixed from the three; int64 products
    wrap, as the hash intends. No generator state: the same request draws
    the same numbers in any batch, in any slot, eagerly or inside a graph.
    """
    column = torch.arange(width, device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * _GOLDEN + steps[:, None] * _STEP_KEY + column[None, :]
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


@dataclass
class _Slot:
    request: DecodeRequest
    joined: int = 0  # order of arrival: out of memory, the newest leaves first
    length: int = 0  # cache positions filled (prompt, then one per step)
    steps: int = 0  # tokens sampled so far


class StaticCacheDecoder:
    """Continuous batching over a static KV cache (see the module docstring): the slots,
    the cache, the step loop and its CUDA graphs, whatever the backbone.

    A backbone's subclass gives ``ROWS_PER_SLOT`` and ``PARAMS`` (the width of
    a slot's sampling-parameter row) and implements ``_prefill_inputs``,
    ``_step_body`` (graph-capturable: no host reads) and ``_sample``.
    Not thread-safe: the scheduler's thread calls ``add``, ``remove`` and ``step``.
    """

    ROWS_PER_SLOT = 1
    PARAMS = 0
    backbone = ""  # in messages

    def __init__(self, t3, *, slots: int, max_len: int, cuda_graphs: Optional[bool],
                 layers: int, heads: int, head_dim: int):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.t3 = t3
        self.device = t3.speech_emb.weight.device
        self.dtype = t3.speech_emb.weight.dtype  # embeddings stay float even when linears are int8
        self.slots = slots
        self.max_len = max_len
        self.head_dim = head_dim
        rows = self.ROWS_PER_SLOT * slots
        # The cache grows (by whole length buckets, up to max_len) to what the
        # longest request admitted so far may need, rather than starting at
        # max_len: most pieces need a third of it.
        self._cache_shape = (layers, rows, heads, head_dim)
        self.capacity = 0
        self.k_cache = self.v_cache = None
        self._graphs: Dict[Tuple[int, int], "torch.cuda.CUDAGraph"] = {}
        self._pool = None
        self._reserve(LENGTH_BUCKET)
        self.vocab = t3.hp.speech_tokens_dict_size

        # Per-row and per-slot inputs of a step (static buffers: graphs read them in place).
        self.row_pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.last_token = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(rows, self.vocab, dtype=torch.float32, device=self.device)
        # Sampling parameters and state per slot.
        self.seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
        self.seeds = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.steps = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.params = torch.zeros(slots, self.PARAMS, dtype=torch.float32, device=self.device)

        self._slots: List[_Slot] = []  # packed: slot i holds rows [R i, R (i + 1))
        self._waiting: List[DecodeRequest] = []
        self._by_request: Dict[DecodeRequest, _Slot] = {}
        self._joined = 0
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graphs = use_graphs

    def _rows(self, first_slot: int, end_slot: int) -> slice:
        return slice(self.ROWS_PER_SLOT * first_slot, self.ROWS_PER_SLOT * end_slot)

    def _reserve(self, length: int) -> None:
        """Make the cache hold at least ``length`` positions per row."""
        if length <= self.capacity:
            return
        capacity = min(self.max_len, -(-length // LENGTH_BUCKET) * LENGTH_BUCKET)
        layers, rows, heads, head_dim = self._cache_shape
        shape = (layers, rows, heads, capacity, head_dim)
        k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            k_cache[:, :, :, :self.capacity] = self.k_cache
            v_cache[:, :, :, :self.capacity] = self.v_cache
        self.k_cache, self.v_cache, self.capacity = k_cache, v_cache, capacity
        self._drop_graphs()  # captured graphs read the old buffers

    def _drop_graphs(self) -> None:
        """Forget every captured graph, and their memory pool with them: a pool whose graphs
        are all gone cannot be captured into again (torch asserts its use count; a cuBLAS
        workspace made during the first capture keeps it alive), so the next capture starts
        a new one."""
        self._graphs.clear()
        self._pool = None

    # -- membership ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slots) + len(self._waiting)

    def __contains__(self, request: DecodeRequest) -> bool:
        return request in self._by_request or request in self._waiting

    def add(self, request: DecodeRequest) -> None:
        """Queue ``request``; it is prefilled into a free slot at the next ``step``."""
        if request in self:
            raise ValueError("request already added")
        self._waiting.append(request)

    @torch.inference_mode()  # a cache grown inside ``step`` is an inference tensor: edit it in kind
    def remove(self, request: DecodeRequest) -> bool:
        """Drop ``request`` now (cancellation); its slot is free for the next step."""
        if request in self._waiting:
            self._waiting.remove(request)
            return True
        slot = self._by_request.pop(request, None)
        if slot is None:
            return False
        index = self._slots.index(slot)
        last = len(self._slots) - 1
        if index != last:  # keep the running slots packed at the front
            self._move(last, index)
            self._slots[index] = self._slots[last]
        self._slots.pop()
        return True

    def _move(self, src: int, dst: int) -> None:
        rows_src, rows_dst = self._rows(src, src + 1), self._rows(dst, dst + 1)
        length = self._slots[src].length
        self.k_cache[:, rows_dst, :, :length] = self.k_cache[:, rows_src, :, :length]
        self.v_cache[:, rows_dst, :, :length] = self.v_cache[:, rows_src, :, :length]
        for buf in (self.row_pos, self.logits):
            buf[rows_dst] = buf[rows_src]
        for buf in (self.last_token, self.seen, self.seeds, self.steps, self.params):
            buf[dst] = buf[src]

    # -- one step -----------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> List[StepEvent]:
        """One token for every running request; finished requests leave the decoder."""
        events: List[StepEvent] = []
        freed = False
        while self._slots:
            # The forward changes nothing a retry does not redo (it writes each row's K/V at
            # the same position again).
            try:
                self._forward(len(self._slots))
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if freed:  # still short: drop the newest request, which the batch fitted without
                    newest = max(self._slots, key=lambda slot: slot.joined)
                    log.warning("out of memory in a decode step of %d requests: dropping the "
                                "newest (%s)", len(self._slots), newest.request.who)
                    self.remove(newest.request)
                    events.append(StepEvent(newest.request, None, True, _out_of_memory(exc)))
                    release_cached_memory(self.device)
                    continue
            # First, the allocator's cached blocks (after the except: its traceback held the
            # failed forward's tensors). It hands them back by itself, but not while another
            # thread captures a CUDA graph; this waits for that capture to end.
            freed = True
            log.warning("out of memory in a decode step of %d requests: freeing cached memory "
                        "and trying again", len(self._slots))
            release_cached_memory(self.device)
        running = len(self._slots)
        if running:
            # Each running row wrote its new position; the next goes after it.
            self.row_pos[self._rows(0, running)] += 1
            for slot in self._slots:
                slot.length += 1
        self._admit(events)
        if not self._slots:
            return events
        tokens = self._sample(len(self._slots)).tolist()  # the one host synchronisation
        stop = self.t3.hp.stop_speech_token
        leaving = []
        for slot, token in zip(self._slots, tokens):
            if self._stops(slot, token, stop):
                events.append(StepEvent(slot.request, None, True))
                leaving.append(slot.request)
                continue
            slot.steps += 1
            done = slot.steps >= slot.request.max_new_tokens
            events.append(StepEvent(slot.request, token, done))
            if done:
                leaving.append(slot.request)
        for request in leaving:
            self.remove(request)
        return events

    def _stops(self, slot: _Slot, token: int, stop: int) -> bool:
        """Whether ``token``, just sampled for ``slot``, ends its request (not yielded)."""
        return token == stop

    def _prefill_inputs(self, request: DecodeRequest) -> Tuple[torch.Tensor, torch.Tensor]:
        """(``ROWS_PER_SLOT``, T, dim) prompt embeddings of ``request``, and its parameter row."""
        raise NotImplementedError

    def _t3_cond(self, request: DecodeRequest):
        """The request's voice conditioning in T3's format (voices are kept in float32)."""
        t3_cond = request.t3_cond
        return t3_cond if self.dtype == torch.float32 else t3_cond.to(dtype=self.dtype)

    def _admit(self, events: List[StepEvent]) -> None:
        """Prefill waiting requests into the free slots: together, in one padded forward (on a
        GPU a prefill is bound by launches, so requests that arrive together would otherwise
        queue one prefill each before anyone's first token); one by one if that fails, so a
        request that does not fit, or fails, fails alone and only its own free rows are touched."""
        prepared = []
        while self._waiting and len(self._slots) + len(prepared) < self.slots:
            request = self._waiting.pop(0)
            if request.max_new_tokens <= 0:
                events.append(StepEvent(request, None, True))
                continue
            try:
                inputs, params = self._prefill_inputs(request)
                fits = self.max_len - inputs.size(1) - 1  # speech tokens the cache has room for
                if fits < 1:
                    raise ValueError(f"the text piece and voice prompt take {inputs.size(1)} "
                                     f"positions; this decoder holds {self.max_len}")
                if request.max_new_tokens > fits:
                    # A piece whose text takes many tokens (CJK or emoji through GPT-2's byte
                    # pairs, Korean as jamo): its speech is capped as upstream's 1000-token cap
                    # caps any piece, rather than the job failing.
                    log.warning("%s: a prompt of %d positions leaves room for %d of the %d "
                                "speech tokens asked; capped", request.who,
                                inputs.size(1), fits, request.max_new_tokens)
                    request.max_new_tokens = fits
            except Exception as exc:
                events.append(StepEvent(request, None, True, exc))
                continue
            prepared.append((request, inputs, params))
        if len(prepared) > 1:
            try:
                self._prefill(prepared)
                return
            except Exception as exc:
                if is_out_of_memory(exc):
                    log.warning("out of memory prefilling %d requests together: one by one",
                                len(prepared))
            release_cached_memory(self.device)  # after the except: its traceback held the batch's
        for item in prepared:
            if item[0] in self._by_request:  # taken its slot before the shared prefill failed
                continue
            try:
                self._prefill([item])
            except Exception as exc:  # its prompt alone failed: only its own free rows were touched
                if is_out_of_memory(exc):  # this request alone did not fit
                    events.append(StepEvent(item[0], None, True, _out_of_memory(exc)))
                    release_cached_memory(self.device)
                else:
                    events.append(StepEvent(item[0], None, True, exc))

    def _prefill(self, prepared: List[Tuple[DecodeRequest, torch.Tensor, torch.Tensor]]) -> None:
        """The prompts of ``prepared`` (request, prompt embeddings, parameter row) through T3
        in one forward, padded on the right to the longest, into the next free slots. A row's
        positions see only earlier ones, so padding after a prompt changes nothing it computes
        (up to the rounding of a product over more rows)."""
        t3 = self.t3
        lengths = [inputs.size(1) for _, inputs, _ in prepared]
        self._reserve(max(n + request.max_new_tokens + 1
                          for n, (request, _, _) in zip(lengths, prepared)))
        if len(prepared) == 1:
            inputs, attention_mask = prepared[0][1], None
        else:
            longest = max(lengths)
            rows = sum(inputs.size(0) for _, inputs, _ in prepared)
            first = prepared[0][1]
            inputs = first.new_zeros(rows, longest, first.size(2))
            attention_mask = torch.zeros(rows, longest, dtype=torch.long, device=first.device)
            row = 0
            for (_, embeds, _), n in zip(prepared, lengths):
                inputs[row:row + embeds.size(0), :n] = embeds
                attention_mask[row:row + embeds.size(0), :n] = 1
                row += embeds.size(0)
        cache = DynamicCache()
        out = t3.tfmr(inputs_embeds=inputs, attention_mask=attention_mask, past_key_values=cache,
                      use_cache=True)
        starts = [0]
        for _, embeds, _ in prepared:
            starts.append(starts[-1] + embeds.size(0))
        # Every row's last prompt position, through the head at once, before any slot is
        # taken: what can still fail (memory) fails with nothing half done.
        last = torch.cat([out.last_hidden_state[start:end, n - 1, :]
                          for start, end, n in zip(starts, starts[1:], lengths)])
        logits = t3.speech_head(last).float()
        for (request, embeds, params), length, start, end in zip(prepared, lengths, starts, starts[1:]):
            mine = slice(start, end)
            index = len(self._slots)
            rows = self._rows(index, index + 1)
            for layer in range(self._cache_shape[0]):
                keys, values = _layer_kv(cache, layer)
                self.k_cache[layer, rows, :, :length] = keys[mine, :, :length]
                self.v_cache[layer, rows, :, :length] = values[mine, :, :length]
            self.logits[rows] = logits[mine]
            self.row_pos[rows] = length
            self.seeds[index] = int(torch.randint(0, 2**62, (1,), generator=request.generator,
                                                  device=request.generator.device))
            self.steps[index] = 0
            self.seen[index] = False
            self.seen[index, t3.hp.start_speech_token] = True  # upstream's history starts with it
            self.params[index] = params
            self._joined += 1
            slot = _Slot(request=request, joined=self._joined, length=length)
            self._slots.append(slot)
            self._by_request[request] = slot

    def _forward(self, n: int) -> None:
        """Logits of the next token for the first ``n`` slots' rows, into ``self.logits``."""
        bucket = 1
        while bucket < n:
            bucket *= 2
        bucket = min(bucket, self.slots)
        longest = max(slot.length for slot in self._slots) + 1
        span = min(self.capacity, -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET)
        # Rows past the running ones (free slots, or a slot about to be
        # prefilled) compute garbage at position 0 of their own rows: harmless.
        if bucket > n:
            self.row_pos[self._rows(n, bucket)] = 0
        if not self.cuda_graphs:
            self._step_body(bucket, span)
            return
        graph = self._graphs.get((bucket, span))
        if graph is None:
            try:
                graph = self._capture(bucket, span)
            except Exception as exc:  # a torch or driver that cannot capture this step: run eagerly
                if is_out_of_memory(exc):
                    raise  # ``step`` drops the newest request
                log.exception("CUDA graph capture of the %s T3 decode step failed; "
                              "decoding without CUDA graphs from now on", self.backbone)
                self.cuda_graphs = False
                self._drop_graphs()
                graph_capture.synchronize()
                self._step_body(bucket, span)
                return
        graph.replay()

    @property
    def graphs(self) -> int:
        """CUDA graphs captured so far (0 when running eagerly)."""
        return len(self._graphs)

    def _capture(self, bucket: int, span: int):
        # The warm-up run (``graph_capture.capture``) runs the real step with the
        # real inputs: it writes the same K/V to the same positions as the replay
        # that follows, so it changes nothing.
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, _ = graph_capture.capture(lambda: self._step_body(bucket, span), self._pool)
        self._graphs[(bucket, span)] = graph
        log.info("captured the %s T3 decode step for %d slot(s), %d positions", self.backbone,
                 bucket, span)
        return graph

    def _step_body(self, bucket: int, span: int) -> None:
        raise NotImplementedError

    def _sample(self, n: int) -> torch.Tensor:
        raise NotImplementedError


class FastDecoder(StaticCacheDecoder):
    """The static-cache decoder of T3's Llama backbone (the original and multilingual models):
    two rows per slot, conditioned and unconditioned, for classifier-free guidance."""

    ROWS_PER_SLOT = 2
    PARAMS = 5  # ``slot_params``
    backbone = "Llama"

    def __init__(self, t3, *, slots: int, max_len: int = DEFAULT_MAX_LEN,
                 cuda_graphs: Optional[bool] = None):
        if getattr(t3, "is_gpt", False):
            raise ValueError("FastDecoder supports T3's Llama backbone only")
        tfmr = t3.tfmr
        config = tfmr.config
        heads = config.num_key_value_heads
        if heads != config.num_attention_heads:
            raise ValueError("grouped-query attention is not supported (T3's Llama has none)")
        self.layers = list(tfmr.layers[: config.num_hidden_layers])
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        super().__init__(t3, slots=slots, max_len=max_len, cuda_graphs=cuda_graphs,
                         layers=len(self.layers), heads=heads, head_dim=head_dim)
        # Rotary tables for every position, computed once as HF computes them per step.
        positions = torch.arange(max_len, device=self.device)[None]
        probe = torch.zeros(1, 1, config.hidden_size, device=self.device, dtype=self.dtype)
        cos, sin = tfmr.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # (max_len, head_dim)
        self._fused = _fuse_projections(self.layers)

    def _prefill_inputs(self, request: DecodeRequest) -> Tuple[torch.Tensor, torch.Tensor]:
        inputs = prefill_inputs(self.t3, self._t3_cond(request), request.text_tokens, request.params)
        if inputs.size(0) == 1:  # no guidance: the second row repeats the first, weighted 0
            inputs = inputs.expand(2, -1, -1)
        return inputs, slot_params(request.params)

    def _step_body(self, bucket: int, span: int) -> None:
        """Embedding of each slot's last token -> logits; graph-capturable (no host reads).

        Few kernels per layer, since on a GPU a batch-1 step is bound by
        their number: one product for q, k and v and one for gate and up
        (``_fuse_projections``), rotary positions on q and k together.
        """
        t3 = self.t3
        rows = 2 * bucket
        heads = self._cache_shape[2]
        tokens = self.last_token[:bucket]
        # The last sampled token's learned position is the count of tokens sampled
        # so far (position 0 is the start of speech): ``steps``, as ``_sample`` left it.
        embed = t3.speech_emb(tokens) + t3.speech_pos_emb.emb(self.steps[:bucket])
        hidden = embed.repeat_interleave(2, dim=0)[:, None, :]  # (rows, 1, dim)
        pos = self.row_pos[:rows]
        cos = self.cos[pos][:, None, None, :]  # (rows, 1, 1, head_dim): every head, one position
        sin = self.sin[pos][:, None, None, :]
        row_index = torch.arange(rows, device=self.device)
        visible = torch.arange(span, device=self.device)[None, :] <= pos[:, None]
        mask = visible[:, None, None, :]  # (rows, 1, 1, span)
        for layer_idx, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            if self._fused is not None:
                qkv = F.linear(x, self._fused[layer_idx][0]).view(rows, 1, 3 * heads, self.head_dim)
                qk, v = qkv[:, :, :2 * heads], qkv[:, :, 2 * heads:]
            else:  # int8 linears cannot share one product
                shape = (rows, 1, heads, self.head_dim)
                qk = torch.cat([attn.q_proj(x).view(shape), attn.k_proj(x).view(shape)], dim=2)
                v = attn.v_proj(x).view(shape)
            qk = qk * cos + _rotate_half(qk) * sin  # HF's rotary, on q and k at once
            q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:]  # q: (rows, heads, 1, D)
            keys = self.k_cache[layer_idx, :rows]
            values = self.v_cache[layer_idx, :rows]
            keys[row_index, :, pos] = k[:, 0]
            values[row_index, :, pos] = v[:, 0]
            out = F.scaled_dot_product_attention(q, keys[:, :, :span], values[:, :, :span],
                                                 attn_mask=mask, scale=attn.scaling)
            hidden = residual + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            residual = hidden
            x = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            if self._fused is not None:
                gate, up = F.linear(x, self._fused[layer_idx][1]).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            hidden = residual + mlp.down_proj(mlp.act_fn(gate) * up)
        hidden = t3.tfmr.norm(hidden)
        self.logits[:rows].copy_(t3.speech_head(hidden[:, -1, :]).float())

    def _sample(self, n: int) -> torch.Tensor:
        """(n,) next tokens of the first ``n`` slots; also records them as inputs of the next step."""
        logits = self.logits[: 2 * n].view(n, 2, -1)
        top_p = any(slot.request.params.top_p < 1.0 for slot in self._slots[:n])
        probs = sampling_probs(logits[:, 0], logits[:, 1], self.params[:n], self.seen[:n],
                               top_p=top_p)
        # Exponential race: argmax p / E with E ~ Exp(1) draws token i with probability p_i.
        noise = -torch.log(counter_uniform(self.seeds[:n], self.steps[:n], probs.size(1)))
        tokens = torch.argmax(probs / noise, dim=-1)
        self.last_token[:n] = tokens
        self.seen[:n].scatter_(1, tokens[:, None], True)
        self.steps[:n] += 1
        return tokens


def slot_params(params: SamplingParams) -> torch.Tensor:
    """The per-slot parameter row ``sampling_probs`` reads."""
    # top-p as the mass it may drop, 1 - top_p, computed here in double precision as HF's
    # warper computes it: from a float32 top_p the threshold would round differently.
    return torch.tensor([params.cfg_weight, params.repetition_penalty, params.temperature,
                         params.min_p, 1.0 - params.top_p], dtype=torch.float32)


def sampling_probs(cond: torch.Tensor, uncond: torch.Tensor, params: torch.Tensor,
                   seen: torch.Tensor, *, top_p: bool = True) -> torch.Tensor:
    """(n, vocab) probabilities to draw from, for n requests at once.

    Upstream's chain, with each request's own parameters (rows of
    ``slot_params``): guidance mix, repetition penalty over the tokens
    ``seen``, temperature, min-p, top-p, softmax. ``top_p=False`` skips the
    sort when no request asks for top-p (it removes nothing at 1.0).
    """
    cfg, penalty, temperature, min_p, top_p_drop = params.unbind(1)
    scores = cond + cfg[:, None] * (cond - uncond)
    scores = penalise_repeats(scores, penalty, seen)
    scores = scores / temperature[:, None]
    # min-p: drop tokens less likely than min_p times the likeliest.
    probs = torch.softmax(scores, dim=-1)
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    scores = scores.masked_fill(probs < floor, float("-inf"))
    if top_p:
        scores = cut_top_p(scores, top_p_drop)
    return torch.softmax(scores, dim=-1)


def cut_top_p(scores: torch.Tensor, drop_mass: torch.Tensor,
              applies: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF's top-p warper per row: drop the least likely tokens whose mass stays within
    ``drop_mass`` (1 - top_p), keeping at least one; only on the rows ``applies`` marks."""
    ordered, order = torch.sort(scores, descending=False)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= drop_mass[:, None]
    if applies is not None:
        drop &= applies[:, None]
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def penalise_repeats(scores: torch.Tensor, penalty: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """HF's repetition penalty per row on the tokens ``seen``: negative scores times it,
    others divided by it."""
    penalised = torch.where(scores < 0, scores * penalty[:, None], scores / penalty[:, None])
    return torch.where(seen, penalised, scores)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse_projections(layers) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """One (q|k|v, gate|up) weight pair per layer, or None when the linears are not plain.

    The layer's own q, k, v, gate and up weights become views into the fused
    tensors (same values, no second copy), so HF's forward, used for the
    prefill, reads the very same memory. Done once per model.
    """
    fused = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj])
        if not all(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear and m.bias is None
                   for group in groups for m in group):
            return None
        pair = []
        for group in groups:
            existing = getattr(group[0], "_fused_weight", None)
            if existing is not None and all(
                    m.weight.data_ptr() == existing[sum(g.out_features for g in group[:i]):].data_ptr()
                    for i, m in enumerate(group)):
                pair.append(existing)
                continue
            weight = torch.cat([m.weight.detach() for m in group], dim=0)
            start = 0
            for m in group:
                m.weight.data = weight[start:start + m.out_features]
                start += m.out_features
            group[0]._fused_weight = weight
            pair.append(weight)
        fused.append(tuple(pair))
    return fused


class OutOfMemory(RuntimeError):
    """A request dropped from the decoder because the device ran out of memory."""


def _out_of_memory(exc: BaseException) -> OutOfMemory:
    error = OutOfMemory("the GPU ran out of memory while this request decoded beside others")
    error.__cause__ = exc
    return error


def _layer_kv(cache, layer: int):
    """(keys, values) of one layer of a filled ``DynamicCache``, across transformers versions."""
    if hasattr(cache, "layers"):
        entry = cache.layers[layer]
        return entry.keys, entry.values
    return cache.key_cache[layer], cache.value_cache[layer]


__all__ = ["DEFAULT_MAX_LEN", "FastDecoder", "OutOfMemory", "StaticCacheDecoder", "counter_uniform",
           "cut_top_p", "penalise_repeats", "sampling_probs", "slot_params"]

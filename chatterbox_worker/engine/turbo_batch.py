"""Continuous batching for Turbo's GPT-2 T3: many requests share each decode step.

The GPT-2 counterpart of ``batch_decode.BatchDecoder``, with the same
interface (``add``, ``remove``, ``step`` -> ``StepEvent``) so the
``Scheduler`` runs either. Each request's tokens are bit for bit those of
``turbo.decode_turbo_tokens`` run alone, whatever ran beside it, kept the
same way:

- No padding: each request keeps its own KV cache and brings one new
  position per step; its GPT-2 position (``wpe``) is its own cache length,
  and attention runs per request on its own cache with the mask HF's
  ``GPT2Model`` would build for it alone.
- Per-request products: GPT-2's ``Conv1D`` is ``addmm(bias, x, W)``; CPU
  BLAS sums one row in another order than several, so each request's row is
  its own block of one ``baddbmm`` (which reproduces the one-row ``addmm``
  bit for bit, weights read once per step). Where exactness is not promised
  (bf16, CUDA) the engine uses ``turbo_fast.TurboFastDecoder`` instead. The
  speech head runs per request, as alone.
- Sampling runs per request with the single-request code (``TurboSampler``).

Checked bit for bit in float32 on CPU with one thread on the tiny Turbo
checkpoint (tests/engine/test_turbo.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from .batch_decode import FAILED, DecodeRequest, RequestBook, StepEvent
from .turbo import TurboSampler, prefill_inputs


class _Sequence:
    def __init__(self, request: DecodeRequest, start_token: int, device):
        self.request = request
        self.sampler = TurboSampler(request.params, request.generator, start_token, device)
        self.cache = None  # made by the prefill
        self.steps = 0  # tokens sampled so far
        self.pending: Optional[torch.Tensor] = None  # (1, 1) last token, input of the next forward
        self.logits: Optional[torch.Tensor] = None  # (1, vocab) to sample from


class TurboBatchDecoder(RequestBook):
    """Turbo T3 decode steps shared by every running request. Not thread-safe: one scheduler
    thread calls ``add``, ``remove`` and ``step``."""

    sequence = _Sequence

    def __init__(self, t3):
        if not getattr(t3, "is_gpt", False):
            raise ValueError("TurboBatchDecoder supports T3's GPT-2 backbone only")
        super().__init__(t3)

    @torch.inference_mode()
    def step(self) -> List[StepEvent]:
        """One token for every running request, as ``decode_turbo_tokens`` makes it alone."""
        self._advance()

        events = []
        stop = self.t3.hp.stop_speech_token
        for seq in list(self._running):
            request = seq.request
            if seq.steps >= request.max_new_tokens:  # a budget of 0: nothing to make
                events.append(StepEvent(request, None, True))
                self.remove(request)
                continue
            token = self._pick(seq)
            if token is FAILED:
                continue
            seq.logits = None
            # As upstream: the first token is kept whatever it is.
            if token is None or (seq.steps > 0 and int(token) == stop):
                events.append(StepEvent(request, None, True))
                self.remove(request)
                continue
            seq.steps += 1
            done = seq.steps >= request.max_new_tokens  # the single loop makes no forward after it
            events.append(StepEvent(request, int(token), done))
            if done:
                self.remove(request)
            else:
                seq.pending = token
        return self._failures() + events

    def _prefill(self, seq: _Sequence) -> None:
        t3, request = self.t3, seq.request
        if request.max_new_tokens <= 0:
            return
        out = t3.tfmr(inputs_embeds=prefill_inputs(t3, request.t3_cond, request.text_tokens),
                      use_cache=True)
        seq.cache = out.past_key_values
        seq.logits = t3.speech_head(out.last_hidden_state[:, -1:])[:, -1, :]

    def _forward(self, seqs: List[_Sequence]) -> None:
        """``GPT2Model.forward`` for one new position of each of ``seqs``, with the same modules;
        products through ``_conv1d``, attention per request on its own cache."""
        t3 = self.t3
        tfmr = t3.tfmr
        embeds, masks, positions = [], [], []
        for seq in seqs:
            embed = t3.speech_emb(seq.pending)  # (1, 1, dim)
            past = seq.cache.get_seq_length()
            position = torch.arange(past, past + 1, device=embed.device)
            masks.append(create_causal_mask(config=tfmr.config, inputs_embeds=embed, attention_mask=None,
                                            cache_position=position, past_key_values=seq.cache,
                                            position_ids=position.unsqueeze(0)))
            embeds.append(embed + tfmr.wpe(position.unsqueeze(0)))
            positions.append(position)
        hidden = torch.cat(embeds)  # (n, 1, dim)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(tfmr.config._attn_implementation,
                                                          eager_attention_forward)
        for layer_idx, block in enumerate(tfmr.h):
            attn = block.attn
            residual = hidden
            x = block.ln_1(hidden)
            q, k, v = self._conv1d(x, attn.c_attn).split(attn.split_size, dim=2)
            shape = (*k.shape[:-1], -1, attn.head_dim)
            q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
            outs = []
            for i, seq in enumerate(seqs):
                keys, values = seq.cache.update(k[i:i + 1], v[i:i + 1], layer_idx,
                                                {"cache_position": positions[i]})
                out, _ = attention(attn, q[i:i + 1], keys, values, masks[i], dropout=0.0)
                outs.append(out)
            x = torch.cat(outs)
            x = x.reshape(*x.shape[:-2], -1).contiguous()
            hidden = self._conv1d(x, attn.c_proj) + residual
            residual = hidden
            x = block.ln_2(hidden)
            mlp = block.mlp
            hidden = residual + self._conv1d(mlp.act(self._conv1d(x, mlp.c_fc)), mlp.c_proj)
        hidden = tfmr.ln_f(hidden)
        for i, seq in enumerate(seqs):
            seq.logits = t3.speech_head(hidden[i:i + 1, -1:])[:, -1, :]
            seq.pending = None

    def _conv1d(self, x: torch.Tensor, conv) -> torch.Tensor:
        """GPT-2's ``Conv1D`` (``addmm(bias, x, W)``) over (n, 1, in) rows, each row as its own
        block, as if alone."""
        n = x.shape[0]
        weight = conv.weight
        return torch.baddbmm(conv.bias, x.reshape(n, 1, -1),
                             weight.expand(n, *weight.shape)).view(n, 1, -1)


__all__ = ["TurboBatchDecoder"]

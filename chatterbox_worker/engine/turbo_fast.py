"""The fast decode path for Turbo's GPT-2 T3: a static KV cache, one padded batch, CUDA graphs.

``fast_decode.FastDecoder``'s machinery (``StaticCacheDecoder``: slots,
cache, step loop, graphs, counter-based draws) with Turbo's backbone and
sampling:

- **One row per slot**: Turbo samples without guidance.
- **GPT-2's step**: the new token's speech embedding plus GPT-2's learned
  position (``wpe``) of its place in the sequence, then per block layer
  norm, one product for q, k and v (GPT-2's ``Conv1D`` is ``addmm(bias, x,
  W)``), attention over the row's own positions, the output product, layer
  norm, the MLP; the final norm and the speech head.
- **Upstream's processors, vectorised**: temperature, top-k, top-p, then the
  repetition penalty on the cut logits (``inference_turbo``'s order), per-row
  parameters. The penalty's history is the start-of-speech token for the
  first draw and the generated tokens alone after, as ``TurboSampler``.
  As upstream, the first token is kept even if it is the stop token.

What ``TurboBatchDecoder`` promises (each request's tokens bit for bit those
of the single-request loop) this one does not: its draws come from the
counter-based stream and its padded products sum in another order. It is
the GPU path (``Engine.decoder_kind`` ``fast``), as ``FastDecoder`` is for
the original model: on a GPU upstream Turbo's loop is bound by kernel
launches (public figures: 29 ms per token, 6.3 ms with CUDA graphs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .batch_decode import DecodeRequest
from .decode import SamplingParams
from .fast_decode import StaticCacheDecoder, _Slot, counter_uniform, cut_top_p, penalise_repeats
from .turbo import prefill_inputs

# Turbo's prompt is longer than the original's (a 375-token voice prompt), its
# token budget the same: a slot holds up to this many positions (GPT-2 medium
# has 8196), the cache growing to what admitted requests need.
TURBO_MAX_LEN = 2048


def turbo_slot_params(params: SamplingParams) -> torch.Tensor:
    """The per-slot parameter row ``turbo_sampling_probs`` reads: each processor's value, or
    the value that leaves the logits as they are where ``TurboSampler`` would not apply it."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    # top-p as the mass it may drop, computed in double precision as HF's warper does.
    return torch.tensor([temperature, float(max(int(params.top_k or 0), 0)), 1.0 - params.top_p,
                         params.repetition_penalty], dtype=torch.float32)


def turbo_sampling_probs(logits: torch.Tensor, params: torch.Tensor, seen: torch.Tensor, *,
                         top_k: bool = True, top_p: bool = True) -> torch.Tensor:
    """(n, vocab) probabilities to draw from, for n requests at once: ``TurboSampler``'s chain
    (HF's temperature, top-k, top-p and repetition-penalty processors) per row of
    ``turbo_slot_params``. ``top_k``/``top_p`` False skip the sorts when no row cuts."""
    temperature, k, top_p_drop, penalty = params.unbind(1)
    scores = logits / temperature[:, None]
    if top_k:
        # Keep the k likeliest (ties with the k-th included); k = 0 keeps all.
        kth = torch.sort(scores, descending=True).values.gather(
            1, (k.long().clamp(min=1, max=scores.size(1)) - 1)[:, None])
        scores = scores.masked_fill((scores < kth) & (k > 0)[:, None], float("-inf"))
    if top_p:  # on the rows with top_p < 1, as TurboSampler adds the warper only there
        scores = cut_top_p(scores, top_p_drop, applies=top_p_drop > 0)
    return torch.softmax(penalise_repeats(scores, penalty, seen), dim=-1)


class TurboFastDecoder(StaticCacheDecoder):
    """The static-cache decoder of Turbo's GPT-2 T3 (module docstring)."""

    ROWS_PER_SLOT = 1
    PARAMS = 4  # ``turbo_slot_params``
    backbone = "GPT-2"

    def __init__(self, t3, *, slots: int, max_len: int = TURBO_MAX_LEN,
                 cuda_graphs: Optional[bool] = None):
        if not getattr(t3, "is_gpt", False):
            raise ValueError("TurboFastDecoder supports T3's GPT-2 backbone only")
        config = t3.tfmr.config
        # HF's GPT-2 honours these in its eager attention only (its SDPA path, the default,
        # scales by 1/sqrt(head_dim) whatever they say): Turbo's config leaves them at their
        # defaults, and a config that does not would decode differently here and in the prefill.
        if (getattr(config, "reorder_and_upcast_attn", False)
                or getattr(config, "scale_attn_by_inverse_layer_idx", False)
                or not getattr(config, "scale_attn_weights", True)):
            raise ValueError("GPT-2 attention options other than the defaults are not supported")
        self.blocks = list(t3.tfmr.h)
        super().__init__(t3, slots=slots, max_len=min(max_len, config.n_positions),
                         cuda_graphs=cuda_graphs, layers=len(self.blocks), heads=config.n_head,
                         head_dim=config.n_embd // config.n_head)
        self.scale = self.head_dim ** -0.5

    def _prefill_inputs(self, request: DecodeRequest) -> Tuple[torch.Tensor, torch.Tensor]:
        return (prefill_inputs(self.t3, self._t3_cond(request), request.text_tokens),
                turbo_slot_params(request.params))

    def _stops(self, slot: _Slot, token: int, stop: int) -> bool:
        # As upstream: the first token is kept whatever it is (dropped before vocoding if special).
        return token == stop and slot.steps > 0

    def _step_body(self, bucket: int, span: int) -> None:
        """Each slot's last token -> logits, GPT-2's forward for one position per row;
        graph-capturable (no host reads)."""
        t3, tfmr = self.t3, self.t3.tfmr
        rows = bucket
        heads = self._cache_shape[2]
        pos = self.row_pos[:rows]  # where the new token goes: its GPT-2 position too
        hidden = t3.speech_emb(self.last_token[:rows]) + tfmr.wpe(pos)  # (rows, dim)
        row_index = torch.arange(rows, device=self.device)
        visible = torch.arange(span, device=self.device)[None, :] <= pos[:, None]
        mask = visible[:, None, None, :]  # (rows, 1, 1, span)
        for layer_idx, block in enumerate(self.blocks):
            attn, mlp = block.attn, block.mlp
            residual = hidden
            qkv = torch.addmm(attn.c_attn.bias, block.ln_1(hidden), attn.c_attn.weight)
            q, k, v = qkv.view(rows, 3, heads, self.head_dim).unbind(1)  # each (rows, heads, D)
            keys = self.k_cache[layer_idx, :rows]
            values = self.v_cache[layer_idx, :rows]
            keys[row_index, :, pos] = k
            values[row_index, :, pos] = v
            out = F.scaled_dot_product_attention(q[:, :, None], keys[:, :, :span], values[:, :, :span],
                                                 attn_mask=mask, scale=self.scale)
            hidden = residual + torch.addmm(attn.c_proj.bias, out.reshape(rows, -1), attn.c_proj.weight)
            residual = hidden
            x = mlp.act(torch.addmm(mlp.c_fc.bias, block.ln_2(hidden), mlp.c_fc.weight))
            hidden = residual + torch.addmm(mlp.c_proj.bias, x, mlp.c_proj.weight)
        self.logits[:rows].copy_(t3.speech_head(tfmr.ln_f(hidden)).float())

    def _sample(self, n: int) -> torch.Tensor:
        """(n,) next tokens of the first ``n`` slots; also records them as inputs of the next step."""
        requests = [slot.request.params for slot in self._slots[:n]]
        probs = turbo_sampling_probs(self.logits[:n], self.params[:n], self.seen[:n],
                                     top_k=any((p.top_k or 0) > 0 for p in requests),
                                     top_p=any(p.top_p < 1.0 for p in requests))
        # Exponential race: argmax p / E with E ~ Exp(1) draws token i with probability p_i.
        noise = -torch.log(counter_uniform(self.seeds[:n], self.steps[:n], probs.size(1)))
        tokens = torch.argmax(probs / noise, dim=-1)
        self.last_token[:n] = tokens
        # The first draw's history was the start token; later ones, the generated tokens.
        self.seen[:n] &= (self.steps[:n] > 0)[:, None]
        self.seen[:n].scatter_(1, tokens[:, None], True)
        self.steps[:n] += 1
        return tokens


__all__ = ["TURBO_MAX_LEN", "TurboFastDecoder", "turbo_sampling_probs", "turbo_slot_params"]

"""The T3 decode loop: text tokens + voice -> speech tokens, one at a time.

This is upstream's ``T3.inference`` sampling procedure step for step (same
embeddings, same classifier-free guidance mix, same logits processors in the
same order), so with equal seeds it picks the same tokens. What differs is
what a server needs:

- guidance off (``cfg_weight=0``) runs one sequence instead of crashing;
- randomness comes from the request's own ``torch.Generator``;
- tokens are yielded as they are made (streaming), and the caller's budget
  ends a piece that never emits its stop token;
- no attentions or hidden states of every layer are asked for, no hooks
  are attached, nothing is printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (MinPLogitsWarper,
                                                    RepetitionPenaltyLogitsProcessor,
                                                    TopPLogitsWarper)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    cfg_weight: float = 0.5
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    top_k: int = 0  # 0: off. Only turbo's upstream loop uses it.


def text_tokens_for(model, text: str, language: str = "en") -> torch.Tensor:
    """(1, L) token ids of ``text`` as the variant's upstream builds them: T3's start/stop text
    tokens around them (turbo's upstream adds none).

    The variant's own normalisation and tokenizer (``ChatterboxModel.text_encoder``)."""
    return model.text_encoder(text, language).to(model.device)


def prefill_inputs(t3, t3_cond, text_tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(rows, T, dim) embeddings of one request's prompt: conditioning, text, start of speech.

    Two rows with guidance (row 0 conditioned, row 1 with its text embedding
    zeroed by ``prepare_input_embeds``, as upstream), one without.
    """
    hp = t3.hp
    guided = params.cfg_weight > 0.0
    tokens = text_tokens.repeat(2, 1) if guided else text_tokens
    batch = tokens.size(0)
    bos = torch.full((batch, 1), hp.start_speech_token, dtype=torch.long, device=tokens.device)
    embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=tokens, speech_tokens=bos,
                                        cfg_weight=params.cfg_weight)
    # Upstream appends a second start-of-speech embedding at position 0.
    bos_embed = t3.speech_emb(bos[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)
    return torch.cat([embeds, bos_embed.expand(batch, -1, -1)], dim=1)


def speech_embedding(t3, token: torch.Tensor, step: int) -> torch.Tensor:
    """(1, 1, dim) input embedding of the speech token sampled at ``step`` (0-based).

    Its learned position is ``step + 1``: position 0 is the start-of-speech token.
    """
    return t3.speech_emb(token) + t3.speech_pos_emb.get_fixed_embedding(step + 1)


class RowSampler:
    """One request's token choice: guidance mix, logits processors, its own generator.

    Upstream's order: repetition penalty, temperature, min-p, top-p, then one
    ``torch.multinomial`` draw from the request's generator. Kept in one place
    so that the single-request loop and the batched decoder cannot drift apart.
    """

    def __init__(self, params: SamplingParams, generator: torch.Generator, start_token: int,
                 device):
        self.params = params
        self.generator = generator
        self.guided = params.cfg_weight > 0.0
        self.rows = 2 if self.guided else 1
        self._repetition = RepetitionPenaltyLogitsProcessor(penalty=float(params.repetition_penalty))
        self._min_p = MinPLogitsWarper(min_p=params.min_p)
        self._top_p = TopPLogitsWarper(top_p=params.top_p)
        self._cfg = None
        self.generated = torch.full((1, 1), start_token, dtype=torch.long, device=device)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, 1) next token from this request's (rows, vocab) logits."""
        params = self.params
        if self.guided:
            cond, uncond = logits[0:1], logits[1:2]
            if self._cfg is None:
                self._cfg = torch.as_tensor(params.cfg_weight, device=cond.device, dtype=cond.dtype)
            logits = cond + self._cfg * (cond - uncond)
        logits = self._repetition(self.generated, logits)
        if params.temperature != 1.0:
            logits = logits / params.temperature
        logits = self._min_p(self.generated, logits)
        logits = self._top_p(self.generated, logits)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)

    def accept(self, token: torch.Tensor) -> None:
        """Record an emitted token (the repetition penalty sees it from now on)."""
        self.generated = torch.cat([self.generated, token], dim=1)


@torch.inference_mode()
def decode_speech_tokens(model, t3_cond, text_tokens: torch.Tensor, params: SamplingParams, *,
                         max_new_tokens: int, generator: torch.Generator) -> Iterator[int]:
    """Yield speech token ids until the stop token or ``max_new_tokens``.

    The stop token itself is not yielded. Closing the iterator stops decoding
    at once (cancellation) and frees the KV cache.
    """
    t3 = model.t3
    stop = t3.hp.stop_speech_token
    sampler = RowSampler(params, generator, t3.hp.start_speech_token, text_tokens.device)
    inputs = prefill_inputs(t3, t3_cond, text_tokens, params)

    cache = DynamicCache()
    out = t3.tfmr(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
    try:
        for step in range(max_new_tokens):
            next_token = sampler.pick(t3.speech_head(out.last_hidden_state[:, -1, :]))
            token = int(next_token)
            if token == stop:
                return
            yield token
            sampler.accept(next_token)
            embed = speech_embedding(t3, next_token, step)
            out = t3.tfmr(inputs_embeds=embed.expand(sampler.rows, -1, -1),
                          past_key_values=out.past_key_values, use_cache=True)
    finally:
        del cache, out

"""Chatterbox Turbo: its T3 (a GPT-2 backbone), its text, its decode loop, its loader.

Turbo (upstream ``ChatterboxTurboTTS``) differs from the original model in
what T3 is and how it samples, not in what a voice or a vocoder call is:

- T3 is GPT-2 medium over a GPT-2 BPE tokenizer (text vocabulary 50276,
  with the event tags such as ``[laugh]`` as added tokens), speech vocabulary
  6563, no learned input positions of its own (GPT-2 adds its own), a 375
  token voice prompt fed without a perceiver, no exaggeration input.
- Sampling is ``T3.inference_turbo``: no guidance, one row, logits
  processors temperature -> top-k -> top-p -> repetition penalty.
- The vocoder is S3Gen's mean-flow variant, 2 steps without guidance
  (``vocoder.flow_mels`` reads ``s3gen.meanflow``).

``decode_turbo_tokens`` is ``inference_turbo`` step for step (tested equal
with equal seeds), with what a server needs: the request's own generator,
a token budget, tokens yielded as made, cancellation by closing, no
progress bar.
"""

from __future__ import annotations

import re
from typing import Iterator, List

import torch

from ..errors import ConfigError, InvalidInput, reason

TEXT_VOCAB_SIZE = 50276  # GPT-2's 50257 BPE tokens plus Turbo's added tokens (from_local's hp)
SPEECH_VOCAB_SIZE = 6563  # 6561 speech ids, start (6561) and stop (6562)
PROMPT_TOKENS = 375  # T3's voice prompt: 15 s of speech tokens
T3_FILE = "t3_turbo_v1.safetensors"
S3GEN_FILE = "s3gen_meanflow.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json",
                   "tokenizer_config.json")
# The sound tags Resemble documents for Turbo; the tokenizer holds them as
# single added tokens, so the model hears the event, not the word.
EVENT_TAGS = ("[clear throat]", "[sigh]", "[shush]", "[cough]", "[groan]", "[sniff]", "[gasp]",
              "[chuckle]", "[laugh]")
_TAG = re.compile(r"\[[A-Za-z][A-Za-z ]*\]")
GPT2_RELEASED = "GPT2_medium"


def turbo_hp(config_name: str = GPT2_RELEASED):
    """T3's hyper-parameters exactly as ``ChatterboxTurboTTS.from_local`` sets them."""
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config(text_tokens_dict_size=TEXT_VOCAB_SIZE)
    hp.llama_config_name = config_name
    hp.speech_tokens_dict_size = SPEECH_VOCAB_SIZE
    hp.input_pos_emb = None
    hp.speech_cond_prompt_len = PROMPT_TOKENS
    hp.use_perceiver_resampler = False
    hp.emotion_adv = False
    return hp


def build_turbo_t3(sizes):
    """Turbo's T3 at ``sizes`` (``architecture.ModelSizes``), with its GPT-2 word embedding still
    there (the checkpoint holds it; ``load_turbo`` drops it after loading, as upstream)."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

    if sizes.is_released:
        return T3(turbo_hp())
    # T3 reads its backbone shape from upstream's table by name; a shrunk
    # checkpoint gets an entry of its own, keyed by its sizes.
    name = f"worker_gpt2_{sizes.t3_hidden}x{sizes.t3_layers}x{sizes.t3_heads}x{sizes.t3_intermediate}"
    LLAMA_CONFIGS.setdefault(name, dict(
        LLAMA_CONFIGS[GPT2_RELEASED], n_embd=sizes.t3_hidden, hidden_size=sizes.t3_hidden,
        n_head=sizes.t3_heads, n_layer=sizes.t3_layers, n_inner=sizes.t3_intermediate))
    return T3(turbo_hp(name))


def load_tokenizer(directory):
    """Turbo's GPT-2 tokenizer from the checkpoint directory, offline, as ``from_local`` loads it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def normalise_text(text: str) -> str:
    """Upstream Turbo's punctuation clean-up (its own ``punc_norm``, not the original model's)."""
    from chatterbox.tts_turbo import punc_norm

    return punc_norm(text)


def text_tokens(tokenizer, text: str, device="cpu") -> torch.Tensor:
    """(1, L) ids of ``text`` as ``ChatterboxTurboTTS.generate`` makes them: its ``punc_norm``,
    then the tokenizer with no start or stop tokens around."""
    ids = tokenizer(normalise_text(text), return_tensors="pt", padding=True, truncation=True)
    return ids.input_ids.long().to(device)


def known_tags(tokenizer) -> List[str]:
    """The bracketed tags this tokenizer reads as one token each (Turbo's event tags).

    Its added tokens (``added_tokens.json``), where Turbo keeps them; the whole
    vocabulary only if none of those is a tag."""
    tags = sorted(t for t in tokenizer.get_added_vocab() if _TAG.fullmatch(t))
    return tags or sorted(t for t in tokenizer.get_vocab() if _TAG.fullmatch(t))


def check_tags(text: str, tags) -> None:
    """Refuse a bracketed word the model has no token for (``[laughs]``, ``[whistle]``).

    The tokenizer would split it into letters and the model would read the
    word aloud, brackets and all; a typo in a tag is almost always meant as
    the tag. Brackets around anything other than letters and spaces (``[1]``,
    ``[Note: ...]``) are ordinary text and are spoken."""
    known = set(tags)
    for match in _TAG.finditer(text):
        if match.group(0) not in known:
            raise InvalidInput(f"text: {match.group(0)} is not an event tag of the turbo model; "
                               f"it knows {' '.join(sorted(known))}")


class TurboSampler:
    """``inference_turbo``'s token choice for one request, with the request's own generator.

    Upstream's processors in its order: temperature, top-k, top-p, then the
    repetition penalty (on the already cut logits). The penalty's history is
    the start-of-speech token for the first draw and the generated tokens
    (without it) for every later one.
    """

    def __init__(self, params, generator: torch.Generator, start_token: int, device):
        from transformers.generation.logits_process import (LogitsProcessorList,
                                                            RepetitionPenaltyLogitsProcessor,
                                                            TemperatureLogitsWarper,
                                                            TopKLogitsWarper, TopPLogitsWarper)

        processors = LogitsProcessorList()
        if params.temperature > 0 and params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        top_k = int(getattr(params, "top_k", 0) or 0)
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.processors = processors
        self.generator = generator
        self.start = torch.full((1, 1), start_token, dtype=torch.long, device=device)
        self.generated: List[torch.Tensor] = []

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, 1) next token from (1, vocab) logits; None when every logit is cut (upstream stops)."""
        history = torch.cat(self.generated, dim=1) if self.generated else self.start
        # float32 whatever T3's format (a no-op in float32, where upstream's draws are matched).
        logits = self.processors(history, logits.float())
        if self.generated and torch.all(logits == -float("inf")):
            return None
        probs = torch.softmax(logits, dim=-1)
        token = torch.multinomial(probs, num_samples=1, generator=self.generator)
        self.generated.append(token)
        return token


def prefill_inputs(t3, t3_cond, text_tokens: torch.Tensor) -> torch.Tensor:
    """(1, T, dim): voice conditioning, text, start of speech, as ``inference_turbo`` builds them."""
    start = torch.full_like(text_tokens[:, :1], t3.hp.start_speech_token)
    embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens,
                                        speech_tokens=start, cfg_weight=0.0)
    return embeds


@torch.inference_mode()
def decode_turbo_tokens(model, t3_cond, text_tokens: torch.Tensor, params, *,
                        max_new_tokens: int, generator: torch.Generator) -> Iterator[int]:
    """Yield Turbo speech token ids until the stop token or ``max_new_tokens``.

    As upstream, the first token is kept whatever it is (upstream checks for
    the stop token only from the second on; a special id there is dropped
    before vocoding) and the stop token itself is not yielded. Closing the
    iterator stops decoding at once and frees the KV cache.
    """
    t3 = model.t3
    stop = t3.hp.stop_speech_token
    sampler = TurboSampler(params, generator, t3.hp.start_speech_token, text_tokens.device)
    out = t3.tfmr(inputs_embeds=prefill_inputs(t3, t3_cond, text_tokens), use_cache=True)
    try:
        for step in range(max_new_tokens):
            logits = t3.speech_head(out.last_hidden_state[:, -1:])[:, -1, :]
            token = sampler.pick(logits)
            if token is None or (step > 0 and int(token) == stop):
                return
            yield int(token)
            out = t3.tfmr(inputs_embeds=t3.speech_emb(token), past_key_values=out.past_key_values,
                          use_cache=True)
    finally:
        del out


def load_parts(directory, sizes, device: str):
    """(voice encoder, T3, S3Gen, tokenizer) of a Turbo checkpoint, as ``from_local`` loads them:
    every state dict strictly, GPT-2's word embedding dropped (T3 feeds embeddings)."""
    from .architecture import build_s3gen, build_voice_encoder, skip_random_init
    from .model import _load_safetensors, _load_state, load_t3_weights

    with skip_random_init():
        ve = build_voice_encoder(sizes)
    _load_state(ve, _load_safetensors(directory / "ve.safetensors"), "ve.safetensors")
    with skip_random_init():
        t3 = build_turbo_t3(sizes)
    load_t3_weights(t3, directory / T3_FILE)
    del t3.tfmr.wte
    with skip_random_init():
        s3gen = build_s3gen(sizes, meanflow=True)
    _load_state(s3gen, _load_safetensors(directory / S3GEN_FILE), S3GEN_FILE)
    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:
        raise ConfigError(f"cannot read the turbo tokenizer (vocab.json, merges.txt, ...): "
                          f"{reason(exc, 200)}") from None
    if max(tokenizer.get_vocab().values()) >= TEXT_VOCAB_SIZE:
        raise ConfigError(f"the turbo tokenizer has ids past T3's text vocabulary of {TEXT_VOCAB_SIZE}")
    for module in (ve, t3, s3gen):
        module.to(device).eval()
    return ve, t3, s3gen, tokenizer


class TurboText:
    """Turbo's text path, called as ``text_encoder(text, language)``: (1, L) ids as
    ``ChatterboxTurboTTS.generate`` makes them (no start or stop text tokens: upstream adds none).

    ``check(text)`` refuses a bracketed word that is not one of this tokenizer's tags."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tags = known_tags(tokenizer)

    def __call__(self, text: str, language: str = "en") -> torch.Tensor:
        return text_tokens(self.tokenizer, text)

    def check(self, text: str) -> None:
        check_tags(text, self.tags)


def load_turbo(source, *, device: str, t3_dtype: str = "float32"):
    """The Turbo checkpoint at ``source`` as a ``ChatterboxModel`` (``ConfigError`` on any mismatch)."""
    from .model import ChatterboxModel, load_builtin_voice, load_sizes, model_signature, set_t3_format

    if t3_dtype == "int8":
        # torch's dynamic int8 quantises nn.Linear; GPT-2's layers are
        # transformers' Conv1D, so only the speech head would change.
        raise ConfigError("CHATTERBOX_DTYPE=int8 is not available for the turbo model; use float32 "
                          "on CPU or bfloat16 on CUDA")
    directory = source.directory
    sizes = load_sizes(directory)
    ve, t3, s3gen, tokenizer = load_parts(directory, sizes, device)
    set_t3_format(t3, t3_dtype)
    return ChatterboxModel(variant="turbo", device=device, t3=t3, s3gen=s3gen, voice_encoder=ve,
                           tokenizer=tokenizer, builtin_voice=load_builtin_voice(directory, device),
                           signature=model_signature("turbo", directory), source=source, sizes=sizes,
                           text_encoder=TurboText(tokenizer))


__all__ = ["TurboText", "load_turbo", "EVENT_TAGS", "TurboSampler", "build_turbo_t3", "check_tags", "decode_turbo_tokens",
           "known_tags", "load_parts", "load_tokenizer", "text_tokens", "turbo_hp"]

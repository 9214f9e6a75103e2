"""A voice as the model needs it, built from reference audio or read from tensors.

``VoiceConditionals`` is our own, immutable description of a voice: the T3
speaker embedding and prompt tokens, and S3Gen's prompt tokens, prompt mel
frames and x-vector. Each request gets fresh upstream objects from it
(``for_request``), so nothing one job does to them (upstream caches the prompt
embedding inside ``T3Cond``) can reach another job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch

S3GEN_SR = 24000  # S3Gen works at 24 kHz (reference mel frames, output audio)
S3_SR = 16000  # the speech tokenizer and the voice encoder work at 16 kHz
# T3's prompt is the first ``Variant.t3_prompt_seconds`` (upstream ENC_COND_LEN: 6 s, turbo 15 s)
S3GEN_PROMPT_SECONDS = 10  # upstream DEC_COND_LEN: S3Gen's prompt is the first 10 s

# name -> (dtype, shape with None for "any length"); the tensor layout of a voice.
TENSOR_SPEC = {
    "speaker_emb": (torch.float32, (1, 256)),
    "cond_prompt_speech_tokens": (torch.int64, (1, None)),
    "prompt_token": (torch.int64, (1, None)),
    "prompt_token_len": (torch.int64, (1,)),
    "prompt_feat": (torch.float32, (1, None, 80)),
    "embedding": (torch.float32, (1, 192)),
}


@dataclass(frozen=True)
class VoiceConditionals:
    speaker_emb: torch.Tensor
    cond_prompt_speech_tokens: torch.Tensor
    prompt_token: torch.Tensor
    prompt_token_len: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor

    def tensors(self) -> Dict[str, torch.Tensor]:
        """CPU copies of every tensor, in the layout of ``TENSOR_SPEC`` (for voice files)."""
        return {name: getattr(self, name).detach().to("cpu").clone() for name in TENSOR_SPEC}

    @classmethod
    def from_tensors(cls, tensors: Dict[str, torch.Tensor], device: str = "cpu") -> "VoiceConditionals":
        """Build from a dict already checked with ``check_tensors``."""
        return cls(**{name: tensors[name].to(device) for name in TENSOR_SPEC})

    def for_request(self, exaggeration: float):
        """Fresh upstream ``(T3Cond, S3Gen ref dict)`` for one request."""
        from chatterbox.models.t3.modules.cond_enc import T3Cond

        device = self.speaker_emb.device
        t3_cond = T3Cond(
            speaker_emb=self.speaker_emb.clone(),
            cond_prompt_speech_tokens=self.cond_prompt_speech_tokens.clone(),
            emotion_adv=exaggeration * torch.ones(1, 1, 1, device=device),
        )
        gen = {
            "prompt_token": self.prompt_token.clone(),
            "prompt_token_len": self.prompt_token_len.clone(),
            "prompt_feat": self.prompt_feat.clone(),
            "prompt_feat_len": None,
            "embedding": self.embedding.clone(),
        }
        return t3_cond, gen


# Longest T3 prompt a voice file may hold: 20 s of speech tokens. Upstream's
# are 150 (original, multilingual) and 375 (turbo). Turbo's T3 reads the prompt
# whole, so a longer one would crowd out the speech in the fast decoder's 2048
# positions (or exceed GPT-2's), failing every job that used the voice.
MAX_T3_PROMPT_TOKENS = 500
# Longest S3Gen prompt: 40 s (upstream's is 10 s, 250 tokens). Every vocoder
# call of a one-shot take attends over the whole prompt, so a longer one
# multiplies each job's vocoder time and memory for whoever uses the voice.
MAX_S3GEN_PROMPT_TOKENS = 1000
# Largest magnitude of a voice's float values. The voice encoder's embedding is
# unit length, log-mel frames lie within about -12 .. 5; values near float32's
# limit (finite, so past the NaN check) overflowed T3 into NaN logits and every
# job using the voice failed (turbo from about 1e20, the original near 1e38).
MAX_MAGNITUDE = 1e4


def check_tensors(tensors: Dict[str, object]) -> None:
    """Raise ``ValueError`` naming the first tensor whose presence, dtype or shape is wrong."""
    for name, (dtype, shape) in TENSOR_SPEC.items():
        value = tensors.get(name)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"'{name}' is missing or not a tensor")
        if value.dtype != dtype:
            raise ValueError(f"'{name}' has dtype {value.dtype}, expected {dtype}")
        if value.dim() != len(shape) or any(want is not None and got != want
                                            for got, want in zip(value.shape, shape)):
            raise ValueError(f"'{name}' has shape {tuple(value.shape)}, expected {shape}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"'{name}' holds NaN or infinite values")
        if value.is_floating_point() and value.numel() and value.abs().max() > MAX_MAGNITUDE:
            raise ValueError(f"'{name}' holds values beyond +-{MAX_MAGNITUDE:g}")
    t3_prompt = tensors["cond_prompt_speech_tokens"].shape[1]
    if t3_prompt > MAX_T3_PROMPT_TOKENS:
        raise ValueError(f"'cond_prompt_speech_tokens' has {t3_prompt} tokens; at most "
                         f"{MAX_T3_PROMPT_TOKENS} (upstream's voices have 150, turbo's 375)")
    tokens = tensors["prompt_token"]
    if tokens.shape[1] == 0 or tokens.shape[1] > MAX_S3GEN_PROMPT_TOKENS:
        raise ValueError(f"'prompt_token' has {tokens.shape[1]} tokens; "
                         f"1 to {MAX_S3GEN_PROMPT_TOKENS}")
    if int(tensors["prompt_token_len"][0]) != tokens.shape[1]:
        raise ValueError("'prompt_token_len' does not match 'prompt_token'")
    if tensors["prompt_feat"].shape[1] != 2 * tokens.shape[1]:
        raise ValueError("'prompt_feat' must have two mel frames per prompt token")
    for name in ("cond_prompt_speech_tokens", "prompt_token"):
        t = tensors[name]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 6561):
            raise ValueError(f"'{name}' holds ids outside the speech vocabulary")


def from_upstream(conds) -> VoiceConditionals:
    """Our form of an upstream ``Conditionals`` (the checkpoint's built-in voice)."""
    gen = conds.gen
    prompt_token = gen["prompt_token"].long()
    # Upstream keeps up to one extra mel frame when the reference was not a
    # whole number of tokens long; keep exactly two frames per prompt token.
    prompt_feat = gen["prompt_feat"][:, :2 * prompt_token.shape[1]]
    token_len = gen.get("prompt_token_len")
    if token_len is None:
        token_len = torch.tensor([prompt_token.shape[1]])
    return VoiceConditionals(
        speaker_emb=conds.t3.speaker_emb.float().reshape(1, -1),
        cond_prompt_speech_tokens=torch.atleast_2d(conds.t3.cond_prompt_speech_tokens).long(),
        prompt_token=prompt_token,
        prompt_token_len=torch.as_tensor(token_len).long().reshape(1),
        prompt_feat=prompt_feat.float(),
        embedding=gen["embedding"].float().reshape(1, -1),
    )


def normalise_loudness(clip: np.ndarray, lufs: float) -> np.ndarray:
    """``clip`` at integrated loudness ``lufs`` (upstream Turbo's ``norm_loudness``, which leaves a
    clip it cannot measure as it is)."""
    import contextlib
    import sys

    from chatterbox.tts_turbo import ChatterboxTurboTTS

    # Upstream's method uses nothing of its instance; it prints its warning
    # to stdout, which the worker keeps for results.
    with contextlib.redirect_stdout(sys.stderr):
        out = ChatterboxTurboTTS.norm_loudness(None, np.asarray(clip, dtype=np.float32), S3GEN_SR,
                                               target_lufs=lufs)
    return np.asarray(out, dtype=np.float32)


@torch.inference_mode()
def build_conditionals(model, clips_24k: Sequence[np.ndarray],
                       prompt_clip: int = 0) -> VoiceConditionals:
    """Make a voice from cleaned 24 kHz reference clips of one speaker.

    The speaker embedding averages every clip; the prompts (what T3 and S3Gen
    imitate directly) come from ``prompt_clip``. With one clip this is exactly
    the model variant's upstream ``prepare_conditionals`` (turbo's: every clip
    first normalised to -27 LUFS, T3's prompt from the first 15 s).
    """
    import librosa

    from .variants import VARIANTS

    spec = VARIANTS[model.variant]
    device = model.device
    if spec.reference_lufs is not None:
        clips_24k = [normalise_loudness(c, spec.reference_lufs) for c in clips_24k]
    clips_16k = [librosa.resample(np.asarray(c, dtype=np.float32), orig_sr=S3GEN_SR, target_sr=S3_SR)
                 for c in clips_24k]
    prompt_24k = np.asarray(clips_24k[prompt_clip], dtype=np.float32)[:S3GEN_PROMPT_SECONDS * S3GEN_SR]
    ref = model.s3gen.embed_ref(prompt_24k, S3GEN_SR, device=device)
    if len(clips_16k) > 1:
        x_vectors = [model.s3gen.speaker_encoder.inference(
            torch.from_numpy(c).float().unsqueeze(0).to(device)) for c in clips_16k]
        ref["embedding"] = torch.stack([x.reshape(-1) for x in x_vectors]).mean(0, keepdim=True)

    plen = model.t3.hp.speech_cond_prompt_len
    prompt_tokens, _ = model.s3gen.tokenizer.forward(
        [clips_16k[prompt_clip][:int(spec.t3_prompt_seconds * S3_SR)]], max_len=plen)
    prompt_tokens = torch.atleast_2d(prompt_tokens).to(device)

    ve_embeds = model.voice_encoder.embeds_from_wavs(clips_16k, sample_rate=S3_SR)
    speaker_emb = torch.from_numpy(np.asarray(ve_embeds)).mean(axis=0, keepdim=True).to(device)

    # Two mel frames per prompt token exactly: a reference that is not a whole
    # number of 40 ms tokens leaves upstream one mel frame over.
    prompt_token = ref["prompt_token"].long()
    n_tokens = min(prompt_token.shape[1], ref["prompt_feat"].shape[1] // 2)
    return VoiceConditionals(
        speaker_emb=speaker_emb.float(),
        cond_prompt_speech_tokens=prompt_tokens.long(),
        prompt_token=prompt_token[:, :n_tokens],
        prompt_token_len=torch.tensor([n_tokens], dtype=torch.long, device=device),
        prompt_feat=ref["prompt_feat"][:, :2 * n_tokens].float(),
        embedding=ref["embedding"].float().reshape(1, -1),
    )

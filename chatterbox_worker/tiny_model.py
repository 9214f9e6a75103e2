"""Random-weights Chatterbox checkpoints in the upstream file layout, for tests and benchmarks.

    python -m chatterbox_worker.tiny_model DIR [--seed N] [--size tiny|full] [--variant original|turbo]

writes ``ve.safetensors``, ``t3_cfg.safetensors``, ``s3gen.safetensors``,
``tokenizer.json`` and a built-in voice ``conds.pt`` (made from a synthetic
reference clip through the same code that makes uploaded voices), plus, for
``tiny``, the shrunk sizes the loader needs. ``CHATTERBOX_MODEL_DIR=DIR`` then
loads it through the worker's normal path. ``--variant turbo`` writes
Chatterbox Turbo's layout instead (``tiny_turbo``). Random weights make noise, not
speech: tests check structure, determinism and parity with upstream.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .engine.architecture import (TINY, ModelSizes, build_s3gen, build_t3, build_voice_encoder,
                                  state_dict_to_save)
from .engine.weights import WeightSource

SPECIAL_IDS = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4, "[CLS]": 5,
               "[MASK]": 6, "[START]": 255}
TEXT_VOCAB_SIZE = 704


def write_tokenizer(path: Path) -> None:
    """A character-level tokenizer with upstream's special-token ids ([START]=255, [STOP]=0)."""
    from tokenizers import AddedToken, Tokenizer, models

    vocab = dict(SPECIAL_IDS)
    chars = string.ascii_letters + string.digits + string.punctuation + "àáâäçèéêëíïñóôöúüß’“”…—–"
    next_id = 7
    for ch in chars:
        while next_id in vocab.values():
            next_id += 1
        vocab[ch] = next_id
        next_id += 1
    assert max(vocab.values()) < TEXT_VOCAB_SIZE
    taken = set(vocab.values())
    vocab.update({f"[unused{i}]": i for i in range(TEXT_VOCAB_SIZE) if i not in taken})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_IDS])
    tokenizer.save(str(path))


def synthetic_reference(seconds: float = 8.0, seed: int = 0, sr: int = 24000) -> np.ndarray:
    """A voiced, syllable-paced test signal: harmonics on a wandering pitch, with pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t) + 10 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
    noise = 0.05 * rng.standard_normal(t.size)
    audio = 0.3 * (voiced * syllables + noise)
    return (audio / np.abs(audio).max() * 0.6).astype(np.float32)


def write_checkpoint(directory: Path, *, seed: int = 0, sizes: ModelSizes = TINY,
                     variant: str = "original") -> Path:
    """Write a random checkpoint of ``variant`` to ``directory`` and return it."""
    writer = WRITERS.get(variant)
    if writer is None:
        raise SystemExit(f"variant {variant!r} has no test checkpoint yet; use one of {list(WRITERS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    writer(directory, seed=seed, sizes=sizes)
    return directory


def write_original(directory: Path, *, seed: int, sizes: ModelSizes) -> None:
    """The original model's files: ``ChatterboxTTS.from_local``'s layout."""
    from safetensors.torch import save_file

    from chatterbox.models.tokenizers import EnTokenizer

    from .engine.model import ChatterboxModel

    ve, t3, s3gen = build_voice_encoder(sizes), build_t3(sizes), build_s3gen(sizes)
    spread_weights(t3)
    for module in (ve, t3, s3gen):
        module.eval()
    save_file(state_dict_to_save(ve), str(directory / "ve.safetensors"))
    save_file(state_dict_to_save(t3), str(directory / "t3_cfg.safetensors"))
    save_file(state_dict_to_save(s3gen), str(directory / "s3gen.safetensors"))
    write_tokenizer(directory / "tokenizer.json")
    sizes.save(directory)
    model = ChatterboxModel(variant="original", device="cpu", t3=t3, s3gen=s3gen, voice_encoder=ve,
                            tokenizer=EnTokenizer(str(directory / "tokenizer.json")),
                            builtin_voice=None, signature="", sizes=sizes,
                            source=WeightSource(directory, "model_dir"))
    save_builtin_voice(model, directory, seed=seed)


def save_builtin_voice(model, directory: Path, *, seed: int, exaggeration: float = 0.5) -> None:
    """``conds.pt``, the built-in voice, made exactly as uploaded voices are."""
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import Conditionals

    from .engine.conditionals import build_conditionals

    voice = build_conditionals(model, [synthetic_reference(seed=seed)])
    Conditionals(
        T3Cond(speaker_emb=voice.speaker_emb, cond_prompt_speech_tokens=voice.cond_prompt_speech_tokens,
               emotion_adv=exaggeration * torch.ones(1, 1, 1)),
        {"prompt_token": voice.prompt_token, "prompt_token_len": voice.prompt_token_len,
         "prompt_feat": voice.prompt_feat, "prompt_feat_len": None, "embedding": voice.embedding},
    ).save(directory / "conds.pt")


# Variant name -> writer(directory, seed=, sizes=): the variant's files, random weights.
def write_multilingual(directory: Path, *, seed: int, sizes: ModelSizes) -> None:
    from .tiny_multilingual import write_multilingual_checkpoint

    write_multilingual_checkpoint(directory, seed=seed, sizes=sizes)


def _write_turbo(directory: Path, *, seed: int, sizes: ModelSizes) -> None:
    from .tiny_turbo import write_checkpoint as write_turbo

    write_turbo(directory, seed=seed, sizes=sizes)


WRITERS = {"original": write_original, "multilingual": write_multilingual, "turbo": _write_turbo}


def spread_weights(module: torch.nn.Module, gain: float = 2.0) -> None:
    """Re-draw matrix weights with variance ~ gain²/fan_in.

    Upstream's default init (std 0.02) leaves a random T3 nearly blind to its
    context: attention is uniform and the residual stream carries only the last
    token, so text, voice, guidance and exaggeration barely change what it
    samples. Variance-scaled weights make decoding depend on every input, as a
    trained model's does, so tests can tell when a parameter is ignored.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "norm" not in name:
                param.normal_(0.0, gain / param.shape[-1] ** 0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--variant", default="original", choices=sorted(WRITERS))
    args = parser.parse_args(argv)
    from .engine.quiet import filter_third_party_warnings

    filter_third_party_warnings()  # as the worker does: upstream's import-time warnings
    started = time.perf_counter()
    sizes = TINY if args.size == "tiny" else ModelSizes()
    write_checkpoint(args.directory, seed=args.seed, sizes=sizes, variant=args.variant)
    total = sum(p.stat().st_size for p in args.directory.iterdir())
    print(json.dumps({"directory": str(args.directory), "size": args.size, "seed": args.seed,
                      "bytes": total, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Random-weights Chatterbox Turbo checkpoints in the real file layout, for tests and benchmarks.

``python -m chatterbox_worker.tiny_model DIR --variant turbo`` lands here. It
writes what ``ResembleAI/chatterbox-turbo`` holds: ``ve.safetensors``,
``t3_turbo_v1.safetensors`` (a GPT-2 T3), ``s3gen_meanflow.safetensors``, a
GPT-2 byte-level BPE tokenizer in the files ``AutoTokenizer`` reads offline
(``vocab.json``, ``merges.txt``, ``added_tokens.json`` with the event tags,
``special_tokens_map.json``, ``tokenizer_config.json``) and a built-in voice
``conds.pt`` made by the code that makes uploaded Turbo voices.
"""

from __future__ import annotations

import json
from pathlib import Path

from .engine import turbo
from .engine.architecture import TINY, ModelSizes, build_s3gen, build_voice_encoder, state_dict_to_save

EOS = "<|endoftext|>"
BPE_VOCAB_SIZE = 1000
# What the tiny BPE learns its merges from: plain English and the words the
# tests speak, so text becomes a few dozen tokens, not one per byte.
CORPUS = (
    "Hello there, this is a parity check. The quick brown fox jumps over the lazy dog. "
    "Warming up. One, two, three. Streaming and one-shot takes of the same text sound the same. "
    "She laughed, sighed and cleared her throat before she spoke again. "
    "Good morning! How are you today? I am fine, thank you. What a wonderful day it is."
)


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE in GPT-2's file layout, with Turbo's event tags as added tokens."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 4, vocab_size=BPE_VOCAB_SIZE, min_frequency=1,
                            special_tokens=[EOS], show_progress=False)
    bpe.save_model(str(directory))
    first = len(json.loads((directory / "vocab.json").read_text()))
    added = {tag: first + i for i, tag in enumerate(turbo.EVENT_TAGS)}
    assert max(added.values()) < turbo.TEXT_VOCAB_SIZE
    (directory / "added_tokens.json").write_text(json.dumps(added, indent=1))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=1024,
                  add_prefix_space=False, add_bos_token=False, errors="replace")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def write_checkpoint(directory: Path, *, seed: int, sizes: ModelSizes = TINY) -> None:
    """Turbo's files with random weights (``tiny_model.WRITERS["turbo"]``)."""
    from safetensors.torch import save_file

    from .engine.model import ChatterboxModel
    from .engine.weights import WeightSource
    from .tiny_model import save_builtin_voice, spread_weights

    ve, t3 = build_voice_encoder(sizes), turbo.build_turbo_t3(sizes)
    s3gen = build_s3gen(sizes, meanflow=True)
    spread_weights(t3)
    for module in (ve, t3, s3gen):
        module.eval()
    save_file(state_dict_to_save(ve), str(directory / "ve.safetensors"))
    save_file(state_dict_to_save(t3), str(directory / turbo.T3_FILE))
    save_file(state_dict_to_save(s3gen), str(directory / turbo.S3GEN_FILE))
    write_tokenizer(directory)
    sizes.save(directory)
    tokenizer = turbo.load_tokenizer(directory)
    model = ChatterboxModel(variant="turbo", device="cpu", t3=t3, s3gen=s3gen, voice_encoder=ve,
                            tokenizer=tokenizer, builtin_voice=None, signature="", sizes=sizes,
                            source=WeightSource(directory, "model_dir"),
                            text_encoder=turbo.TurboText(tokenizer))
    # Upstream Turbo's generate runs with exaggeration 0 (its T3 has no such input).
    save_builtin_voice(model, directory, seed=seed, exaggeration=0.0)

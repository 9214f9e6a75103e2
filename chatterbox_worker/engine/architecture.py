"""Builds the upstream Chatterbox modules, at their real size or shrunk.

The real checkpoints are built with upstream's own constructors (``T3()``,
``S3Gen()``, ``VoiceEncoder()``). Test and benchmark checkpoints
(``chatterbox_worker.tiny_model``) may shrink the big parts; their sizes are
recorded beside the weights in ``SIZES_FILE`` so that the normal loader can
rebuild the same shapes. The classes are always upstream's: only widths,
depths and head counts change, never the code that runs.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch

SIZES_FILE = "worker_model_sizes.json"


@dataclass(frozen=True)
class ModelSizes:
    """Widths and depths of the shrinkable parts; the defaults are the released model's."""

    t3_hidden: int = 1024
    t3_layers: int = 30
    t3_heads: int = 16
    t3_intermediate: int = 4096
    perceiver_heads: int = 4
    tokenizer_state: int = 1280
    tokenizer_layers: int = 6
    flow_width: int = 512
    flow_heads: int = 8
    flow_linear_units: int = 2048
    flow_blocks: int = 6
    decoder_channels: int = 256
    decoder_blocks: int = 4
    decoder_mid_blocks: int = 12
    decoder_heads: int = 8
    hift_channels: int = 512
    f0_channels: int = 512

    @property
    def is_released(self) -> bool:
        return self == ModelSizes()

    def save(self, directory: Path) -> None:
        if not self.is_released:
            (Path(directory) / SIZES_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> "ModelSizes":
        """Sizes recorded in ``directory``, or the released model's when none are."""
        path = Path(directory) / SIZES_FILE
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{SIZES_FILE} has unknown keys: {sorted(unknown)}")
        return cls(**data)


TINY = ModelSizes(
    t3_hidden=64, t3_layers=2, t3_heads=2, t3_intermediate=128, perceiver_heads=2,
    tokenizer_state=128, tokenizer_layers=1,
    flow_width=64, flow_heads=2, flow_linear_units=128, flow_blocks=1,
    decoder_channels=32, decoder_blocks=1, decoder_mid_blocks=1, decoder_heads=2,
    hift_channels=32, f0_channels=32,
)


@contextmanager
def skip_random_init() -> Iterator[None]:
    """Build modules without drawing their random initial weights: a checkpoint overwrites
    every one of them next (loaded strictly; S3Gen may miss only buffers computed from
    constants, which are not random). Drawing them was most of a load's time (released
    size, 2-core CPU: T3 3.3 s of 3.5 s, S3Gen 1.4 s of 1.9 s). Buffers computed in the
    constructors (mel filters, windows, rotary tables) are computed as before: only
    torch's and transformers' initialisers are skipped (transformers' ``no_init_weights``).
    Not for ``tiny_model``, whose random weights are the point."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield


def build_t3(sizes: ModelSizes, *, multilingual: bool = False):
    """T3 of the original model, or of the multilingual one (2454 text tokens, same backbone)."""
    from chatterbox.models.t3 import T3
    from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
    from chatterbox.models.t3.modules.perceiver import Perceiver
    from chatterbox.models.t3.modules.t3_config import T3Config

    hp = T3Config.multilingual() if multilingual else T3Config.english_only()
    if sizes.is_released:
        return T3(hp)
    # T3 reads its backbone shape from upstream's table by name; a shrunk
    # checkpoint gets an entry of its own, keyed by its sizes.
    name = f"worker_llama_{sizes.t3_hidden}x{sizes.t3_layers}x{sizes.t3_heads}"
    LLAMA_CONFIGS.setdefault(name, dict(
        LLAMA_CONFIGS["Llama_520M"],
        hidden_size=sizes.t3_hidden, intermediate_size=sizes.t3_intermediate,
        num_hidden_layers=sizes.t3_layers, num_attention_heads=sizes.t3_heads,
        num_key_value_heads=sizes.t3_heads, head_dim=sizes.t3_hidden // sizes.t3_heads,
    ))
    hp.llama_config_name = name
    t3 = T3(hp)
    # Upstream hard-codes the perceiver 1024 wide.
    t3.cond_enc.perceiver = Perceiver(32, sizes.t3_hidden, sizes.t3_hidden, sizes.perceiver_heads)
    return t3


def _fit_speech_tokenizer(tokenizer, sizes: ModelSizes):
    """Give a tokenizer built on the meta device real parts of the recorded size."""
    from chatterbox.models.s3tokenizer import S3Tokenizer

    if sizes.tokenizer_state == 1280 and sizes.tokenizer_layers == 6:
        return S3Tokenizer("speech_tokenizer_v2_25hz")
    from s3tokenizer.model import ModelConfig
    from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization

    # The audio encoder's attention head must stay 64 wide (its rotary tables).
    config = ModelConfig(n_audio_state=sizes.tokenizer_state,
                         n_audio_head=sizes.tokenizer_state // 64,
                         n_audio_layer=sizes.tokenizer_layers, n_codebook_size=3**8)
    tokenizer.config = config
    tokenizer.encoder = AudioEncoderV2(config.n_mels, config.n_audio_state, config.n_audio_head,
                                       config.n_audio_layer, 2, config.use_sdpa)
    tokenizer.quantizer = FSQVectorQuantization(config.n_audio_state, config.n_codebook_size)
    # Computed at construction, not stored in checkpoints (upstream builds the
    # mel filters on the CPU even under the meta device; the window it does not).
    tokenizer.register_buffer("window", torch.hann_window(tokenizer.n_fft))
    return tokenizer


def build_s3gen(sizes: ModelSizes, *, meanflow: bool = False):
    """S3Gen at ``sizes``; ``meanflow`` is Turbo's distilled vocoder (its estimator also reads the end time)."""
    from chatterbox.models.s3gen import S3Gen

    if sizes.is_released:
        return S3Gen(meanflow=meanflow)
    from chatterbox.models.s3gen.configs import CFM_PARAMS
    from chatterbox.models.s3gen.decoder import ConditionalDecoder
    from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
    from chatterbox.models.s3gen.flow import CausalMaskedDiffWithXvec
    from chatterbox.models.s3gen.flow_matching import CausalConditionalCFM
    from chatterbox.models.s3gen.hifigan import HiFTGenerator
    from chatterbox.models.s3gen.transformer.upsample_encoder import (
        PreLookaheadLayer, Upsample1D, UpsampleConformerEncoder)

    # Build the released module graph on the meta device (no memory, no init
    # cost), then swap in shrunk versions of every sized part. What is left
    # unswapped keeps upstream's size and is materialised below.
    with torch.device("meta"):
        s3gen = S3Gen(meanflow=meanflow)
    s3gen.tokenizer = _fit_speech_tokenizer(s3gen.tokenizer, sizes)
    width = sizes.flow_width
    encoder = UpsampleConformerEncoder(
        output_size=width, attention_heads=sizes.flow_heads,
        linear_units=sizes.flow_linear_units, num_blocks=sizes.flow_blocks, dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True,
        input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn", input_size=width, use_cnn_module=False,
        macaron_style=False)
    # Upstream hard-codes these two 512 wide.
    encoder.pre_lookahead_layer = PreLookaheadLayer(channels=width, pre_lookahead_len=3)
    encoder.up_layer = Upsample1D(channels=width, out_channels=width, stride=2)
    estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, channels=[sizes.decoder_channels],
        dropout=0.0, attention_head_dim=64, n_blocks=sizes.decoder_blocks,
        num_mid_blocks=sizes.decoder_mid_blocks, num_heads=sizes.decoder_heads, act_fn="gelu",
        meanflow=meanflow)
    decoder = CausalConditionalCFM(spk_emb_dim=80, cfm_params=CFM_PARAMS, estimator=estimator)
    s3gen.flow = CausalMaskedDiffWithXvec(input_size=width, encoder=encoder, decoder=decoder)
    s3gen.mel2wav = HiFTGenerator(
        sampling_rate=24000, base_channels=sizes.hift_channels, upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7], source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
        f0_predictor=ConvRNNF0Predictor(cond_channels=sizes.f0_channels))
    _materialise_meta(s3gen)
    return s3gen


def _materialise_meta(module: torch.nn.Module) -> None:
    """Give real storage to parameters and buffers still on the meta device.

    Only the speaker encoder (CAMPPlus) and fixed buffers are left there; they
    keep upstream's size. Weights are overwritten by the checkpoint; buffers
    that upstream computes at construction (``trim_fade``) are rebuilt.
    """
    from chatterbox.models.s3gen.xvector import CAMPPlus

    if any(p.is_meta for p in module.speaker_encoder.parameters()):
        module.speaker_encoder = CAMPPlus(memory_efficient=False)
    n_trim = 24000 // 50
    trim_fade = torch.zeros(2 * n_trim)
    trim_fade[n_trim:] = (torch.cos(torch.linspace(torch.pi, 0, n_trim)) + 1) / 2
    module.register_buffer("trim_fade", trim_fade, persistent=False)
    leftover = [name for name, t in list(module.named_parameters()) + list(module.named_buffers())
                if t.is_meta]
    if leftover:
        raise RuntimeError(f"unsized parts left on the meta device: {leftover[:5]}")


def build_voice_encoder(sizes: ModelSizes):
    from chatterbox.models.voice_encoder import VoiceEncoder

    return VoiceEncoder()


def state_dict_to_save(module: torch.nn.Module) -> dict:
    """Contiguous, unshared tensors, as safetensors wants them."""
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def default_device(requested: str = "auto") -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


__all__ = ["ModelSizes", "TINY", "SIZES_FILE", "build_t3", "build_s3gen", "build_voice_encoder",
           "skip_random_init",
           "state_dict_to_save", "default_device"]

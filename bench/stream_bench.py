"""Streaming vs upstream: time to first audio, total time, real-time factor, closeness.

    python bench/stream_bench.py [--checkpoint DIR] [--tokens 250] [--out bench/results.json]

In one process on one machine, on one checkpoint (by default a random one of
the real model's size, built with ``tiny_model --size full``), with a 10 s
reference voice and the same number of speech tokens forced on every side
(a random T3 does not stop by itself; upstream's generate is capped by
wrapping T3.inference, ours by the token budget):

- upstream ``ChatterboxTTS.generate`` (whole audio only);
- our one-shot synthesis (``stream: false``);
- our streaming synthesis: time to the first chunk and to the last.

Prints the ratios and writes them, with the machine named, as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatterbox_worker.engine.quiet import filter_third_party_warnings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_bench import machine, scratch_dir  # noqa: E402  (one description of the machine for both)

TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs all the way home "
        "across the fields, past the old mill and the river, before the sun goes down.")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    n = min(len(reference), len(other))
    return float(10 * np.log10(np.sum(reference[:n] ** 2) / np.sum((reference[:n] - other[:n]) ** 2)))


def log_mel_distance(a: np.ndarray, b: np.ndarray, sr: int = 24000) -> float:
    import librosa

    n = min(len(a), len(b))

    def mel(x):
        m = librosa.feature.melspectrogram(y=x[:n], sr=sr, n_fft=1024, hop_length=256, n_mels=80)
        return 10 * np.log10(np.maximum(m, 1e-5))
    return float(np.mean(np.abs(mel(a) - mel(b))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=250, help="speech tokens (25 = 1 s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results.json"))
    parser.add_argument("--chunks", default=None, help="default: the worker's schedule")
    args = parser.parse_args()
    filter_third_party_warnings()

    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import ChatterboxTTS, Conditionals

    from chatterbox_worker.engine import SamplingParams, StreamSchedule, SynthesisRequest
    from chatterbox_worker.engine.architecture import ModelSizes, default_device
    from chatterbox_worker.engine.model import load_model
    from chatterbox_worker.engine.synthesis import Engine
    from chatterbox_worker.engine.weights import WeightSource
    from chatterbox_worker.tiny_model import synthetic_reference, write_checkpoint

    device = default_device(args.device)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = scratch_dir("cbw-full-")
        started = time.perf_counter()
        write_checkpoint(checkpoint, seed=0, sizes=ModelSizes())
        print(f"built full-size random checkpoint in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    model = load_model(WeightSource(checkpoint, "model_dir"), variant="original", device=device)
    engine = Engine(model, watermark=False)  # watermark off on our side and upstream's (below)
    voice = engine.voice_from_clips([synthetic_reference(seconds=10.0, seed=1)])
    seed = 1234
    n = args.tokens

    # --- upstream -------------------------------------------------------
    t3_cond, gen = voice.for_request(0.5)
    tts = ChatterboxTTS(model.t3, model.s3gen, model.voice_encoder, model.tokenizer, device,
                        conds=Conditionals(T3Cond(speaker_emb=t3_cond.speaker_emb,
                                                  cond_prompt_speech_tokens=t3_cond.cond_prompt_speech_tokens,
                                                  emotion_adv=t3_cond.emotion_adv), copy.deepcopy(gen)))
    tts.watermarker.apply_watermark = lambda wav, sample_rate: wav  # same work on both sides
    t3_inference = model.t3.inference
    cap = {"tokens": 10}
    model.t3.inference = lambda **kw: t3_inference(**{**kw, "max_new_tokens": cap["tokens"]})
    with contextlib.redirect_stdout(sys.stderr):
        tts.generate("Warm up.")  # first-call costs out of the measurement
        engine.synthesize(SynthesisRequest(text="Warm up.", voice=voice, seed=0), max_tokens=10)
        cap["tokens"] = n
        torch.manual_seed(seed)
        sync(device)
        started = time.perf_counter()
        upstream_audio = tts.generate(TEXT).squeeze(0).numpy()
        sync(device)
        upstream_s = time.perf_counter() - started
    del model.t3.inference

    # --- ours -----------------------------------------------------------
    request = SynthesisRequest(text=TEXT, voice=voice, seed=seed, sampling=SamplingParams())
    schedule = StreamSchedule()
    if args.chunks:
        schedule = StreamSchedule(chunk_tokens=tuple(int(c) for c in args.chunks.split(",")))
    sync(device)
    started = time.perf_counter()
    one_shot = engine.synthesize(request, max_tokens=n)
    sync(device)
    one_shot_s = time.perf_counter() - started

    chunks, first_s = [], None
    started = time.perf_counter()
    for chunk in engine.stream(request, schedule=schedule, max_tokens=n):
        sync(device)
        if first_s is None:
            first_s = time.perf_counter() - started
        chunks.append(chunk)
    stream_s = time.perf_counter() - started
    streamed = np.concatenate(chunks)

    seconds = len(one_shot.audio) / 24000
    result = {
        "machine": machine(), "device": device, "checkpoint": "random, " + ("released size" if model.sizes.is_released else "shrunk (tiny)"),
        "speech_tokens": n, "audio_s": round(seconds, 2),
        "upstream_audio_s": round(len(upstream_audio) / 24000, 2),
        "schedule": {"chunk_tokens": schedule.chunk_tokens,
                     "left_context_tokens": schedule.left_context_tokens,
                     "prompt_tokens": schedule.prompt_tokens},
        "upstream_total_s": round(upstream_s, 2),
        "ours_one_shot_total_s": round(one_shot_s, 2),
        "ours_stream_ttfa_s": round(first_s, 2), "ours_stream_total_s": round(stream_s, 2),
        "ours_stream_chunks": len(chunks),
        "ratio_ttfa_to_upstream_total": round(first_s / upstream_s, 3),
        "ratio_stream_total_to_upstream_total": round(stream_s / upstream_s, 3),
        "ratio_one_shot_total_to_upstream_total": round(one_shot_s / upstream_s, 3),
        "rtf_upstream": round(upstream_s / seconds, 2), "rtf_stream": round(stream_s / seconds, 2),
        "rtf_one_shot": round(one_shot_s / seconds, 2),
        "stream_vs_one_shot_snr_db": round(snr_db(one_shot.audio, streamed), 2),
        "stream_vs_one_shot_log_mel_db": round(log_mel_distance(one_shot.audio, streamed), 3),
        "stream_len_minus_one_shot_len": int(len(streamed) - len(one_shot.audio)),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a streamed job's time goes on one device: T3 decode vs each vocoder call.

    python bench/gpu/stream_profile.py --checkpoint DIR [--device cuda] [--tokens 250]

The first GPU run (bench/RESULTS.md) found a streamed job's first chunk
1.7 s after its start on an H100 while decoding all 250 tokens took ~1 s:
this splits that time. For the same tokens it times, with the device
synchronised around each call: the decode; every chunk of the streaming
vocoder, twice over (a second pass over the same chunk shapes shows what is
a first-call cost per shape, e.g. cuDNN picking kernels); the one-shot
vocoder; and the stream again with cuDNN off. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import SynthesisRequest, load_engine
    from chatterbox_worker.engine.vocoder import StreamingVocoder, StreamSchedule, vocode_whole

    engine = load_engine(load_settings({
        "CHATTERBOX_MODEL_DIR": str(args.checkpoint), "CHATTERBOX_DEVICE": args.device,
        "CHATTERBOX_DTYPE": args.dtype, "CHATTERBOX_WATERMARK": "0", "CHATTERBOX_WARMUP": "1"}))
    device = engine.model.device

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    voice = engine.builtin_voice
    request = SynthesisRequest(text="The quick brown fox jumps over the lazy dog, and then it "
                               "runs all the way home across the fields.", voice=voice, seed=7)
    result = {"device": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else "cpu",
              "torch": torch.__version__, "decoder": engine.decoder_kind,
              "cudnn_benchmark": torch.backends.cudnn.benchmark}

    def decode():
        sync()
        started = time.perf_counter()
        tokens = list(engine.speech_tokens(request, request.text, engine.new_generator(7),
                                           args.tokens))
        sync()
        return tokens, time.perf_counter() - started

    decode()
    tokens, result["decode_s"] = decode()
    result["decode_ms_per_token"] = round(1000 * result["decode_s"] / len(tokens), 2)

    def stream_pass():
        _, gen = voice.for_request(0.5)
        vocoder = StreamingVocoder(engine.model, gen, seed=7, schedule=StreamSchedule())
        calls = []
        for index, token in enumerate(tokens):
            sync()
            started = time.perf_counter()
            audio = vocoder.push([token])
            sync()
            if audio is not None:
                calls.append({"after_token": index + 1, "s": round(time.perf_counter() - started, 4)})
        sync()
        started = time.perf_counter()
        vocoder.finish()
        sync()
        calls.append({"finish": True, "s": round(time.perf_counter() - started, 4)})
        return calls

    result["stream_first_pass"] = stream_pass()
    result["stream_second_pass"] = stream_pass()

    def one_shot():
        _, gen = voice.for_request(0.5)
        sync()
        started = time.perf_counter()
        vocode_whole(engine.model, tokens, gen, seed=7)
        sync()
        return round(time.perf_counter() - started, 4)

    result["one_shot_vocoder_s"] = [one_shot(), one_shot()]
    torch.backends.cudnn.enabled = False
    result["stream_cudnn_off"] = stream_pass()
    result["one_shot_vocoder_cudnn_off_s"] = one_shot()
    torch.backends.cudnn.enabled = True
    if str(device).startswith("cuda"):
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)

    # Where one streamed chunk's time goes, by operator (second pass: warm).
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(device).startswith("cuda") else [])
    with profile(activities=activities) as prof:
        stream_pass()
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(json.dumps(result, indent=1))
    print(table, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

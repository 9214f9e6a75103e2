"""The vocoder's flow solve under CUDA graphs vs eager, on one device: same mels? how fast?

    python bench/gpu/vocoder_graphs.py --checkpoint DIR [--device cuda] [--out FILE.json]

For vocoder calls of the worker's own shapes (a streamed first chunk, a later
chunk, a one-shot take of 250 tokens), each with 1, 8 and 32 rows, it runs
``flow_mels_batch`` and ``vocode_batch`` eagerly and through ``FlowGraphs``
and reports: the largest difference of the mels (graphs pad each call to a
bucket, so rounding may differ; anything past ~1e-3 is a bug), the first
graphed call (warm-up and capture included) and the median seconds per call
of each, the device synchronised around every call. The mels are compared on
other inputs than the capture's (a value frozen at capture would show). On a CPU the buckets run
eagerly (``capture=False``): a check of this script, not a measurement.
Prints a markdown table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# Speech tokens per call: the default schedule's first chunk (8 + the 3-token look-ahead), its
# second (16 of left context + 32 + 3), a one-shot take; chunks carry the last 50 prompt tokens.
SHAPES = (("first chunk", 11), ("later chunk", 51), ("one-shot take", 250))
ROWS = (1, 8, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    deadline = time.time() + args.max_seconds

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine
    from chatterbox_worker.engine.flow_graphs import FlowGraphs
    from chatterbox_worker.engine.vocoder import (FLOW_STEPS, NoiseBank, Prompt, VocoderWork,
                                                  flow_mels_batch, vocode_batch)

    engine = load_engine(load_settings({
        "CHATTERBOX_MODEL_DIR": str(args.checkpoint), "CHATTERBOX_DEVICE": args.device,
        "CHATTERBOX_WATERMARK": "0", "CHATTERBOX_WARMUP": "1"}))
    model = engine.model
    cuda = str(model.device).startswith("cuda")
    # Every bucket made at its first use here (the worker waits for a second).
    graphs = FlowGraphs(model.s3gen.flow.decoder, meanflow=getattr(model.s3gen, "meanflow", False),
                        capture=cuda, capture_after=0)
    _, gen = engine.builtin_voice.for_request(0.5)

    def works(rows: int, n: int, prompt_tokens, seed: int = 0) -> list:
        out = []
        for row in range(rows):
            prompt = Prompt.from_gen(gen).last(prompt_tokens)
            g = torch.Generator().manual_seed(seed * 1000 + row)
            tokens = torch.randint(0, 6561, (1, n - row % 3), generator=g)  # lengths differ a little
            bank = NoiseBank(seed * 1000 + row, Prompt.from_gen(gen).feat.shape[1])
            noise = bank.for_span(prompt.feat.shape[1], 0, 2 * tokens.shape[1])
            out.append(VocoderWork(tokens, prompt, noise, seed=row))
        return out

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        return result, time.perf_counter() - started

    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "flow_steps": FLOW_STEPS, "captured": cuda, "rows": []}
    for name, n in SHAPES:
        prompt_tokens = None if name == "one-shot take" else 50
        for rows in (int(r) for r in args.rows.split(",")):
            if time.time() > deadline:
                report.setdefault("skipped", []).append(f"{name} x{rows}: --max-seconds")
                continue
            captured_on = works(rows, n, prompt_tokens, seed=1)
            batch = works(rows, n, prompt_tokens, seed=2)  # other tokens and noise, same bucket
            with torch.inference_mode():
                timed(lambda: flow_mels_batch(model, captured_on))  # warm (cuDNN, allocator)
                _, first_s = timed(lambda: flow_mels_batch(model, captured_on, graphs=graphs))
                # Replayed on other inputs than those captured: a value frozen at capture shows.
                eager_mels = flow_mels_batch(model, batch)
                graphed_mels = flow_mels_batch(model, batch, graphs=graphs)
                difference = max(float((a - b).abs().max()) for a, b in zip(graphed_mels, eager_mels))
                eager_s = [timed(lambda: vocode_batch(model, batch))[1] for _ in range(args.repeats)]
                graphed_s = [timed(lambda: vocode_batch(model, batch, graphs=graphs))[1]
                             for _ in range(args.repeats)]
                flow_eager = [timed(lambda: flow_mels_batch(model, batch))[1] for _ in range(args.repeats)]
                flow_graphed = [timed(lambda: flow_mels_batch(model, batch, graphs=graphs))[1]
                                for _ in range(args.repeats)]
            row = {"call": name, "tokens": n, "rows": rows, "max_mel_difference": difference,
                   "first_graphed_flow_s": round(first_s, 4),
                   "flow_eager_s": round(statistics.median(flow_eager), 4),
                   "flow_graphed_s": round(statistics.median(flow_graphed), 4),
                   "call_eager_s": round(statistics.median(eager_s), 4),
                   "call_graphed_s": round(statistics.median(graphed_s), 4)}
            report["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report["graphs"] = {"captures": graphs.captures, "replays": graphs.replays, "eager": graphs.eager,
                        "enabled": graphs.enabled}
    report["watermark"] = watermark_seconds(str(model.device), timed)
    if cuda:
        report["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(f"Vocoder flow solve, CUDA graphs vs eager ({report['device']}, torch {report['torch']}, "
          f"{FLOW_STEPS} steps; seconds per call, device synchronised)\n")
    print("| call | rows | max mel difference | flow eager | flow graphed | x | whole call eager "
          "| whole call graphed | x | first graphed flow (capture) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in report["rows"]:
        print(f"| {r['call']} ({r['tokens']} tokens) | {r['rows']} | {r['max_mel_difference']:.2e} | "
              f"{r['flow_eager_s']:.3f} | {r['flow_graphed_s']:.3f} | "
              f"{r['flow_eager_s'] / r['flow_graphed_s']:.1f} | {r['call_eager_s']:.3f} | "
              f"{r['call_graphed_s']:.3f} | {r['call_eager_s'] / r['call_graphed_s']:.1f} | "
              f"{r['first_graphed_flow_s']:.3f} |")
    print(f"\ngraphs: {report['graphs']}; skipped: {report.get('skipped', [])}")
    print(f"Perth watermark, seconds per chunk of 1 s / 8 s of audio: {report['watermark']}")
    bad = [r for r in report["rows"] if not r["max_mel_difference"] < 1e-3]
    return 1 if bad or not graphs.enabled and cuda else 0


def watermark_seconds(device: str, timed) -> dict:
    """Perth's time per chunk on the CPU (upstream's place for it) and on ``device``."""
    import numpy as np

    from chatterbox_worker.engine.vocoder import Watermarker

    out = {}
    for where in dict.fromkeys(["cpu", device]):
        marker = Watermarker(True, device=where)
        for seconds in (1, 8):
            audio = (np.random.RandomState(seconds).randn(24000 * seconds) * 0.1).astype(np.float32)
            marker.apply(audio, 24000)  # warm
            out[f"{where}, {seconds} s"] = round(statistics.median(
                timed(lambda: marker.apply(audio, 24000))[1] for _ in range(3)), 4)
    return out


if __name__ == "__main__":
    sys.exit(main())

"""Four streamed jobs at once against the same four in sequence, on the tiny test checkpoint.

    python bench/concurrency_tiny.py [--jobs 4] [--repeats 3] [--append-results]

Issue 11's check through the real handler path (``JobRunner.run_async`` on
one event loop, ``MAX_CONCURRENCY`` = jobs, stream: true, wav, distinct
seeds, the checkpoint's built-in voice): the audio per wall second of the
jobs started together over the same jobs run one after another, each job's
first chunk as a share of its own total time, and whether each job's audio
is byte-identical to its audio alone. Run once per vocoder mode:
``off`` (each stream's vocoder calls alone: the exact path, bit for bit) and
``on`` (``CHATTERBOX_VOCODER_BATCH``: equal-shaped chunks of concurrent
streams in one flow call). Not a test: timings are printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput_bench import scratch_dir  # noqa: E402  (temporary folders removed at exit)

TEXT = "Streaming four jobs at once on one model, every chunk as soon as it is made."
RESULTS = Path(__file__).with_name("RESULTS.md")


async def one_job(runner, job, t0):
    first, digest = None, hashlib.sha256()
    last = None
    async for item in runner.run_async(job):
        if "audio_base64" in item:
            if first is None:
                first = time.perf_counter() - t0
            digest.update(base64.b64decode(item["audio_base64"]))
        last = item
    if not last or last.get("type") != "result":
        raise RuntimeError(f"job failed: {last}")
    return {"first_s": first, "done_s": time.perf_counter() - t0, "audio_s": last["duration_s"],
            "sha": digest.hexdigest()[:16]}


def measure(mode: str, checkpoint: Path, jobs: int, repeats: int) -> dict:
    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine
    from chatterbox_worker.jobs import JobRunner
    from chatterbox_worker.voices import VoiceStore

    env = {"CHATTERBOX_MODEL_DIR": str(checkpoint), "CHATTERBOX_DEVICE": "cpu",
           "CHATTERBOX_WATERMARK": "false", "MAX_CONCURRENCY": str(jobs),
           "CHATTERBOX_VOCODER_BATCH": mode, "VOICES_DIR": str(scratch_dir("cbw-voices-"))}
    settings = load_settings(env)
    engine = load_engine(settings)
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant=engine.model.variant, device=engine.model.device)
    runner = JobRunner(settings, engine, store)
    loop = asyncio.new_event_loop()
    job = lambda i: {"id": f"{mode}-{i}", "input": {"text": TEXT, "seed": 100 + i,  # noqa: E731
                                                  "stream": True, "format": "wav"}}

    async def sequence():
        t0 = time.perf_counter()
        out = [await one_job(runner, job(i), time.perf_counter()) for i in range(jobs)]
        return out, time.perf_counter() - t0

    async def together():
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one_job(runner, job(i), t0) for i in range(jobs)))
        return out, time.perf_counter() - t0

    loop.run_until_complete(one_job(runner, job(0), time.perf_counter()))  # warm
    rows = []
    for _ in range(repeats):
        alone, seq_s = loop.run_until_complete(sequence())
        both, tog_s = loop.run_until_complete(together())
        audio = sum(r["audio_s"] for r in alone)
        rows.append({
            "sequence_s": seq_s, "together_s": tog_s, "audio_s": audio,
            "speedup": seq_s / tog_s,
            "first_share_max": max(r["first_s"] / r["done_s"] for r in both),
            "first_s_max": max(r["first_s"] for r in both),
            "identical": all(a["sha"] == b["sha"] for a, b in zip(alone, both)),
        })
    loop.close()
    return {"mode": mode, "decoder": engine.decoder_kind, "vocoder_batching": engine.batch_vocoder,
            "flow_calls": engine.vocoder_calls.batches, "flow_rows": engine.vocoder_calls.rows, "rows": rows,
            "speedup_median": statistics.median(r["speedup"] for r in rows),
            "first_share_max": max(r["first_share_max"] for r in rows),
            "identical": all(r["identical"] for r in rows)}


def table(results, jobs, argv) -> str:
    lines = [f"### Tiny checkpoint, {jobs} streamed jobs together vs in sequence "
             f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)", "",
             f"`python bench/concurrency_tiny.py {' '.join(argv)}`", "",
             "| vocoder batching | speedup (median of runs) | per run | slowest first chunk / its total "
             "| byte-identical to alone | flow calls / chunks |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['mode']} ({r['decoder']} decoder) | **{r['speedup_median']:.2f}x** | "
                     + ", ".join(f"{row['speedup']:.2f}" for row in r["rows"])
                     + f" | {r['first_share_max']:.2f} | {'yes' if r['identical'] else 'no'} | "
                     f"{r['flow_calls']} / {r['flow_rows']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="off,on")
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args(argv)
    from chatterbox_worker.tiny_model import write_checkpoint

    checkpoint = write_checkpoint(scratch_dir("cbw-tiny-"), seed=0)
    results = [measure(mode, checkpoint, args.jobs, args.repeats) for mode in args.modes.split(",")]
    print(json.dumps(results, indent=1))
    text = table(results, args.jobs, argv)
    print(text)
    if args.append_results:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

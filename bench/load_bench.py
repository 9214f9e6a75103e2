"""Loading a checkpoint: upstream's ``from_local`` vs the worker's ``load_model``, each in a fresh process.

    python bench/load_bench.py --checkpoint DIR [--device cpu] [--repeats 3] [--append-results]

DIR is a checkpoint of the released size in upstream's layout (real weights,
or ``python -m chatterbox_worker.tiny_model DIR --size full``). Each side runs
in its own process, imports done before the clock starts, the sides taking
turns: upstream ``ChatterboxTTS.from_local`` (which also reads the built-in
voice), ours ``load_model`` as the worker calls it (modules built without
random initial weights), and ours drawing the random initial weights first,
as before (``skip_random_init`` off). Reports the median seconds and the
process's peak RSS; a model loaded is what a cold worker pays before its
warm-up, on top of starting Python and importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
SIDES = ("upstream", "ours", "ours, drawing random weights first")


def one_load(side: str, checkpoint: Path, device: str) -> dict:
    """Load once in this process; seconds and peak RSS."""
    sys.path.insert(0, str(ROOT))
    from chatterbox_worker.engine.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    import chatterbox.tts  # noqa: F401 - imported before the clock starts, as the worker does

    from chatterbox_worker.engine import architecture, model
    from chatterbox_worker.engine.weights import WeightSource

    if side == SIDES[2]:
        for module in (architecture, model):
            module.skip_random_init = contextlib.nullcontext
    started = time.perf_counter()
    if side == "upstream":
        from chatterbox.tts import ChatterboxTTS

        with contextlib.redirect_stdout(sys.stderr):
            ChatterboxTTS.from_local(checkpoint, device)
    else:
        model.load_model(WeightSource(checkpoint, "model_dir"), variant="original", device=device)
    seconds = time.perf_counter() - started
    return {"side": side, "seconds": round(seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--append-results", action="store_true")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # one load, in a child process
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(one_load(args.side, args.checkpoint, args.device)))
        return 0

    runs = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            out = subprocess.run([sys.executable, __file__, "--checkpoint", str(args.checkpoint),
                                  "--device", args.device, "--side", side],
                                 check=True, capture_output=True, text=True, env=dict(os.environ))
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["seconds"] for r in runs["upstream"])
    command = " ".join(["python bench/load_bench.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"### Model load, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"device {args.device} ({time.strftime('%Y-%m-%d')})", "",
             f"`{command}` (released-size checkpoint; each load in a fresh process, imports first)", "",
             "| side | median s | per run | x upstream | peak RSS MB |", "| --- | ---: | --- | ---: | ---: |"]
    for side in SIDES:
        seconds = [r["seconds"] for r in runs[side]]
        median = statistics.median(seconds)
        lines.append(f"| {side} | {median:.2f} | {', '.join(f'{s:.2f}' for s in seconds)} | "
                     f"{median / base:.2f} | {max(r['peak_rss_mb'] for r in runs[side])} |")
    text = "\n".join(lines)
    print(text)
    if args.append_results:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

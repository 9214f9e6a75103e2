"""How many torch operations one vocoder call runs, by stage: what a GPU pays in launches.

    python bench/vocoder_ops.py --checkpoint DIR [--tokens 51] [--prompt-tokens 50]

Counts every operation torch dispatches (a dispatch mode, on the CPU) in one
call of a streamed chunk's shape: the flow's encoder and the rest of
``flow_mels_batch``, its solve (``flow.flow_solve``, what ``FlowGraphs``
replays from one CUDA graph), and HiFT. On a GPU nearly every operation is a
kernel launch, and a call that launches thousands of small kernels is bound
by the host, not the device. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=51, help="speech tokens of the call "
                        "(51: the default schedule's second chunk with its left context)")
    parser.add_argument("--prompt-tokens", type=int, default=50)
    args = parser.parse_args()

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine
    from chatterbox_worker.engine import vocoder
    from chatterbox_worker.engine.hift import hift

    engine = load_engine(load_settings({"CHATTERBOX_MODEL_DIR": str(args.checkpoint),
                                        "CHATTERBOX_DEVICE": "cpu", "CHATTERBOX_WATERMARK": "0",
                                        "CHATTERBOX_WARMUP": "0"}))
    model = engine.model
    _, gen = engine.builtin_voice.for_request(0.5)
    prompt = vocoder.Prompt.from_gen(gen).last(args.prompt_tokens)
    tokens = torch.randint(0, vocoder.SPEECH_VOCAB_SIZE, (1, args.tokens),
                           generator=torch.Generator().manual_seed(0))
    bank = vocoder.NoiseBank(1, vocoder.Prompt.from_gen(gen).feat.shape[1])
    work = vocoder.VocoderWork(tokens, prompt, bank.for_span(prompt.feat.shape[1], 0, 2 * args.tokens))

    counts = {}
    solve = vocoder.flow_solve

    def counted_solve(*a, **k):
        with Count() as c:
            out = solve(*a, **k)
        counts["flow solve"] = c.n
        return out

    vocoder.flow_solve = counted_solve
    with torch.inference_mode():
        with Count() as whole:
            [mels] = vocoder.flow_mels_batch(model, [work], engine.flow_steps)
        with Count() as vocode:
            hift(model, mels, None, seed=1)
    counts["encoder and the rest of the flow call"] = whole.n - counts["flow solve"]
    counts["HiFT"] = vocode.n
    counts["whole call"] = whole.n + vocode.n
    print(json.dumps({"checkpoint": model.describe()["size"], "tokens": args.tokens,
                      "prompt_tokens": args.prompt_tokens, "flow_steps": engine.flow_steps,
                      "operations": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""T3's static-cache decoders with CUDA graphs vs eager, on one device: same logits? how fast?

    python bench/gpu/decoder_graphs.py --checkpoint DIR [--turbo-checkpoint DIR] [--device cuda]

For the original model's ``FastDecoder`` (DIR) and, given a Turbo
checkpoint, Turbo's ``TurboFastDecoder``, it decodes the same seeded
requests (1 alone, then 4 joining at different steps) with CUDA graphs and
without, and reports the largest difference between the logits each draw
came from, whether the tokens are the same, and ms per step each way. Both
runs use the model's own format (bfloat16 on CUDA). On a CPU both runs are
eager (a check of this script). Prints one JSON object per line, then a
summary; exit 1 if the logits part by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TEXTS = ("The quick brown fox jumps over the lazy dog.", "A second request joins a little later.",
         "Short one.", "And a fourth, with a longer sentence to say than the others have.")


def decode(decoder_cls, t3, requests, *, graphs: bool, joins) -> dict:
    """Tokens and per-draw logits of ``requests`` (made fresh by the factory) on one decoder."""
    logits = {}

    class Recording(decoder_cls):
        def _sample(self, n):
            for i, slot in enumerate(self._slots[:n]):
                logits.setdefault(id(slot.request), []).append(self.logits[self._rows(i, i + 1)].float().cpu())
            return super()._sample(n)

    made = requests()
    decoder = Recording(t3, slots=len(made), cuda_graphs=graphs)
    tokens = {id(r): [] for r in made}
    steps, started = 0, None
    while steps < 2000:
        for i in joins.get(steps, []):
            decoder.add(made[i])
        if steps == 1:  # the first step's captures are not timed
            if t3.speech_emb.weight.is_cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        events = decoder.step()
        for event in events:
            if event.token is not None:
                tokens[id(event.request)].append(event.token)
        steps += 1
        if not len(decoder) and steps > max(joins):
            break
    if t3.speech_emb.weight.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    order = [id(r) for r in made]
    return {"tokens": [tokens[k] for k in order], "logits": [logits.get(k, []) for k in order],
            "ms_per_step": 1000 * elapsed / max(steps - 1, 1), "graphs_captured": decoder.graphs}


def compare(name, decoder_cls, engine, make_request, tolerance) -> list:
    rows = []
    t3 = engine.model.t3
    for label, count, joins in (("1 request", 1, {0: [0]}), ("4 requests joining", 4,
                                                              {0: [0, 1], 3: [2], 6: [3]})):
        def requests():
            return [make_request(TEXTS[i], seed=10 + i) for i in range(count)]

        eager = decode(decoder_cls, t3, requests, graphs=False, joins=joins)
        cuda = t3.speech_emb.weight.is_cuda
        graphed = decode(decoder_cls, t3, requests, graphs=cuda, joins=joins)
        difference = 0.0
        for a_list, b_list in zip(eager["logits"], graphed["logits"]):
            for a, b in zip(a_list, b_list):
                difference = max(difference, float((a - b).abs().max()))
        row = {"decoder": name, "case": label, "max_logit_difference": difference,
               "same_tokens": eager["tokens"] == graphed["tokens"],
               "eager_ms_per_step": round(eager["ms_per_step"], 2),
               "graphed_ms_per_step": round(graphed["ms_per_step"], 2),
               "graphs_captured": graphed["graphs_captured"], "ok": difference <= tolerance}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--turbo-checkpoint", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--budget", type=int, default=40, help="tokens per request")
    args = parser.parse_args()

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import load_engine, turbo
    from chatterbox_worker.engine.batch_decode import DecodeRequest
    from chatterbox_worker.engine.decode import SamplingParams, text_tokens_for
    from chatterbox_worker.engine.fast_decode import FastDecoder
    from chatterbox_worker.engine.turbo_fast import TurboFastDecoder

    def engine_for(checkpoint: Path, variant: str):
        return load_engine(load_settings({
            "CHATTERBOX_MODEL_DIR": str(checkpoint), "CHATTERBOX_DEVICE": args.device,
            "CHATTERBOX_VARIANT": variant, "CHATTERBOX_WATERMARK": "0", "CHATTERBOX_WARMUP": "0"}))

    rows = []
    engine = engine_for(args.checkpoint, "original")

    def original_request(text, seed):
        t3_cond, _ = engine.builtin_voice.for_request(0.5)
        return DecodeRequest(t3_cond=t3_cond, text_tokens=text_tokens_for(engine.model, text),
                             params=SamplingParams(), max_new_tokens=args.budget,
                             generator=torch.Generator(device=engine.model.device).manual_seed(seed))

    rows += compare("FastDecoder (original)", FastDecoder, engine, original_request, args.tolerance)
    if args.turbo_checkpoint:
        turbo_engine = engine_for(args.turbo_checkpoint, "turbo")

        def turbo_request(text, seed):
            t3_cond, _ = turbo_engine.builtin_voice.for_request(0.0)
            params = SamplingParams(temperature=0.8, top_p=0.95, top_k=1000, min_p=0.0,
                                    repetition_penalty=1.2, cfg_weight=0.0)
            return DecodeRequest(t3_cond=t3_cond,
                                 text_tokens=turbo.text_tokens(turbo_engine.model.tokenizer, text,
                                                               turbo_engine.model.device),
                                 params=params, max_new_tokens=args.budget,
                                 generator=torch.Generator(device=turbo_engine.model.device).manual_seed(seed))

        rows += compare("TurboFastDecoder (turbo)", TurboFastDecoder, turbo_engine, turbo_request,
                        args.tolerance)
    print("\n| decoder | case | max logit difference | same tokens | eager ms/step | graphed ms/step | graphs |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['decoder']} | {r['case']} | {r['max_logit_difference']:.3g} | {r['same_tokens']} | "
              f"{r['eager_ms_per_step']} | {r['graphed_ms_per_step']} | {r['graphs_captured']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

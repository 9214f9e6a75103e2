"""Each served model vs its upstream class: decode ms per token, time to first audio, real-time factor.

    python bench/variants_bench.py [--checkpoint-dir DIR] [--size full|tiny]
        [--variants original,multilingual,turbo] [--tokens 60] [--repeats 2]
        [--device auto|cpu|cuda] [--max-seconds S] [--out FILE] [--append-results]
    python bench/variants_bench.py --size tiny --tokens 12 --repeats 2   # a check of the script itself

One command, one process tree, one machine. For each variant
(``CHATTERBOX_VARIANT``) a random checkpoint in that variant's file layout,
built with ``python -m chatterbox_worker.tiny_model DIR --variant V --size
SIZE`` (``full``: the released sizes) or reused from ``--checkpoint-dir``, and
two subprocesses of this script, one after the other (``--side V --part
upstream``, then ``--part ours``), so that each side's warm state and peak
memory are its own. On that checkpoint, with its built-in voice
(``conds.pt``), the same fixed English text and the same number of speech
tokens on both sides:

1. upstream: the variant's class loaded by its own ``from_local``
   (``ChatterboxTTS``, ``ChatterboxMultilingualTTS`` with language "en",
   ``ChatterboxTurboTTS``) and its ``generate``, its defaults, watermark off.
   T3's call inside ``generate`` is capped at the token count and timed: decode
   ms per token = that call's time / tokens (prefill included);
2. ours: the worker's own path (``load_engine`` with ``CHATTERBOX_MODEL_DIR``
   and ``CHATTERBOX_VARIANT``, watermark off, S3Gen float32, the variant's
   upstream flow step count: 10, turbo 2): one-shot ``synthesize`` (decode ms
   per token from the decode of that take, and RTF), then a streamed take's
   time to its first chunk (TTFA). Upstream has no streaming: its time to
   first audio is its total.

Every side warms up first (a 10-token take), then runs ``--repeats`` timed repetitions
(seeds 1234, 1235, ...); the median is reported. On CUDA our warm-up decodes the
full token count, so that CUDA graph capture is not timed. RTF is wall seconds / audio
seconds (below 1 is faster than real time).

Fixed token count: a random T3 does not stop by itself, but it may draw its
stop token, and the multilingual one draws ids >= 6561 that 0.1.7's
multilingual ``generate`` hands to S3Gen (which fails). On both sides a
forward hook on T3's ``speech_head`` pushes the logits of every id >= 6561
(start, stop, unused) to -1e6 before any guidance or sampling, so each take
is exactly N speakable tokens (turbo adds upstream's 3 silence tokens on both
sides). The hook costs one (rows, vocab) add per step on both sides.

Multilingual's alignment analyzer (0.1.7 builds it in every ``T3.inference``
of a multilingual T3: eager attention with attention weights out of every
layer, hooks on 3 of them) runs on the full-size checkpoint and its cost is
measured; what it decides is discarded (its ``step`` runs on a copy of the
logits), so that a random model's chance repetition (two equal tokens in a
row make it force the stop token) cannot end a take early. How many steps it
would have forced the stop token on is reported. A tiny checkpoint has
too few layers for it (it hooks layers 9, 12 and 13): it is switched off there,
as the parity tests do, and the result says so.

Prints a table, writes JSON (default ``bench/results/variants-<device>-<date>.json``);
``--append-results`` appends the table with the machine, date and command to
bench/RESULTS.md. ``--max-seconds``: steps that would end later are skipped
and reported; a side still running at the limit is stopped.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from throughput_bench import TEXT, Side, machine, scratch_dir  # noqa: E402  (same text, same machine description)
from throughput_bench import run_side as throughput_run_side  # noqa: E402

VARIANTS = ("original", "multilingual", "turbo")
SEED = 1234
WARM_TOKENS = 10
SAMPLE_RATE = 24000
FIRST_SPECIAL_ID = 6561  # S3Gen's codebook size: every id from here on is not speech
SUPPRESSED = -1e6
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_HEADER = "## Each model vs its upstream class (`bench/variants_bench.py`)"
# Rough seconds to build a checkpoint and to load plus warm up one side, for the time guard.
BUILD_ESTIMATE_S = {"full": 60, "tiny": 10}


# ----------------------------------------------------------------------------
# inside a side: both sides of one variant


def suppress_special_ids(t3) -> None:
    """Every id >= 6561 pushed to -1e6 in T3's speech logits, wherever they are computed.

    A forward hook on ``speech_head`` covers upstream (``T3HuggingfaceBackend``,
    ``inference_turbo``) and our decoders that call the module; the exact
    batched decoder applies the head's weight itself (``BatchDecoder._linear``),
    so that is wrapped once per process to add the same mask."""
    import torch

    head = t3.speech_head
    vocab = t3.hp.speech_tokens_dict_size
    device = next(t3.parameters()).device
    masks = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # made before any CUDA graph capture
        mask = torch.zeros(vocab, dtype=dtype, device=device)
        mask[FIRST_SPECIAL_ID:] = SUPPRESSED
        masks[dtype] = mask

    def hook(module, inputs, output):
        return output + masks[output.dtype]

    head.register_forward_hook(hook)
    head._bench_masks = masks
    _wrap_batch_linear()


def _wrap_batch_linear() -> None:
    from chatterbox_worker.engine.batch_decode import BatchDecoder

    if getattr(BatchDecoder._linear, "_bench", False):
        return
    linear = BatchDecoder._linear

    def masked(self, x, module, groups):
        out = linear(self, x, module, groups)
        masks = getattr(module, "_bench_masks", None)
        return out if masks is None else out + masks[out.dtype]

    masked._bench = True
    BatchDecoder._linear = masked


def neutral_alignment_analyzer(result: dict) -> None:
    """0.1.7's AlignmentStreamAnalyzer runs every step (its cost counts) but its logits are
    discarded; how many steps it would have forced the stop token is counted."""
    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    step = AlignmentStreamAnalyzer.step
    seen = result.setdefault("alignment_analyzer", {"mode": "runs, its decisions discarded",
                                                    "steps": 0, "would_force_stop": 0})

    def observed(self, logits, next_token=None):
        decided = step(self, logits.clone(), next_token=next_token)
        seen["steps"] += 1
        if decided.argmax(dim=-1).eq(self.eos_idx).any() and decided.max() >= 2**15:
            seen["would_force_stop"] += 1
        return logits

    AlignmentStreamAnalyzer.step = observed


def load_upstream(variant: str, directory: Path, device: str):
    """The variant's upstream class, by its own ``from_local``; for a shrunk (tiny)
    checkpoint, the modules it builds by name are built at the checkpoint's sizes."""
    from chatterbox_worker.engine.architecture import ModelSizes, build_s3gen, build_t3

    sizes = ModelSizes.load(directory)
    if variant == "original":
        import chatterbox.tts as module
        cls = module.ChatterboxTTS
        if not sizes.is_released:
            module.T3 = lambda *a, **k: build_t3(sizes)
            module.S3Gen = lambda *a, **k: build_s3gen(sizes)
    elif variant == "multilingual":
        import chatterbox.mtl_tts as module
        cls = module.ChatterboxMultilingualTTS
        if not sizes.is_released:
            module.T3 = lambda *a, **k: build_t3(sizes, multilingual=True)
            module.S3Gen = lambda *a, **k: build_s3gen(sizes)
    else:
        import chatterbox.tts_turbo as module
        from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS

        from chatterbox_worker.engine.turbo import GPT2_RELEASED, build_turbo_t3

        cls = module.ChatterboxTurboTTS
        if not sizes.is_released:
            name = build_turbo_t3(sizes).hp.llama_config_name  # registers the shrunk config
            LLAMA_CONFIGS[GPT2_RELEASED] = LLAMA_CONFIGS[name]
            module.S3Gen = lambda meanflow=False: build_s3gen(sizes, meanflow=meanflow)
    return cls.from_local(directory, device), sizes


def median_of(reps: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in reps if r.get(key) is not None]
    return statistics.median(values) if values else None


def side_upstream(args, side: Side) -> None:
    import torch

    variant, device, n = args.side, args.device, args.tokens
    out = side.result.setdefault("upstream", {})
    started = time.perf_counter()
    tts, sizes = load_upstream(variant, args.checkpoint, device)
    out["class"] = type(tts).__name__
    out["load_s"] = round(time.perf_counter() - started, 2)
    tts.watermarker.apply_watermark = lambda wav, sample_rate: wav  # off, as ours
    suppress_special_ids(tts.t3)
    if variant == "multilingual":
        if sizes.is_released:
            neutral_alignment_analyzer(out)
        else:
            from chatterbox.models.t3.modules.t3_config import T3Config

            T3Config.is_multilingual = property(lambda self: False)
            out["alignment_analyzer"] = {"mode": "off: the tiny checkpoint lacks the layers it hooks"}

    # T3's call inside generate: capped at the token count, timed.
    cap = {"tokens": WARM_TOKENS}
    calls: List[dict] = []
    name = "inference_turbo" if variant == "turbo" else "inference"
    inference = getattr(tts.t3, name)

    def capped(**kwargs):
        if variant == "turbo":
            kwargs["max_gen_len"] = cap["tokens"] - 1  # it draws one token before its loop
        else:
            kwargs["max_new_tokens"] = cap["tokens"]
        side.sync()
        t0 = time.perf_counter()
        tokens = inference(**kwargs)
        side.sync()
        calls.append({"seconds": time.perf_counter() - t0, "tokens": int(tokens.shape[-1])})
        return tokens

    setattr(tts.t3, name, capped)
    pristine = copy.deepcopy(tts.conds)

    def generate(text: str):
        tts.conds = copy.deepcopy(pristine)
        if variant == "multilingual":
            return tts.generate(text, "en")
        return tts.generate(text)

    generate("Warm up.")
    side.sync()
    cap["tokens"] = n
    reps = []
    for i in side.repetitions(args.repeats, f"{variant} upstream generate"):
        calls.clear()
        torch.manual_seed(SEED + i)
        with side.stopwatch() as watch:
            wav = generate(TEXT)
        total = watch.seconds
        [call] = calls
        audio_s = wav.shape[-1] / SAMPLE_RATE
        reps.append({"seed": SEED + i, "total_s": round(total, 4), "audio_s": round(audio_s, 4),
                     "t3_s": round(call["seconds"], 4), "tokens": call["tokens"],
                     "ms_per_token": 1000 * call["seconds"] / max(call["tokens"], 1),
                     "rtf": total / audio_s})
        out["reps"] = reps
        side.memory(f"upstream repetition {i + 1}")
        side.emit()
    out.update({k: median_of(reps, k) for k in ("ms_per_token", "total_s", "audio_s", "rtf")})
    side.emit()


def side_ours(args, side: Side) -> None:
    variant, n = args.side, args.tokens
    out = side.result.setdefault("ours", {})
    env = dict(os.environ)
    env.update({"CHATTERBOX_MODEL_DIR": str(args.checkpoint), "CHATTERBOX_VARIANT": variant,
                "CHATTERBOX_DEVICE": args.device, "CHATTERBOX_WATERMARK": "false",
                "CHATTERBOX_WARMUP": "false",  # ours below, capped at WARM_TOKENS as upstream's
                "VOICES_DIR": str(scratch_dir("cbw-voices-")), "MAX_CONCURRENCY": "1"})
    if args.dtype:
        env["CHATTERBOX_DTYPE"] = args.dtype
    for name in ("CHATTERBOX_FLOW_STEPS", "CHATTERBOX_MTL_T3"):
        env.pop(name, None)  # the variant's own: upstream's flow steps, v2 T3 (what from_local loads)

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import SamplingParams, SynthesisRequest, load_engine
    from chatterbox_worker.engine.model import t3_format
    from chatterbox_worker.engine.text import split_text

    settings = load_settings(env)
    started = time.perf_counter()
    engine = load_engine(settings)
    out["load_s"] = round(time.perf_counter() - started, 2)
    out["model"] = engine.model.describe()
    out["engine"] = {"decoder": engine.decoder_kind, "flow_steps": engine.flow_steps,
                     "t3_format": t3_format(engine.model.t3), "cuda_graphs": engine.cuda_graphs}
    suppress_special_ids(engine.model.t3)
    pieces = split_text(TEXT, language="en")
    if len(pieces) != 1:
        raise RuntimeError(f"the bench text should be one piece for {variant}, got {len(pieces)}")

    decodes: List[dict] = []
    speech_tokens = engine.speech_tokens

    def timed(request, piece, generator, max_tokens=None):
        t0 = time.perf_counter()
        steps = speech_tokens(request, piece, generator, max_tokens)
        made = 0
        try:
            for token in steps:
                made += 1
                yield token
        finally:
            steps.close()
            side.sync()
            decodes.append({"seconds": time.perf_counter() - t0, "tokens": made})

    engine.speech_tokens = timed
    values = engine.variant.sampling({})  # the model's defaults, as the service fills them
    sampling = SamplingParams(**{k: values[k] for k in SamplingParams.__dataclass_fields__})
    exaggeration = 0.0 if variant == "turbo" else 0.5  # what upstream's generate uses by default

    def request(text: str, seed: int) -> SynthesisRequest:
        return SynthesisRequest(text=text, voice=engine.builtin_voice, seed=seed,
                                exaggeration=exaggeration, sampling=sampling, language="en")

    def first_chunk(req: SynthesisRequest, tokens: int):
        side.sync()
        t0 = time.perf_counter()
        chunks = engine.stream(req, max_tokens=tokens)
        try:
            chunk = next(chunks)
            side.sync()
            ttfa = time.perf_counter() - t0
            total = None
            if args.stream_total:
                for _ in chunks:
                    pass
                side.sync()
                total = time.perf_counter() - t0
        finally:
            chunks.close()
        return ttfa, len(chunk) / SAMPLE_RATE, total

    # With CUDA graphs a graph is captured per length bucket on first use: warm up at full length.
    warm = n if engine.cuda_graphs else WARM_TOKENS
    engine.synthesize(request(TEXT if engine.cuda_graphs else "Warm up.", 0), max_tokens=warm)
    first_chunk(request("Warm up.", 0), WARM_TOKENS)

    reps = []
    for i in side.repetitions(args.repeats, f"{variant} ours one-shot"):
        decodes.clear()
        with side.stopwatch() as watch:
            take = engine.synthesize(request(TEXT, SEED + i), max_tokens=n)
        total = watch.seconds
        [decode] = decodes
        audio_s = len(take.audio) / SAMPLE_RATE
        reps.append({"seed": SEED + i, "total_s": round(total, 4), "audio_s": round(audio_s, 4),
                     "t3_s": round(decode["seconds"], 4), "tokens": decode["tokens"],
                     "audio_tokens": take.audio_tokens,
                     "ms_per_token": 1000 * decode["seconds"] / max(decode["tokens"], 1),
                     "rtf": total / audio_s})
        out["one_shot_reps"] = reps
        side.memory(f"ours one-shot repetition {i + 1}")
        side.emit()
    out.update({k: median_of(reps, k) for k in ("ms_per_token", "total_s", "audio_s", "rtf")})
    side.emit()

    streams = []
    estimate = None if not reps else out["total_s"] * (1.2 if args.stream_total else 0.6)
    for i in side.repetitions(args.repeats, f"{variant} ours streamed", estimate):
        ttfa, chunk_s, total = first_chunk(request(TEXT, SEED + i), n)
        streams.append({"seed": SEED + i, "ttfa_s": round(ttfa, 4), "first_chunk_audio_s": round(chunk_s, 4),
                        "total_s": None if total is None else round(total, 4)})
        out["stream_reps"] = streams
        side.memory(f"ours streamed repetition {i + 1}")
        side.emit()
    out["ttfa_s"] = median_of(streams, "ttfa_s")
    out["stream_total_s"] = median_of(streams, "total_s")
    side.emit()


def side_main(args) -> int:
    side = Side(args.deadline, args.device)
    side.result.update({"variant": args.side, "part": args.part})
    try:
        from chatterbox_worker.engine.quiet import filter_third_party_warnings

        filter_third_party_warnings()
        (side_upstream if args.part == "upstream" else side_ours)(args, side)
    except Exception as exc:
        traceback.print_exc()
        side.result["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        side.emit()
        return 1
    side.result["done"] = True
    side.emit()
    # Everything is reported: leave without the interpreter's teardown (a full-size side
    # of chatterbox 0.1.7 was seen to abort in it, "terminate called without an active exception").
    sys.stderr.flush()
    atexit._run_exitfuncs()  # what this process registered (its scratch folders), then out
    os._exit(0)


# ----------------------------------------------------------------------------
# the orchestrator


def run_side(argv: List[str], env: dict, kill_at: Optional[float], name: str) -> dict:
    """One variant's subprocess to its end (or ``kill_at``): its last JSON snapshot."""
    result = throughput_run_side(argv, env, kill_at, name, script=Path(__file__).resolve(),
                                 tag="variants_bench")
    if result.get("returncode") and result.get("done") and "exited with status" in result.get("error", ""):
        # Everything was reported; the crash came on the way out.
        del result["error"]
        result["exit_note"] = f"exited with status {result['returncode']} after its last report"
    return result


def build_checkpoint(variant: str, size: str, directory: Path) -> dict:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "chatterbox_worker.tiny_model", str(directory),
                           "--variant", variant, "--size", size], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"tiny_model --variant {variant} --size {size} failed: {done.stderr[-800:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    info["seconds"] = round(time.time() - started, 1)
    return info


def checkpoint_ready(directory: Path, variant: str) -> bool:
    from chatterbox_worker.engine.variants import weight_files

    return directory.is_dir() and all((directory / f).exists() for f in weight_files(variant)) \
        and (directory / "conds.pt").exists()


def ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def summarise(report: dict) -> list:
    rows = []
    for variant in report["variants"]:
        parts = report["sides"].get(variant) or {}
        up_side, ours_side = parts.get("upstream") or {}, parts.get("ours") or {}
        up, ours = up_side.get("upstream") or {}, ours_side.get("ours") or {}
        errors = [s.get("error") or s.get("killed") for s in (parts, up_side, ours_side)]
        rows.append({
            "variant": variant, "error": "; ".join(e for e in errors if e) or None,
            "upstream_class": up.get("class"),
            "upstream_ms_per_token": up.get("ms_per_token"), "ours_ms_per_token": ours.get("ms_per_token"),
            "ms_per_token_ratio": ratio(ours.get("ms_per_token"), up.get("ms_per_token")),
            "upstream_total_s": up.get("total_s"), "ours_one_shot_total_s": ours.get("total_s"),
            "one_shot_total_ratio": ratio(ours.get("total_s"), up.get("total_s")),
            "upstream_rtf": up.get("rtf"), "ours_rtf": ours.get("rtf"),
            "ours_ttfa_s": ours.get("ttfa_s"),
            "ttfa_ratio_to_upstream_total": ratio(ours.get("ttfa_s"), up.get("total_s")),
            "ours_stream_total_s": ours.get("stream_total_s"),
            "upstream_audio_s": up.get("audio_s"), "ours_audio_s": ours.get("audio_s"),
            "repeats": [len(up.get("reps") or []), len(ours.get("one_shot_reps") or []),
                        len(ours.get("stream_reps") or [])],
            "ours_engine": ours.get("engine"), "alignment_analyzer": up.get("alignment_analyzer"),
            "peak_rss_mb": [up_side.get("peak_rss_mb"), ours_side.get("peak_rss_mb")],
            "peak_gpu_mb": [up_side.get("peak_gpu_mb"), ours_side.get("peak_gpu_mb")],
        })
    return rows


def f(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m.get('gpu') or 'no GPU'}; CPU {m['cpu']}, {m['cores']} cores; torch "
             f"{m.get('torch')}; device {report['device']}; checkpoints {report['checkpoint_kind']}; "
             f"{report['tokens']} speech tokens per take on both sides; text of {len(TEXT)} "
             f"characters, one piece; median of {report['repeats']} repetitions after a warm-up. "
             f"RTF = wall s / audio s.",
             "",
             "| variant | upstream ms/token | ours ms/token | ratio | upstream RTF | ours RTF | "
             "ours TTFA streamed s | ours TTFA / upstream total |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["summary"]:
        name = f"{row['variant']} (`{row['upstream_class']}`)" if row["upstream_class"] else row["variant"]
        if row["error"] and row["ours_ttfa_s"] is None:
            name += f" (incomplete: {str(row['error'])[:120]})"
        lines.append(f"| {name} | {f(row['upstream_ms_per_token'], 1)} | {f(row['ours_ms_per_token'], 1)} | "
                     f"{f(row['ms_per_token_ratio'], 3)} | {f(row['upstream_rtf'])} | {f(row['ours_rtf'])} | "
                     f"{f(row['ours_ttfa_s'])} | {f(row['ttfa_ratio_to_upstream_total'], 3)} |")
    lines += ["", "| variant | upstream total s | ours one-shot total s | ratio | "
              "audio s (upstream / ours) | "
              "ours decoder, T3 format, flow steps | peak RSS MB (upstream / ours) |",
              "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for row in report["summary"]:
        e = row["ours_engine"] or {}
        lines.append(f"| {row['variant']} | {f(row['upstream_total_s'])} | "
                     f"{f(row['ours_one_shot_total_s'])} | {f(row['one_shot_total_ratio'], 3)} | "
                     f"{f(row['upstream_audio_s'])} / {f(row['ours_audio_s'])} | "
                     f"{e.get('decoder', '-')}, {e.get('t3_format', '-')}, {e.get('flow_steps', '-')} | "
                     f"{f(row['peak_rss_mb'][0], 0)} / {f(row['peak_rss_mb'][1], 0)} |")
    notes = []
    for row in report["summary"]:
        analyzer = row["alignment_analyzer"]
        if analyzer:
            extra = ""
            if "steps" in analyzer:
                extra = (f": {analyzer['steps']} steps analysed, it would have forced the stop token "
                         f"on {analyzer['would_force_stop']} of them")
            notes.append(f"- {row['variant']}: upstream's alignment analyzer {analyzer['mode']}{extra}.")
    if report["skipped"]:
        notes += [f"- skipped: {item['row']} ({item['reason']})" for item in report["skipped"]]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def reproducing_command(argv: List[str]) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                   if os.environ.get(k))
    words = ["python", "bench/variants_bench.py"]
    skip = False
    for word in argv:  # what changes the figures; not where they are written about
        if skip or word == "--append-results":
            skip = False
            continue
        if word == "--note":
            skip = True
            continue
        if not word.startswith("--note="):
            words.append(word)
    return (env + " " if env else "") + shlex.join(words)


def append_results(report: dict, note: Optional[str]) -> None:
    m = report["machine"]
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    parts = [] if RESULTS_HEADER in text else [
        "", RESULTS_HEADER, "", textwrap.fill(
            "Each served model (`CHATTERBOX_VARIANT`) against its upstream class on the same random "
            "checkpoint of that model's layout, in one process tree on one machine: per model, one "
            "subprocess runs upstream's `generate` (its own `from_local`, its defaults, watermark "
            "off), then another runs ours through `load_engine` (one-shot, then a streamed take's "
            "first chunk), the same text and the same number of speech tokens on both sides (every "
            "id >= 6561 is suppressed in T3's logits on both sides, so neither stops early). Decode "
            "ms/token = T3's "
            "time in the take / tokens, prefill included; RTF = wall s / audio s; TTFA = time to the "
            "first streamed chunk, compared with upstream's total (its first audio). Method and "
            "caveats: the docstring of `bench/variants_bench.py`.", 90)]
    where = f"{m.get('gpu') or 'CPU'}: {m['cpu']}, {m['cores']} cores"
    parts += ["", f"### {report['date']}, {where}, torch {m.get('torch')}", "",
              f"Run: `{report['command']}` (whole run {report['wall_s']:.0f} s). Raw figures: "
              f"`{report['out']}`.", ""]
    if note:
        parts += [textwrap.fill(note, 90), ""]
    parts += [table(report), ""]
    RESULTS_MD.write_text(text.rstrip("\n") + "\n" + "\n".join(parts))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="folder of one checkpoint per variant (DIR/<variant>-<size>), built "
                             "there when missing, reused when present (default: a temp folder)")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tokens", type=int, default=60, help="speech tokens per take (25 = 1 s)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repetitions per side (median)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="", help="our T3 format (CHATTERBOX_DTYPE; default the "
                        "worker's: float32 on CPU, bfloat16 on CUDA); upstream is float32")
    parser.add_argument("--stream-total", action="store_true",
                        help="run each streamed take to its end (default: stop after the first chunk)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time guard: steps that would end later are skipped and reported")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default bench/results/variants-<device>-<date>.json)")
    parser.add_argument("--append-results", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--note", default=None, help="a sentence for RESULTS.md (e.g. shared cores)")
    # internal: one variant's side in this process
    parser.add_argument("--side", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("upstream", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:
        return side_main(args)

    started = time.time()
    kill_at = deadline = None
    if args.max_seconds:
        kill_at = started + args.max_seconds - 3
        deadline = started + args.max_seconds - 10
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    date = datetime.date.today().isoformat()
    kind = "cpu" if device == "cpu" else "gpu"
    out = args.out or ROOT / "bench" / "results" / f"variants-{kind}-{date}.json"
    if args.size == "tiny" and args.out is None:
        out = Path(tempfile.gettempdir()) / f"variants-tiny-{device}.json"
    base = args.checkpoint_dir or scratch_dir("cbw-variants-")
    report: dict = {"date": date, "command": reproducing_command(argv), "machine": machine(),
                    "device": device, "size": args.size, "tokens": args.tokens,
                    "repeats": args.repeats, "text": TEXT, "variants": variants,
                    "max_seconds": args.max_seconds, "checkpoints": {}, "sides": {}, "skipped": [],
                    "out": os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out),
                    "notes": ["RTF = wall seconds / audio seconds",
                              "decode ms/token = T3's time within the take / tokens, prefill included",
                              f"ids >= {FIRST_SPECIAL_ID} suppressed in T3's logits on both sides "
                              "(every take is exactly `tokens` speakable tokens)",
                              "upstream's time to first audio is its total (no streaming)"]}
    side_estimate = None
    for variant in variants:
        directory = base / f"{variant}-{args.size}"
        build_s = 0 if checkpoint_ready(directory, variant) else BUILD_ESTIMATE_S[args.size]
        if deadline is not None and time.time() + build_s + (side_estimate or 0) > deadline:
            report["skipped"].append({"row": f"{variant} (all of it)",
                                      "reason": "time guard (--max-seconds)"})
            continue
        if build_s:
            print(f"[variants_bench] building a random {args.size} {variant} checkpoint in {directory}",
                  file=sys.stderr, flush=True)
            try:
                report["checkpoints"][variant] = {"directory": str(directory), "built": True,
                                                  **build_checkpoint(variant, args.size, directory)}
            except RuntimeError as exc:
                report["sides"][variant] = {"error": str(exc)}
                continue
        else:
            report["checkpoints"][variant] = {"directory": str(directory), "built": False}
        report["sides"][variant] = {}
        loads = []
        for part in ("upstream", "ours"):
            argv_side = ["--side", variant, "--part", part, "--checkpoint", str(directory),
                         "--device", device, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            if args.dtype:
                argv_side += ["--dtype", args.dtype]
            if args.stream_total:
                argv_side.append("--stream-total")
            if deadline is not None:
                argv_side += ["--deadline", str(deadline)]
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            result = run_side(argv_side, env, kill_at, f"{variant} {part}")
            report["sides"][variant][part] = result
            report["skipped"] += result.get("skipped", [])
            if result.get("killed"):
                report["skipped"].append({"row": f"{variant} {part}: steps after its last reported one",
                                          "reason": result["killed"]})
            if result.get("error"):
                print(f"[variants_bench] {variant} {part} failed: {result['error']}", file=sys.stderr,
                      flush=True)
            loads.append((result.get(part) or {}).get("load_s") or 0)
        side_estimate = max(side_estimate or 0, sum(loads) + 30)
    for parts in report["sides"].values():
        for side in parts.values():
            if isinstance(side, dict) and (side.get("machine") or {}).get("gpu"):
                report["machine"]["gpu"] = side["machine"]["gpu"]
    kind = "released sizes" if args.size == "full" else "shrunk (tiny)"
    report["checkpoint_kind"] = (f"random, {kind}, `python -m chatterbox_worker.tiny_model DIR "
                                 f"--variant V --size {args.size}`")
    report["summary"] = summarise(report)
    report["wall_s"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"\nJSON: {out}  (whole run {report['wall_s']} s)")
    if args.append_results:
        append_results(report, args.note)
        print(f"appended to {RESULTS_MD}")
    complete = all(not row["error"] and row["ours_ttfa_s"] is not None for row in report["summary"])
    return 0 if complete and len(report["summary"]) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())

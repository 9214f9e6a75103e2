"""Throughput, concurrency, decode speed and memory vs upstream (issue #11's benchmark).

    python bench/throughput_bench.py [--checkpoint DIR | --size full|tiny] [--tokens 250]
        [--device auto|cpu|cuda] [--formats float32,bfloat16,int8] [--concurrency 1,2,4]
        [--repeats 3] [--upstream-jobs 3] [--max-seconds S] [--out FILE] [--append-results]
    python bench/throughput_bench.py --quick --device cpu      # tiny checkpoint, a smoke check

One command, one machine, one checkpoint (by default a random one of the
released model's size, built with ``tiny_model --size full``), one fixed text
of one piece, and the same number of speech tokens forced on every side (a
random T3 never stops by itself: upstream's generate is capped by wrapping
``T3.inference``, ours through the per-piece token budget). Every side runs
in a fresh subprocess of this script (``--side upstream|ours``), so that its
peak RSS is its own and each T3 weight format is picked up by the model
loader from ``CHATTERBOX_DTYPE`` as a worker would:

1. batch-1 T3 decode, ms per speech token (total decode time / tokens), for
   upstream's ``T3.inference`` and for ``engine.speech_tokens`` in each
   format; for each non-float32 format, agreement of its greedy tokens with
   float32's (see ``GREEDY``);
2. throughput through the real handler path: ``JobRunner.run_async`` on one
   asyncio event loop with ``MAX_CONCURRENCY`` = N and N jobs started
   together (distinct seeds, ``format: wav``), streamed and one-shot; audio
   seconds per wall second, and each job's time to its first audio item;
3. upstream ``ChatterboxTTS.generate`` run sequentially on the same work
   (same modules, same voice, watermark off on both sides): the baseline
   every row is divided by;
4. peak RSS of each side's process (``ru_maxrss``) and, on CUDA, peak GPU memory.

The handler-path side's engine is loaded as a worker with MAX_CONCURRENCY =
the largest N (its decoder has that many slots; a row of N jobs uses N of
them) and each row gets a ``JobRunner`` with MAX_CONCURRENCY = N; the other
formats' sides load as a worker of MAX_CONCURRENCY = 1. With CUDA graphs, every
batch bucket up to N is captured (a short T3-only decode) before its row, as
in a worker that has been serving a while.

Rows run most important first (upstream, batch-1 decode per format, streamed
rows, one-shot rows); with ``--max-seconds`` a row that would not finish in
time is skipped and reported as skipped. Prints tables, writes JSON; with
``--append-results`` appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import types
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One piece (at most 300 characters, one sentence): the same text as stream_bench.py.
TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs all the way home "
        "across the fields, past the old mill and the river, before the sun goes down.")
SEED = 1234
VOICE_ID = "bench"
SAMPLE_RATE = 24000
WARM_TOKENS = 10
# Greedy decoding for the agreement of a format with float32: production
# sampling parameters except temperature 1e-4 and min_p 0, so the draw (same
# seed on both sides) is the argmax of the guided, repetition-penalised logits
# unless two logits lie within ~1e-3 of each other.
GREEDY = {"temperature": 1e-4, "cfg_weight": 0.5, "top_p": 1.0, "min_p": 0.0,
          "repetition_penalty": 1.2}
QUICK = {"size": "tiny", "tokens": 40, "concurrency": "1,2", "repeats": 1, "upstream_jobs": 2}
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
RESULTS_HEADER = "## Throughput and concurrency vs upstream (`bench/throughput_bench.py`)"


# ----------------------------------------------------------------------------
# shared helpers


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when this process exits: a checkpoint built at the
    released size is 3 GB, and a benchmark run now and then should not fill the disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    if os.environ.get("OMP_NUM_THREADS"):
        info["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    return info


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: List[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values),
            "p95": percentile(values, 95), "max": max(values)}


def agreement(reference: List[int], other: List[int]) -> dict:
    """Common prefix / len(reference), and position-wise match / len(reference)."""
    n = len(reference)
    prefix = 0
    for a, b in zip(reference, other):
        if a != b:
            break
        prefix += 1
    matches = sum(a == b for a, b in zip(reference, other))
    return {"tokens": n, "common_prefix": prefix, "prefix_fraction": prefix / n if n else None,
            "position_match_fraction": matches / n if n else None}


# ----------------------------------------------------------------------------
# a side: one subprocess, JSON snapshots on stdout


class Side:
    """What a side subprocess reports: its JSON result, re-emitted whole after every row.

    stdout carries only these JSON lines (one snapshot per line, the last one
    complete); everything else anything prints (upstream's progress bars,
    warnings) goes to stderr, at the file-descriptor level."""

    def __init__(self, deadline: Optional[float], device: str):
        self._out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.deadline = deadline
        self.device = device
        self.result: dict = {"machine": machine(), "device": device, "memory": [], "rows": [],
                             "skipped": []}
        if device.startswith("cuda"):
            import torch

            self.result["machine"]["gpu"] = torch.cuda.get_device_name(0)
        self._gpu_peak = 0.0

    def emit(self) -> None:
        self.result["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if self.device.startswith("cuda"):
            import torch

            self._gpu_peak = max(self._gpu_peak, torch.cuda.max_memory_allocated() / 2**20)
            self.result["peak_gpu_mb"] = round(self._gpu_peak, 1)
        self._out.write(json.dumps(self.result) + "\n")
        self._out.flush()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def memory(self, phase: str) -> dict:
        """Peak RSS (and GPU memory) of this process so far, after ``phase``."""
        entry = {"phase": phase, "peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.device.startswith("cuda"):
            import torch

            self._gpu_peak = max(self._gpu_peak, torch.cuda.max_memory_allocated() / 2**20)
            entry["peak_gpu_mb"] = round(self._gpu_peak, 1)
        self.result["memory"].append(entry)
        return entry

    def row_gpu_start(self) -> None:
        """Start a per-row GPU peak (the process peak is kept separately)."""
        if self.device.startswith("cuda"):
            import torch

            self._gpu_peak = max(self._gpu_peak, torch.cuda.max_memory_allocated() / 2**20)
            torch.cuda.reset_peak_memory_stats()

    def row_gpu_peak(self) -> Optional[float]:
        if self.device.startswith("cuda"):
            import torch

            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return None

    def fits(self, estimate_s: Optional[float]) -> bool:
        if self.deadline is None:
            return True
        left = self.deadline - time.time()
        return left > 0 and (estimate_s is None or estimate_s <= left)

    def skip(self, name: str, estimate_s: Optional[float]) -> None:
        left = None if self.deadline is None else round(self.deadline - time.time(), 1)
        self.result["skipped"].append({"row": name, "reason": "time guard (--max-seconds)",
                                       "estimate_s": None if estimate_s is None else round(estimate_s, 1),
                                       "seconds_left": left})
        self.emit()

    def repetitions(self, count: int, label: str, estimate_s: Optional[float] = None):
        """0, 1, ... ``count - 1`` while each repetition is expected to fit in the time left:
        the first's estimate is ``estimate_s`` (None: unknown, run it), each later one's the
        previous repetition's seconds x 1.2. The first that would not fit is reported skipped
        (``label repetition i/count``) and ends the loop."""
        for i in range(count):
            if not self.fits(estimate_s):
                self.skip(f"{label} repetition {i + 1}/{count}", estimate_s)
                return
            t0 = time.perf_counter()
            yield i
            estimate_s = (time.perf_counter() - t0) * 1.2

    @contextlib.contextmanager
    def stopwatch(self):
        """Times its block, the device's queue drained at both ends: ``watch.seconds``."""
        watch = types.SimpleNamespace(seconds=None)
        self.sync()
        t0 = time.perf_counter()
        yield watch
        self.sync()
        watch.seconds = time.perf_counter() - t0


def shared_voice(work: Path, engine, device: str):
    """The bench voice (10 s synthetic reference, seed 1), identical on every side.

    The first side to run builds it with ``engine.voice_from_clips`` and
    saves its tensors in the work folder; later sides load those tensors."""
    import torch

    from chatterbox_worker.engine.conditionals import VoiceConditionals
    from chatterbox_worker.tiny_model import synthetic_reference

    path = work / "voice.pt"
    if path.exists():
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        return VoiceConditionals.from_tensors(tensors, device=device), "loaded"
    voice = engine.voice_from_clips([synthetic_reference(seconds=10.0, seed=1)])
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(voice.tensors(), tmp)
    os.replace(tmp, path)
    return voice, "built"


def t3_weights(t3) -> dict:
    """What the loaded T3 holds: elements per dtype, and quantized modules."""
    import torch

    counts: Dict[str, int] = {}
    for tensor in list(t3.parameters()) + list(t3.buffers()):
        counts[str(tensor.dtype).replace("torch.", "")] = counts.get(
            str(tensor.dtype).replace("torch.", ""), 0) + tensor.numel()
    quantized = 0
    for module in t3.modules():
        kind = (type(module).__module__ + "." + type(module).__name__).lower()
        if "quantiz" in kind or "int8" in kind or "qlinear" in kind:
            quantized += 1
    for value in t3.state_dict().values():  # packed int8 weights live here, not in parameters()
        if isinstance(value, torch.Tensor) and value.dtype in (torch.int8, torch.qint8):
            counts.setdefault("int8 (state_dict)", 0)
            counts["int8 (state_dict)"] += value.numel()
    return {"dtypes": counts, "quantized_modules": quantized}


def format_applied(fmt: str, weights: dict) -> Optional[str]:
    """None if the loaded T3 is in ``fmt``, else why not (the loader ignored CHATTERBOX_DTYPE)."""
    counts = weights["dtypes"]
    floats = {k: v for k, v in counts.items() if k in ("float32", "bfloat16", "float16")}
    main = max(floats, key=floats.get) if floats else None
    if fmt in ("float32", "bfloat16", "float16"):
        if main == fmt:
            return None
    elif fmt == "int8":
        if weights["quantized_modules"] or any("int8" in k for k in counts):
            return None
    else:
        return None  # unknown to this bench: reported as the loader leaves it
    return (f"CHATTERBOX_DTYPE={fmt} was not applied by the loader: T3 holds {counts} "
            f"({weights['quantized_modules']} quantized modules)")


# -- upstream ---------------------------------------------------------------


def side_upstream(args, side: Side) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from chatterbox_worker.engine.quiet import filter_third_party_warnings

    filter_third_party_warnings()
    from chatterbox.models.t3.modules.cond_enc import T3Cond
    from chatterbox.tts import ChatterboxTTS, Conditionals, punc_norm

    from chatterbox_worker.engine.model import load_model
    from chatterbox_worker.engine.synthesis import Engine
    from chatterbox_worker.engine.weights import WeightSource

    device, n = args.device, args.tokens
    started = time.perf_counter()
    model = load_model(WeightSource(args.checkpoint, "model_dir"), variant="original", device=device)
    engine = Engine(model, watermark=False)
    side.result["load_s"] = round(time.perf_counter() - started, 2)
    side.result["model"] = model.describe()
    side.result["t3_weights"] = t3_weights(model.t3)
    voice, how = shared_voice(args.workdir, engine, device)
    side.result["voice"] = how
    side.memory("loaded")
    side.emit()

    t3_cond, gen = voice.for_request(0.5)
    tts = ChatterboxTTS(model.t3, model.s3gen, model.voice_encoder, model.tokenizer, device,
                        conds=Conditionals(T3Cond(speaker_emb=t3_cond.speaker_emb,
                                                  cond_prompt_speech_tokens=t3_cond.cond_prompt_speech_tokens,
                                                  emotion_adv=t3_cond.emotion_adv), copy.deepcopy(gen)))
    tts.watermarker.apply_watermark = lambda wav, sample_rate: wav  # watermark off, as ours
    t3_inference = model.t3.inference
    cap = {"tokens": WARM_TOKENS}
    model.t3.inference = lambda **kw: t3_inference(**{**kw, "max_new_tokens": cap["tokens"]})

    # Warm-up: first-call costs (upstream patches its T3 on the first inference) out.
    tts.generate("Warm up.")
    side.sync()

    # Batch-1 decode: T3.inference as generate calls it (guidance doubles the rows).
    text_tokens = tts.tokenizer.text_to_tokens(punc_norm(TEXT)).to(device)
    text_tokens = torch.cat([text_tokens, text_tokens], dim=0)
    text_tokens = F.pad(text_tokens, (1, 0), value=model.t3.hp.start_text_token)
    text_tokens = F.pad(text_tokens, (0, 1), value=model.t3.hp.stop_text_token)
    cap["tokens"] = n
    if side.fits(None):
        side.row_gpu_start()
        torch.manual_seed(SEED)
        side.sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens = t3_inference(t3_cond=tts.conds.t3, text_tokens=text_tokens, max_new_tokens=n,
                                  temperature=0.8, cfg_weight=0.5, repetition_penalty=1.2,
                                  min_p=0.05, top_p=1.0)
        side.sync()
        took = time.perf_counter() - t0
        made = int(tokens.shape[-1])
        side.result["decode"] = {"tokens": made, "seconds": round(took, 4),
                                 "ms_per_token": 1000 * took / max(made, 1),
                                 "peak_gpu_mb": side.row_gpu_peak()}
        side.memory("batch-1 decode")
        side.emit()
    else:
        side.skip("upstream batch-1 decode", None)

    # Sequential generate: K jobs of the same work, distinct seeds.
    jobs = []
    for i in side.repetitions(args.upstream_jobs, "upstream generate"):
        side.row_gpu_start()
        torch.manual_seed(SEED + i)
        with side.stopwatch() as watch:
            wav = tts.generate(TEXT)
        audio_s = wav.shape[-1] / SAMPLE_RATE
        jobs.append({"seed": SEED + i, "wall_s": round(watch.seconds, 4), "audio_s": round(audio_s, 4),
                     "peak_gpu_mb": side.row_gpu_peak()})
        total_wall = sum(j["wall_s"] for j in jobs)
        total_audio = sum(j["audio_s"] for j in jobs)
        side.result["generate"] = {"jobs": jobs, "wall_s": round(total_wall, 4),
                                   "audio_s": round(total_audio, 4),
                                   "audio_s_per_wall_s": total_audio / total_wall}
        side.memory(f"generate job {i + 1}")
        side.emit()


# -- ours -------------------------------------------------------------------


def side_ours(args, side: Side) -> None:
    fmt = os.environ.get("CHATTERBOX_DTYPE", "float32")
    side.result["format"] = fmt
    voices_dir = Path(tempfile.mkdtemp(prefix="voices-", dir=args.workdir))
    env = dict(os.environ)
    env.update({"CHATTERBOX_MODEL_DIR": str(args.checkpoint), "CHATTERBOX_DEVICE": args.device,
                "CHATTERBOX_WATERMARK": "false", "VOICES_DIR": str(voices_dir),
                "CHATTERBOX_DTYPE": fmt})
    # The engine is sized as a worker with MAX_CONCURRENCY = the largest N of the
    # handler-path rows (its decoder's slots), or for one job on a decode-only side.
    env["MAX_CONCURRENCY"] = str(max(args.concurrency) if args.throughput else 1)

    from chatterbox_worker.config import load_settings
    from chatterbox_worker.engine import SamplingParams, SynthesisRequest, load_engine
    from chatterbox_worker.engine.text import split_text
    from chatterbox_worker.jobs import JobRunner
    from chatterbox_worker.tiny_model import synthetic_reference
    from chatterbox_worker.voices import VoiceStore, voice_file_bytes

    settings = load_settings(env)
    side.result["settings_dtype"] = str(getattr(settings, "dtype", "(no dtype setting)"))
    started = time.perf_counter()
    engine = load_engine(settings)  # the worker's own path: locate, load (with the format), warm up
    side.result["load_s"] = round(time.perf_counter() - started, 2)
    warm_up_s = getattr(engine, "warm_up_s", None)  # part of load_s (cold start)
    side.result["warm_up_s"] = None if warm_up_s is None else round(warm_up_s, 2)
    side.result["model"] = engine.model.describe()
    side.result["engine"] = {"max_batch": getattr(engine, "max_batch", None),
                             "decoder": getattr(engine, "decoder_kind", None),
                             "cuda_graphs": getattr(engine, "cuda_graphs", None),
                             "vocoder_batching": getattr(engine, "batch_vocoder", None),
                             "hift_batching": getattr(engine, "batch_hift", None),
                             "vocoder_padding": getattr(getattr(engine, "vocoder_calls", None),
                                                        "padding", None),
                             "vocoder_graphs": getattr(engine, "flow_graphs", None) is not None}
    flow_graphs = getattr(engine, "flow_graphs", None)

    def graph_counts() -> Optional[dict]:
        """The vocoder's CUDA graphs so far: captured, solves replayed, solves run eagerly."""
        if flow_graphs is None:
            return None
        return {"captures": flow_graphs.captures, "replays": flow_graphs.replays,
                "eager": flow_graphs.eager, "enabled": flow_graphs.enabled}
    calls = getattr(engine, "vocoder_calls", None)

    def vocoder_counts():
        """(calls, rows) the vocoder has made so far: rows > calls where calls were shared."""
        return (calls.batches, calls.rows) if calls is not None else (None, None)
    weights = t3_weights(engine.model.t3)
    side.result["t3_weights"] = weights
    problem = format_applied(fmt, weights)
    if problem:
        raise RuntimeError(problem)
    device = engine.model.device

    voice, how = shared_voice(args.workdir, engine, device)
    side.result["voice"] = how
    store = VoiceStore(settings.voices_dir, model_signature=engine.model.signature,
                       variant=engine.model.variant, device=device)
    store.save(VOICE_ID, voice_file_bytes(
        VOICE_ID, voice, model=engine.model.signature, variant=engine.model.variant,
        reference_audio=synthetic_reference(seconds=10.0, seed=1),
        reference_sample_rate=SAMPLE_RATE), overwrite=True)
    voice = store.load(VOICE_ID).conditionals  # what the handler path uses
    side.memory("loaded")
    side.emit()

    pieces = split_text(TEXT)
    assert len(pieces) == 1, pieces
    piece = pieces[0]
    n = args.tokens

    def decode(params: SamplingParams, tokens: int, seed: int):
        request = SynthesisRequest(text=TEXT, voice=voice, seed=seed, sampling=params)
        generator = engine.new_generator(seed)
        side.sync()
        t0 = time.perf_counter()
        steps = engine.speech_tokens(request, piece, generator, tokens)
        made: List[int] = []
        try:
            for token in steps:
                made.append(token)
        finally:
            steps.close()
        side.sync()
        return made, time.perf_counter() - t0

    graphs = bool(getattr(engine, "cuda_graphs", False))
    # Warm-up. With CUDA graphs, a graph is captured per (batch bucket, length
    # bucket) on first use: decode the full length once so that capture is not timed.
    decode(SamplingParams(), n if graphs else WARM_TOKENS, 0)
    if args.skip_decode:
        pass
    elif side.fits(None):
        side.row_gpu_start()
        made, took = decode(SamplingParams(), n, SEED)
        side.result["decode"] = {"tokens": len(made), "seconds": round(took, 4),
                                 "ms_per_token": 1000 * took / max(len(made), 1),
                                 "peak_gpu_mb": side.row_gpu_peak()}
        side.memory("batch-1 decode")
        side.emit()
    else:
        side.skip(f"{fmt} batch-1 decode", None)
    ms_per_token = (side.result.get("decode") or {}).get("ms_per_token")

    if args.agreement_tokens and not args.skip_decode:
        estimate = ms_per_token * args.agreement_tokens / 1000 * 1.3 if ms_per_token else None
        if side.fits(estimate):
            made, took = decode(SamplingParams(**GREEDY), args.agreement_tokens, SEED)
            side.result["greedy_tokens"] = made
            side.emit()
        else:
            side.skip(f"{fmt} greedy tokens (agreement)", estimate)

    if not args.throughput:
        return

    # -- the handler path: JobRunner.run_async on one event loop ---------------
    cap = {"tokens": WARM_TOKENS}
    original = engine.speech_tokens

    def forced(request, piece, generator, max_tokens=None):  # every piece makes exactly cap tokens
        return original(request, piece, generator, cap["tokens"])

    engine.speech_tokens = forced
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runners: Dict[int, JobRunner] = {}

    def runner_for(concurrency: int) -> JobRunner:
        if concurrency not in runners:
            s = load_settings({**env, "MAX_CONCURRENCY": str(concurrency)})
            assert s.concurrency == concurrency
            runners[concurrency] = JobRunner(s, engine, store)
        return runners[concurrency]

    async def one_job(runner: JobRunner, job: dict, t0: float) -> dict:
        first = None
        chunks = 0
        digest = hashlib.sha256()
        last = None
        async for item in runner.run_async(job):
            if first is None and "audio_base64" in item:
                first = time.perf_counter() - t0
            if item.get("type") == "chunk":
                chunks += 1
            if "audio_base64" in item:
                digest.update(base64.b64decode(item["audio_base64"]))
            last = {k: v for k, v in item.items() if k != "audio_base64"}
        done = time.perf_counter() - t0
        if not last or last.get("type") != "result":
            return {"error": (last or {}).get("error", "no result item")}
        return {"seed": job["input"]["seed"], "first_audio_s": first, "done_s": done,
                "audio_s": last["duration_s"], "chunks": chunks, "audio_sha256": digest.hexdigest()[:16],
                "job_ttfa_s": last["timings"]["ttfa_s"]}

    async def together(runner: JobRunner, jobs: List[dict]):
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_job(runner, job, t0) for job in jobs))
        return results, time.perf_counter() - t0

    def run_jobs(mode: str, concurrency: int, seed0: int):
        jobs = [{"id": f"{mode}-{concurrency}-{seed0 + i}",
                 "input": {"text": TEXT, "voice_id": VOICE_ID, "seed": seed0 + i, "format": "wav",
                           "stream": mode == "stream"}} for i in range(concurrency)]
        return loop.run_until_complete(together(runner_for(concurrency), jobs))

    warmed = {1}

    def warm_decoder(concurrency: int) -> None:
        """CUDA graphs: capture every batch bucket up to ``concurrency`` (a warm worker's
        state) by decoding that many requests at once, T3 only."""
        bucket = 1
        while graphs and bucket < concurrency:
            bucket = min(bucket * 2, concurrency)
            if bucket in warmed:
                continue
            t0 = time.perf_counter()
            streams = [original(SynthesisRequest(text=TEXT, voice=voice, seed=i), piece,
                                engine.new_generator(i), n) for i in range(bucket)]
            for stream in streams:
                for _ in stream:
                    pass
                stream.close()
            warmed.add(bucket)
            side.result.setdefault("graph_warmup_s", {})[str(bucket)] = round(time.perf_counter() - t0, 2)

    # Warm-up of both paths (first-call costs out of the measurement).
    for mode in ("stream", "one-shot"):
        results, _ = run_jobs(mode, 1, 0)
        if "error" in results[0]:
            raise RuntimeError(f"warm-up {mode} job failed: {results[0]['error']}")
    cap["tokens"] = n

    walls: Dict[tuple, float] = {}  # (mode, N) -> median wall, for the time guard

    def estimate_for(mode: str, concurrency: int) -> Optional[float]:
        same = [(c, w) for (m, c), w in walls.items() if m == mode]
        if same:
            c, w = max(same)
            return w * max(1.0, concurrency / c)
        other = [(c, w) for (m, c), w in walls.items() if c <= concurrency]
        if other:
            c, w = max(other)
            return w * max(1.0, concurrency / c)
        return ms_per_token * n / 1000 * 1.5 * concurrency if ms_per_token else None

    for mode in ("stream", "one-shot"):
        for concurrency in args.concurrency:
            name = f"{fmt} {mode} N={concurrency}"
            reps = []
            for rep in range(args.repeats):
                estimate = estimate_for(mode, concurrency)
                if not side.fits(estimate):
                    side.skip(f"{name} repetition {rep + 1}/{args.repeats}", estimate)
                    break
                warm_decoder(concurrency)
                side.row_gpu_start()
                # Distinct seeds within a row and across repetitions; job i of repetition 1
                # has upstream's job i seed (same tokens), in both modes.
                seed0 = SEED + 1000 * rep
                calls0, rows0 = vocoder_counts()
                results, wall = run_jobs(mode, concurrency, seed0)
                calls1, rows1 = vocoder_counts()
                errors = [r["error"] for r in results if "error" in r]
                if errors:
                    side.result["rows"].append({"mode": mode, "concurrency": concurrency,
                                                "error": errors[0], "failed_jobs": len(errors)})
                    side.emit()
                    break
                audio = sum(r["audio_s"] for r in results)
                first = [r["first_audio_s"] for r in results]
                reps.append({"wall_s": round(wall, 4), "audio_s": round(audio, 4),
                             "audio_s_per_wall_s": audio / wall,
                             "first_audio_s": spread(first),
                             "distinct_audio": len({r["audio_sha256"] for r in results}),
                             "vocoder_calls": None if calls0 is None else calls1 - calls0,
                             "vocoder_rows": None if rows0 is None else rows1 - rows0,
                             "vocoder_graphs": graph_counts(),
                             "jobs": results, "peak_gpu_mb": side.row_gpu_peak()})
                walls[(mode, concurrency)] = statistics.median(r["wall_s"] for r in reps)
                rows = [r for r in side.result["rows"]
                        if not (r["mode"] == mode and r["concurrency"] == concurrency)]
                ordered = sorted(reps, key=lambda r: r["wall_s"])
                median_rep = ordered[(len(ordered) - 1) // 2]
                rows.append({"mode": mode, "concurrency": concurrency, "repeats": len(reps),
                             "median_repetition": median_rep,
                             "wall_s_all": [r["wall_s"] for r in reps],
                             "audio_s_per_wall_s_all": [r["audio_s_per_wall_s"] for r in reps]})
                side.result["rows"] = rows
                side.memory(f"{mode} N={concurrency} repetition {rep + 1}")
                side.emit()


def side_main(args) -> int:
    side = Side(args.deadline, args.device)
    try:
        if args.side == "upstream":
            side_upstream(args, side)
        else:
            side_ours(args, side)
    except Exception as exc:
        traceback.print_exc()
        side.result["error"] = f"{type(exc).__name__}: {str(exc)[:1000]}"
        side.emit()
        return 1
    side.result["done"] = True
    side.emit()
    return 0


# ----------------------------------------------------------------------------
# the orchestrator


def run_side(argv: List[str], env: dict, kill_at: Optional[float], log_name: str, *,
             script: Optional[Path] = None, tag: str = "throughput_bench") -> dict:
    """Run one side (``script``, default this one, with ``argv``) to its end (or ``kill_at``);
    its last JSON snapshot, or an error. The sides of bench/variants_bench.py run here too."""
    command = [sys.executable, str(script or Path(__file__).resolve())] + argv
    print(f"[{tag}] {log_name}: {shlex.join(command)}", file=sys.stderr, flush=True)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)
    snapshots: List[dict] = []

    def read() -> None:
        for line in process.stdout:
            try:
                snapshots.append(json.loads(line))
            except json.JSONDecodeError:
                print(line, end="", file=sys.stderr)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    try:
        process.wait(timeout=None if kill_at is None else max(1.0, kill_at - time.time()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        killed = True
    reader.join(timeout=10)
    result = dict(snapshots[-1]) if snapshots else {}
    result["wall_s"] = round(time.time() - started, 1)
    result["returncode"] = process.returncode
    if killed:
        result["killed"] = "stopped by the time guard (--max-seconds) in the middle of its work"
    elif process.returncode and "error" not in result:
        result["error"] = f"exited with status {process.returncode} (see stderr)"
    return result


def build_checkpoint(size: str, directory: Path) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "chatterbox_worker.tiny_model", str(directory),
                          "--size", size], cwd=ROOT, check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    info = json.loads(out.stdout.strip().splitlines()[-1])
    info["seconds"] = round(time.time() - started, 1)
    return info


def f(value, digits=2, suffix="") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{suffix}"


def ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def summarise(report: dict) -> dict:
    """Ratios to upstream, and greedy agreement, from the sides' results."""
    up = report["sides"].get("upstream", {})
    up_ms = (up.get("decode") or {}).get("ms_per_token")
    up_rate = (up.get("generate") or {}).get("audio_s_per_wall_s")
    up_rss = up.get("peak_rss_mb")
    up_gpu = up.get("peak_gpu_mb")
    summary: dict = {"upstream_ms_per_token": up_ms, "upstream_audio_s_per_wall_s": up_rate,
                     "decode": {}, "throughput": [], "memory": {}}
    reference = (report["sides"].get("float32") or {}).get("greedy_tokens")
    for fmt in report["formats"] + [k for k in report["sides"] if "fallback" in k]:
        side = report["sides"].get(fmt) or {}
        ms = (side.get("decode") or {}).get("ms_per_token")
        entry = {"ms_per_token": ms, "tokens_per_s": 1000 / ms if ms else None,
                 "ratio_to_upstream_ms_per_token": ratio(ms, up_ms),
                 "error": side.get("error") or side.get("killed"),
                 "decoder": (side.get("engine") or {}).get("decoder")}
        if fmt != "float32" and reference and side.get("greedy_tokens"):
            entry["greedy_agreement_with_float32"] = agreement(reference, side["greedy_tokens"])
        if fmt in report["formats"]:
            summary["decode"][fmt] = entry
        summary["memory"][fmt] = {"peak_rss_mb": side.get("peak_rss_mb"),
                                  "ratio_to_upstream_rss": ratio(side.get("peak_rss_mb"), up_rss),
                                  "peak_gpu_mb": side.get("peak_gpu_mb"),
                                  "ratio_to_upstream_gpu": ratio(side.get("peak_gpu_mb"), up_gpu),
                                  "engine_max_batch": (side.get("engine") or {}).get("max_batch"),
                                  "phases": side.get("memory")}
    summary["memory"]["upstream"] = {"peak_rss_mb": up_rss, "peak_gpu_mb": up_gpu,
                                     "phases": up.get("memory")}
    tp = report["sides"].get(report["throughput_side"]) or {}
    alone = {}
    for row in tp.get("rows", []):
        if "median_repetition" in row and row["concurrency"] == 1:
            alone[row["mode"]] = row["median_repetition"]["first_audio_s"]["median"]
    for row in tp.get("rows", []):
        if "median_repetition" not in row:
            summary["throughput"].append({"mode": row["mode"], "concurrency": row["concurrency"],
                                          "error": row.get("error")})
            continue
        rep = row["median_repetition"]
        summary["throughput"].append({
            "mode": row["mode"], "concurrency": row["concurrency"], "repeats": row["repeats"],
            "wall_s": rep["wall_s"], "audio_s": rep["audio_s"],
            "audio_s_per_wall_s": rep["audio_s_per_wall_s"],
            "ratio_to_upstream_sequential": ratio(rep["audio_s_per_wall_s"], up_rate),
            "first_audio_s": rep["first_audio_s"],
            "slowest_first_audio_over_alone": ratio(rep["first_audio_s"]["max"], alone.get(row["mode"])),
            "distinct_audio": rep["distinct_audio"], "peak_gpu_mb": rep["peak_gpu_mb"],
            "vocoder_calls": rep.get("vocoder_calls"), "vocoder_rows": rep.get("vocoder_rows")})
    return summary


def tables(report: dict) -> str:
    s = report["summary"]
    m = report["machine"]
    gpu = m.get("gpu") or "no GPU"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {gpu}; torch {m.get('torch')}; "
             f"device {report['device']}; checkpoint {report['checkpoint_kind']}; "
             f"{report['tokens']} speech tokens forced per job; text of {len(TEXT)} characters, one piece.",
             "",
             "Batch-1 T3 decode (total decode time / tokens; prefill included):",
             "",
             "| side | decoder | ms/token | tokens/s | ratio to upstream ms/token | greedy agreement with float32 (prefix / positions) |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    up_ms = s["upstream_ms_per_token"]
    lines.append(f"| upstream `T3.inference` (float32) | HF loop | {f(up_ms, 1)} | {f(1000 / up_ms if up_ms else None, 1)} | "
                 f"{'1.000' if up_ms else 'skipped'} | |")
    for fmt, d in s["decode"].items():
        agree = d.get("greedy_agreement_with_float32")
        agree_s = (f"{agree['prefix_fraction']:.3f} / {agree['position_match_fraction']:.3f} "
                   f"of {agree['tokens']}") if agree else ("(reference)" if fmt == "float32" else "-")
        if d.get("error") and d["ms_per_token"] is None:
            lines.append(f"| ours, {fmt} | failed: {d['error'][:160]} | | | | |")
        elif d["ms_per_token"] is None:
            lines.append(f"| ours, {fmt} | skipped | | | | |")
        else:
            lines.append(f"| ours, {fmt} | {d['decoder'] or '-'} | {f(d['ms_per_token'], 1)} | {f(d['tokens_per_s'], 1)} | "
                         f"{f(d['ratio_to_upstream_ms_per_token'], 3)} | {agree_s} |")
    up_rate = s["upstream_audio_s_per_wall_s"]
    up_gen = (report["sides"].get("upstream") or {}).get("generate") or {}
    lines += ["",
              f"Throughput through the handler path (`JobRunner.run_async`, one event loop, "
              f"MAX_CONCURRENCY = N, N jobs started together, distinct seeds, wav), T3 format "
              f"{report['throughput_format']}; median repetition by wall time; first audio = the "
              f"first chunk item (one-shot: the result item), from the moment all N were started. Upstream: "
              f"`ChatterboxTTS.generate` run sequentially on {len(up_gen.get('jobs', []))} jobs "
              f"(a sequential rate is constant, so a few jobs measure it).",
              "",
              "| side | N | reps | wall s | audio s | audio s / wall s | x upstream | first audio s: min / median / p95 / max | slowest first / alone | vocoder calls / their rows | peak GPU MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
    if up_gen:
        lines.append(f"| upstream generate, sequential | 1 | {len(up_gen['jobs'])} jobs | {f(up_gen['wall_s'])} | "
                     f"{f(up_gen['audio_s'])} | {f(up_rate, 3)} | 1.000 | | | | |")
    for row in s["throughput"]:
        if row.get("error"):
            lines.append(f"| ours, {row['mode']} | {row['concurrency']} | failed: {row['error'][:160]} | | | | | | | | |")
            continue
        fa = row["first_audio_s"]
        lines.append(f"| ours, {row['mode']} | {row['concurrency']} | {row['repeats']} | {f(row['wall_s'])} | "
                     f"{f(row['audio_s'])} | {f(row['audio_s_per_wall_s'], 3)} | "
                     f"{f(row['ratio_to_upstream_sequential'], 3)} | "
                     f"{fa['min']:.3f} / {fa['median']:.3f} / {fa['p95']:.3f} / {fa['max']:.3f} | "
                     f"{f(row['slowest_first_audio_over_alone'], 2)} | "
                     f"{f(row.get('vocoder_calls'), 0)} / {f(row.get('vocoder_rows'), 0)} | "
                     f"{f(row['peak_gpu_mb'], 0)} |")
    lines += ["", "Peak memory of each side's process (whole run of that process):", "",
              "| side | decoder slots | peak RSS MB | ratio to upstream | peak GPU MB | ratio to upstream | RSS after load / after batch-1 decode MB |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]

    def phases(entry):
        by = {p["phase"]: p["peak_rss_mb"] for p in entry.get("phases") or []}
        return f"{f(by.get('loaded'), 0)} / {f(by.get('batch-1 decode'), 0)}"
    up_mem = s["memory"]["upstream"]
    lines.append(f"| upstream | | {f(up_mem['peak_rss_mb'], 0)} | 1.000 | {f(up_mem['peak_gpu_mb'], 0)} | "
                 f"{'1.000' if up_mem['peak_gpu_mb'] else '-'} | {phases(up_mem)} |")
    for fmt in s["memory"]:
        if fmt == "upstream":
            continue
        mem = s["memory"][fmt]
        what = " + handler-path rows" if fmt == report["throughput_side"] else ""
        if (report["sides"].get(fmt) or {}).get("error"):
            what += " (failed)"
        lines.append(f"| ours, {fmt}{what} | {mem['engine_max_batch'] or '-'} | {f(mem['peak_rss_mb'], 0)} | {f(mem['ratio_to_upstream_rss'], 3)} | "
                     f"{f(mem['peak_gpu_mb'], 0)} | {f(mem['ratio_to_upstream_gpu'], 3)} | {phases(mem)} |")
    loads = [f"{fmt} {f(side['load_s'])} s (warm-up {f(side.get('warm_up_s'))} s)"
             for fmt, side in report["sides"].items()
             if fmt != "upstream" and side.get("load_s") is not None]
    lines += ["", "Our worker's load to ready (`load_engine`: weights, engine, warm-up; the "
              "upstream side shares our loader, so `bench/load_bench.py` compares loading): "
              + "; ".join(loads) + "."]
    if report["skipped"]:
        lines += ["", "Skipped or cut short:", ""]
        lines += [f"- {item['row']}: {item['reason']}" for item in report["skipped"]]
    return "\n".join(lines)


def reproducing_command(args, argv: List[str]) -> str:
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
                   if os.environ.get(k))
    words = ["python", "bench/throughput_bench.py"] + [a for a in argv if a != "--append-results"]
    return (env + " " if env else "") + shlex.join(words)


def append_results(report: dict) -> None:
    m = report["machine"]
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    parts = [] if RESULTS_HEADER in text else [
        "", RESULTS_HEADER, "", textwrap.fill(
            "One command, one process tree, one machine, one checkpoint, the same fixed text (one "
            "piece) and the same number of speech tokens forced per job on every side; each side "
            "(upstream, ours per T3 weight format) runs in its own subprocess, so its peak RSS is "
            "its own. Raw figures in the JSON written with `--out`.", 90)]
    where = f"{m.get('gpu') or 'CPU'}: {m['cpu']}, {m['cores']} cores"
    parts += ["", f"### {report['date']}, {where}, torch {m.get('torch')}", "",
              f"Run: `{report['command']}`", "", tables(report), ""]
    RESULTS_MD.write_text(text.rstrip("\n") + "\n" + "\n".join(parts))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: build a random one with tiny_model --size SIZE in a temp dir")
    parser.add_argument("--size", choices=("full", "tiny"), default=None, help="when building (default full)")
    parser.add_argument("--tokens", type=int, default=None, help="speech tokens per job (default 250; 25 = 1 s)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--formats", default=None,
                        help="T3 weight formats via CHATTERBOX_DTYPE (default float32 on CPU, "
                             "bfloat16,float32 on CUDA)")
    parser.add_argument("--throughput-format", default=None,
                        help="format of the handler-path rows (default: the first of --formats)")
    parser.add_argument("--concurrency", default=None, help="N values (default 1,2,4 on CPU, 1,8,32,64 on CUDA)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per row (default 3)")
    parser.add_argument("--upstream-jobs", type=int, default=None, help="sequential upstream jobs (default 3)")
    parser.add_argument("--agreement-tokens", type=int, default=None,
                        help="greedy tokens compared with float32 (default min(tokens, 100))")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="time guard: rows that would end later are skipped (and reported)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default bench/throughput.json)")
    parser.add_argument("--append-results", action="store_true", help="append a section to bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: tiny checkpoint, 40 tokens, N=1,2, 1 repetition, 2 upstream jobs")
    # internal: one side in this process
    parser.add_argument("--side", choices=("upstream", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--throughput", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:
        args.concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else []
        return side_main(args)

    started = time.time()
    kill_at = deadline = None
    if args.max_seconds:
        kill_at = started + args.max_seconds - 3
        deadline = started + args.max_seconds - 10
    quick = QUICK if args.quick else {}
    size = args.size or quick.get("size", "full")
    tokens = args.tokens or quick.get("tokens", 250)
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    formats = [x.strip() for x in (args.formats or ("bfloat16,float32" if cuda else "float32")).split(",") if x.strip()]
    concurrency = args.concurrency or quick.get("concurrency") or ("1,8,32,64" if cuda else "1,2,4")
    repeats = args.repeats or quick.get("repeats", 3)
    upstream_jobs = args.upstream_jobs or quick.get("upstream_jobs", 3)
    tp_format = args.throughput_format or formats[0]
    if tp_format not in formats:
        formats.append(tp_format)
    compare = "float32" in formats and len(formats) > 1
    agreement_tokens = (args.agreement_tokens or min(tokens, 100)) if compare else 0
    out = args.out or (Path(tempfile.gettempdir()) / "throughput-quick.json" if args.quick
                       else ROOT / "bench" / "throughput.json")

    work = scratch_dir("cbw-throughput-")
    report: dict = {"date": datetime.date.today().isoformat(), "command": reproducing_command(args, argv),
                    "machine": machine(), "device": device, "tokens": tokens, "text": TEXT,
                    "formats": formats, "throughput_format": tp_format,
                    "concurrency": [int(c) for c in concurrency.split(",")], "repeats": repeats,
                    "upstream_jobs": upstream_jobs, "greedy": GREEDY if compare else None,
                    "agreement_tokens": agreement_tokens, "max_seconds": args.max_seconds,
                    "sides": {}, "skipped": [],
                    "notes": ["upstream generate runs sequentially: its audio s per wall s is a "
                              "constant rate, so a few jobs measure it",
                              "every side runs in its own subprocess; peak RSS is that process's "
                              "ru_maxrss at its end",
                              "greedy agreement: temperature 1e-4, min_p 0, top_p 1, repetition "
                              "penalty 1.2, cfg 0.5, same seed; prefix = common prefix / tokens, "
                              "positions = position-wise matches / tokens"]}
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / f"checkpoint-{size}"
        print(f"[throughput_bench] building a random {size} checkpoint in {checkpoint}", file=sys.stderr, flush=True)
        report["checkpoint_built"] = build_checkpoint(size, checkpoint)
    report["checkpoint"] = str(checkpoint)

    base = ["--checkpoint", str(checkpoint), "--device", device, "--tokens", str(tokens),
             "--workdir", str(work), "--upstream-jobs", str(upstream_jobs)]
    plan = [("upstream", None, False)]
    plan += [("ours", fmt, False) for fmt in formats if fmt != tp_format]
    plan += [("ours", tp_format, True)]
    load_estimate = None
    for kind, fmt, throughput in plan:
        key = "upstream" if kind == "upstream" else fmt
        if deadline is not None and load_estimate is not None and time.time() + load_estimate + 5 > deadline:
            report["skipped"].append({"row": f"side {key} (all its rows)", "reason": "time guard (--max-seconds)"})
            continue
        argv_side = base + ["--side", kind]
        if deadline is not None:
            argv_side += ["--deadline", str(deadline)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env.pop("CHATTERBOX_DTYPE", None)
        if kind == "ours":
            env["CHATTERBOX_DTYPE"] = fmt
            if agreement_tokens:
                argv_side += ["--agreement-tokens", str(agreement_tokens)]
            if throughput:
                argv_side += ["--throughput", "--concurrency", concurrency, "--repeats", str(repeats)]
        result = run_side(argv_side, env, kill_at, key)
        report["sides"][key] = result
        if result.get("load_s"):
            load_estimate = max(load_estimate or 0, result["load_s"])
        for item in result.get("skipped", []):
            report["skipped"].append(item)
        if result.get("killed"):
            report["skipped"].append({"row": f"side {key}: rows after its last reported one",
                                      "reason": result["killed"]})
        if result.get("error"):
            print(f"[throughput_bench] side {key} failed: {result['error']}", file=sys.stderr, flush=True)
    report["throughput_side"] = tp_format
    tp = report["sides"].get(tp_format) or {}
    fallback = report["sides"].get("float32") or {}
    if (tp_format != "float32" and tp.get("error") and not tp.get("rows") and fallback.get("done")
            and (deadline is None or load_estimate is None or time.time() + load_estimate + 5 < deadline)):
        # The handler-path rows matter more than which format they ran in.
        key = "float32 (throughput fallback)"
        report["notes"].append(f"the {tp_format} side failed before its handler-path rows "
                               f"({tp['error'][:200]}); they ran in float32 instead")
        argv_side = base + ["--side", "ours", "--skip-decode", "--throughput", "--concurrency",
                            concurrency, "--repeats", str(repeats)]
        if deadline is not None:
            argv_side += ["--deadline", str(deadline)]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "CHATTERBOX_DTYPE": "float32"}
        result = run_side(argv_side, env, kill_at, key)
        report["sides"][key] = result
        report["throughput_side"], report["throughput_format"] = key, "float32"
        report["skipped"] += result.get("skipped", [])
        if result.get("killed"):
            report["skipped"].append({"row": f"side {key}: rows after its last reported one",
                                      "reason": result["killed"]})
    for side in report["sides"].values():  # the GPU is named by the sides (the parent never touches CUDA)
        if (side.get("machine") or {}).get("gpu"):
            report["machine"]["gpu"] = side["machine"]["gpu"]
    model = next((s.get("model") for s in report["sides"].values() if s.get("model")), None)
    kind = (model or {}).get("size", "unknown size")
    if args.checkpoint is None:
        kind = f"random, {kind}, built with `python -m chatterbox_worker.tiny_model DIR --size {size}`"
    report["checkpoint_kind"] = kind
    report["summary"] = summarise(report)
    report["wall_s"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(tables(report))
    print(f"\nJSON: {out}  (whole run {report['wall_s']} s)")
    if args.append_results:
        append_results(report)
        print(f"appended to {RESULTS_MD}")
    return 0 if all(not s.get("error") for s in report["sides"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

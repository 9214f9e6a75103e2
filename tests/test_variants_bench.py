"""bench/variants_bench.py runs end to end on a tiny checkpoint (structure only, no timing).

Both sides of a variant make the same number of speech tokens (the bench forces
it), and every figure its table reports is there. Turbo: its upstream loader
is the one the bench patches most for a shrunk checkpoint (GPT-2's size table,
the mean-flow S3Gen), and it is the quickest of the three.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 4
SILENCE_TOKENS = 3  # upstream turbo's S3GEN_SIL x 3, on both sides


def test_variants_bench_reports_every_figure_for_equal_work(turbo_checkpoint, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "turbo-tiny").symlink_to(turbo_checkpoint)  # reused, not rebuilt
    out = tmp_path / "variants.json"
    done = subprocess.run(
        [sys.executable, "bench/variants_bench.py", "--size", "tiny", "--variants", "turbo",
         "--tokens", str(TOKENS), "--repeats", "2", "--checkpoint-dir", str(checkpoints),
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checkpoints"]["turbo"]["built"] is False
    [row] = report["summary"]
    assert row["error"] is None and row["upstream_class"] == "ChatterboxTurboTTS"
    for key in ("upstream_ms_per_token", "ours_ms_per_token", "ms_per_token_ratio", "upstream_rtf",
                "ours_rtf", "ours_ttfa_s", "ttfa_ratio_to_upstream_total"):
        assert row[key] is not None and row[key] > 0, key
    assert row["repeats"] == [2, 2, 2]
    audio_s = (TOKENS + SILENCE_TOKENS) * 960 / 24000
    assert row["upstream_audio_s"] == row["ours_audio_s"] == audio_s
    sides = report["sides"]["turbo"]
    assert [r["tokens"] for r in sides["upstream"]["upstream"]["reps"]] == [TOKENS, TOKENS]
    assert [r["tokens"] for r in sides["ours"]["ours"]["one_shot_reps"]] == [TOKENS, TOKENS]
    assert row["ours_engine"]["flow_steps"] == 2
    assert "| turbo (`ChatterboxTurboTTS`) |" in done.stdout

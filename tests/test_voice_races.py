"""Several workers on one volume: racing writers, deleters and readers; invalidation across processes."""

import subprocess
import sys
import textwrap

import pytest
import torch

from chatterbox_worker.errors import VoiceNotFound
from chatterbox_worker.voices import VoiceStore
from tests.conftest import ROOT, worker_env
from tests.test_voices import SIGNATURE, conditionals, voice_bytes

# A worker process acting on the shared directory in a loop for a while. It
# reports every outcome; anything but the documented ones is a failure.
ACTOR = textwrap.dedent("""
    import collections, sys, time
    from chatterbox_worker.errors import VoiceExists, VoiceNotFound, WorkerError
    from chatterbox_worker.voices import VoiceStore
    from tests.test_voices import SIGNATURE, voice_bytes

    role, directory, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    store = VoiceStore(directory, model_signature=SIGNATURE, variant="original")
    payloads = [voice_bytes("race", seed=s) for s in (1, 2)]
    outcomes = collections.Counter()
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        try:
            if role == "writer":
                store.save("race", payloads[i % 2], overwrite=True)
            elif role == "creator":
                store.save("race", payloads[i % 2], overwrite=False)
            elif role == "deleter":
                store.delete("race")
            else:
                store.load("race")
            outcomes["ok"] += 1
        except (VoiceNotFound, VoiceExists) as exc:
            outcomes[exc.code] += 1
        except WorkerError as exc:  # a torn or half-written file would land here
            outcomes["BAD " + exc.code + ": " + exc.message] += 1
        except Exception as exc:
            outcomes["ESCAPED " + type(exc).__name__ + ": " + str(exc)] += 1
    print(dict(outcomes))
""")


def start(role, directory, seconds):
    return subprocess.Popen([sys.executable, "-c", ACTOR, role, str(directory), str(seconds)],
                            cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, text=True)


def test_upload_delete_and_read_race_without_torn_files_or_escapes(tmp_path):
    actors = {role: start(role, tmp_path, 6.0)
              for role in ("writer", "creator", "deleter", "reader")}
    results = {}
    for role, process in actors.items():
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results[role] = eval(out.strip().splitlines()[-1])
    for role, outcomes in results.items():
        bad = [k for k in outcomes if k.startswith(("BAD", "ESCAPED"))]
        assert not bad, (role, outcomes)
    assert results["reader"].get("ok", 0) > 0 and results["writer"].get("ok", 0) > 0
    assert results["deleter"].get("ok", 0) > 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


OTHER_WORKER = textwrap.dedent("""
    import sys
    from chatterbox_worker.voices import VoiceStore
    from tests.test_voices import SIGNATURE, voice_bytes
    store = VoiceStore(sys.argv[1], model_signature=SIGNATURE, variant="original")
    if sys.argv[2] == "replace":
        store.save("shared", voice_bytes("shared", seed=int(sys.argv[3])), overwrite=True)
    else:
        store.delete("shared")
""")


def other_worker(directory, *args):
    subprocess.run([sys.executable, "-c", OTHER_WORKER, str(directory), *args], cwd=ROOT,
                   env=worker_env(), check=True, timeout=120)


def test_replacement_and_deletion_by_another_worker_are_seen_on_the_next_job(tmp_path):
    store = VoiceStore(tmp_path, model_signature=SIGNATURE, variant="original")
    store.save("shared", voice_bytes("shared", seed=1), overwrite=False)
    first = store.load("shared").conditionals.speaker_emb
    assert torch.equal(first, conditionals(1).speaker_emb)
    mtime = store.path_for("shared").stat().st_mtime_ns

    other_worker(tmp_path, "replace", "2")  # same size file, other content
    import os

    os.utime(store.path_for("shared"), ns=(mtime, mtime))  # even with the old mtime
    assert torch.equal(store.load("shared").conditionals.speaker_emb, conditionals(2).speaker_emb)

    other_worker(tmp_path, "delete")
    with pytest.raises(VoiceNotFound):
        store.load("shared")

"""RunPod serverless entry point for the Chatterbox TTS worker.

Importing this module reads the settings and loads and warms the model (a
malformed setting stops it at start-up; a model that cannot load leaves it
up, answering each job with ``model_unavailable`` and the reason); running it
starts the RunPod worker, or with no RunPod job queue in the environment runs
``test_input.json`` locally and saves the audio under ``output/``. With
``WORKER_MODE=server`` running it starts the HTTP server instead
(``python -m chatterbox_worker.server``).
"""

import logging
import os
import sys

from chatterbox_worker.config import load_settings
from chatterbox_worker.startup import failure_line, start_runner


def _progress(job, progress):
    import runpod

    runpod.serverless.progress_update(job, progress)


def _local_run() -> bool:
    """``python handler.py`` without a RunPod queue or the dev API: the test_input.json run."""
    serve_api = any(arg.startswith("--rp_serve_api") for arg in sys.argv[1:])
    return __name__ == "__main__" and not serve_api and not os.environ.get("RUNPOD_WEBHOOK_GET_JOB")


def _start():
    try:
        settings = load_settings()
        if settings.worker_mode == "server" and __name__ == "__main__":
            # One image, one command: WORKER_MODE=server serves HTTP instead (issue 12).
            from chatterbox_worker.server.__main__ import main

            sys.exit(main())
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Progress updates go to RunPod's job API, which exists only on the platform.
        on_platform = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))
        # A model that cannot load: a worker stays up and answers each job
        # with model_unavailable (startup.py); the local run exits with the line.
        return start_runner(settings, progress=_progress if on_platform else None,
                            stay_up=not _local_run())
    except Exception as exc:  # one line, no traceback: the operator reads this in RunPod's log
        print(f"chatterbox-worker: cannot start: {failure_line(exc)}", file=sys.stderr)
    sys.exit(2)


runner = _start()


async def handler(job):
    """Generator handler: every yielded item is one streamed partial of the job.

    Async so that RunPod's cancel reaches the job between chunks and the
    worker keeps answering pings while it synthesises (the work itself runs
    in a thread)."""
    async for item in runner.run_async(job):
        yield item


if __name__ == "__main__":
    if _local_run():
        from pathlib import Path

        from chatterbox_worker.local_test import read_job, run_job

        here = Path(__file__).resolve().parent
        sys.exit(run_job(runner.run, read_job(sys.argv[1:], here / "test_input.json"), here / "output"))

    import runpod

    runpod.serverless.start({
        "handler": handler,
        "return_aggregate_stream": True,
        "concurrency_modifier": lambda current: runner.settings.concurrency,
    })

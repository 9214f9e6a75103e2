"""HTTP server mode: the original REST API, OpenAI's speech API and RunPod load-balancing
endpoints, over the same service as the RunPod worker (``python -m chatterbox_worker.server``).

The only package that knows FastAPI.
"""

from .app import create_app

__all__ = ["create_app"]

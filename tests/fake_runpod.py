"""A small local stand-in for RunPod's job queue, for end-to-end tests of the production path.

It serves both sides of the platform over real HTTP on loopback:

- the worker protocol the runpod SDK speaks in production: the job-take URL
  (``RUNPOD_WEBHOOK_GET_JOB``), the job-stop long-poll derived from it, the
  stream and output webhooks and the ping;
- the endpoint routes the official client (``runpod.Endpoint``) calls:
  ``/run``, ``/runsync``, ``/status/{id}``, ``/stream/{id}``, ``/cancel/{id}``.

Jobs are kept in memory with their status, streamed items and output, the
way the platform reports them (stream items handed out once each).

For cancellation tests a job's stream can be held (``hold_stream_of_next_job``):
from its n-th item on, a stream post is answered only once the worker has acted
on the job's stop signal, so the test decides where the job stands when the stop
arrives instead of racing the worker's decoding against the stop channel.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ENDPOINT = "test-endpoint"
WORKER = "worker-1"
HOLD_LIMIT_S = 300  # a held stream post is answered after this at the latest


class Job:
    def __init__(self, job_input):
        self.id = f"job-{uuid.uuid4().hex[:12]}"
        self.input = job_input
        self.status = "IN_QUEUE"
        self.stream = []  # items posted by the worker
        self.handed_out = 0  # stream items already returned by /stream
        self.output = None
        self.error = None
        self.first_stream_at = None
        self.done_at = None
        self.stream_posts_after_cancel = 0
        self.progress = []  # progress_update payloads, in order
        self.stream_posts = 0  # every stream post, before or after a cancel
        self.hold_after = None  # hold stream posts once this many were answered
        self.held = 0  # stream posts that were held
        self.stop_delivered = False  # the worker's stop poll has returned this job's id
        self.stop_acted_on = False  # ...and the worker has polled again since: it acted on it


class FakeRunPod:
    def __init__(self):
        self.jobs = {}
        self.queue = []
        self.to_stop = []
        self.next_hold_after = None
        self.closing = False
        self.lock = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}/v2"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def worker_env(self) -> dict:
        root = f"{self.base}/{ENDPOINT}"
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{root}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{root}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{root}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_PING": f"{root}/ping/$RUNPOD_POD_ID?gpu=test",
            "RUNPOD_POD_ID": WORKER, "RUNPOD_AI_API_KEY": "test-key", "RUNPOD_ENDPOINT_ID": ENDPOINT,
            "RUNPOD_PING_INTERVAL": "10000",
        }

    def stop(self):
        with self.lock:
            self.closing = True  # answer every held post
            self.lock.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- test controls -------------------------------------------------------

    def hold_stream_of_next_job(self, after: int) -> None:
        """The next submitted job's stream posts are held from its ``after``+1-th on, until
        the worker has acted on that job's stop signal."""
        with self.lock:
            self.next_hold_after = after

    def wait_until_held(self, job_id, timeout=HOLD_LIMIT_S) -> bool:
        """Block until the worker is waiting on a held stream post of ``job_id``."""
        with self.lock:
            return self.lock.wait_for(lambda: self.jobs[job_id].held > 0, timeout=timeout)

    def wait_until_stop_acted_on(self, job_id, timeout=HOLD_LIMIT_S) -> bool:
        """Block until the worker has taken ``job_id``'s stop signal and polled again."""
        with self.lock:
            return self.lock.wait_for(lambda: self.jobs[job_id].stop_acted_on, timeout=timeout)

    # -- state changes, under the lock --------------------------------------

    def submit(self, job_input) -> Job:
        with self.lock:
            job = Job(job_input)
            job.hold_after, self.next_hold_after = self.next_hold_after, None
            self.jobs[job.id] = job
            self.queue.append(job)
            self.lock.notify_all()
            return job

    def take(self, wait_s=2.0):
        with self.lock:
            if not self.lock.wait_for(lambda: self.queue, timeout=wait_s):
                return None
            job = self.queue.pop(0)
            job.status = "IN_PROGRESS"
            return job

    def stop_signals(self, wait_s=2.0):
        with self.lock:
            # The SDK polls again only after it has stopped every job the last poll named.
            for job in self.jobs.values():
                if job.stop_delivered and not job.stop_acted_on:
                    job.stop_acted_on = True
                    self.lock.notify_all()
            self.lock.wait_for(lambda: self.to_stop, timeout=wait_s)
            ids, self.to_stop = self.to_stop, []
            for job_id in ids:
                self.jobs[job_id].stop_delivered = True
            return ids

    def post_stream(self, job_id, item):
        """Record one stream post; hold it first if the job's stream is held."""
        with self.lock:
            job = self.jobs[job_id]
            job.stream_posts += 1
            if job.status == "CANCELLED":
                job.stream_posts_after_cancel += 1
            else:
                job.stream.append(item)
                job.first_stream_at = job.first_stream_at or time.monotonic()
            if job.hold_after is not None and job.stream_posts > job.hold_after:
                job.held += 1
                self.lock.notify_all()
                self.lock.wait_for(lambda: job.stop_acted_on or self.closing, timeout=HOLD_LIMIT_S)

    def cancel(self, job_id):
        with self.lock:
            job = self.jobs[job_id]
            if job.status in ("IN_QUEUE", "IN_PROGRESS"):
                if job in self.queue:
                    self.queue.remove(job)
                else:
                    self.to_stop.append(job_id)
                job.status = "CANCELLED"
                self.lock.notify_all()
            return job

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status, payload=None):
                body = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _route(self):
                parts = urlsplit(self.path).path.strip("/").split("/")
                return parts[2:] if len(parts) >= 3 and parts[0] == "v2" else None

            def do_GET(self):
                route = self._route()
                if route is None:
                    return self._send(404, {"error": "not found"})
                kind = route[0]
                if kind == "job-take":
                    job = fake.take()
                    return self._send(204) if job is None else self._send(200, {"id": job.id, "input": job.input})
                if kind == "job-stop":
                    ids = fake.stop_signals()
                    return self._send(200, {"jobsToStop": ids}) if ids else self._send(204)
                if kind == "ping":
                    return self._send(200, {})
                if kind in ("status", "stream") and len(route) == 2:
                    with fake.lock:
                        job = fake.jobs.get(route[1])
                        if job is None:
                            return self._send(404, {"error": "job not found"})
                        answer = {"id": job.id, "status": job.status}
                        if kind == "stream":
                            answer["stream"] = [{"output": item} for item in job.stream[job.handed_out:]]
                            job.handed_out = len(job.stream)
                        elif job.status == "COMPLETED":
                            answer["output"] = job.output
                        elif job.status == "IN_PROGRESS" and job.progress:
                            answer["output"] = job.progress[-1]
                        if job.error is not None:
                            answer["error"] = job.error
                    return self._send(200, answer)
                return self._send(404, {"error": "not found"})

            def do_POST(self):
                route = self._route()
                if route is None:
                    return self._send(404, {"error": "not found"})
                kind = route[0]
                body = self._body()
                if kind == "job-stream":
                    data = json.loads(body or b"{}")
                    fake.post_stream(route[-1], data.get("output"))
                    try:
                        return self._send(200, {})
                    except (BrokenPipeError, ConnectionResetError):
                        return None  # a held post the stopped worker gave up on
                if kind == "job-done":
                    data = json.loads(body or b"{}")
                    with fake.lock:
                        job = fake.jobs[route[-1]]
                        if data.get("status") == "IN_PROGRESS":  # runpod's progress_update
                            job.progress.append(data.get("output"))
                            return self._send(200, {})
                        job.done_at = time.monotonic()
                        if job.status != "CANCELLED":
                            if data.get("error"):
                                job.status, job.error = "FAILED", str(data["error"])
                            else:
                                job.status, job.output = "COMPLETED", data.get("output")
                        fake.lock.notify_all()
                    return self._send(200, {})
                if kind in ("run", "runsync"):
                    payload = json.loads(body or b"{}")
                    job = fake.submit(payload.get("input"))
                    if kind == "runsync":
                        with fake.lock:
                            deadline = time.monotonic() + 300
                            while job.status in ("IN_QUEUE", "IN_PROGRESS") and time.monotonic() < deadline:
                                fake.lock.wait(timeout=1)
                            answer = {"id": job.id, "status": job.status}
                            if job.output is not None:
                                answer["output"] = job.output
                            if job.error is not None:
                                answer["error"] = job.error
                        return self._send(200, answer)
                    return self._send(200, {"id": job.id, "status": "IN_QUEUE"})
                if kind == "cancel" and len(route) == 2:
                    job = fake.cancel(route[1])
                    return self._send(200, {"id": job.id, "status": job.status})
                return self._send(404, {"error": "not found"})

        return Handler

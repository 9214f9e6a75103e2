"""``GET /metrics`` in Prometheus' text format: requests, load, time to first audio, real-time factor.

Written out by hand (a few counters and two histograms do not need a client
library); observations come from the event loop and from stream-closing
threads, hence the lock.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Sequence, Tuple

from ..service import JobSummary

PREFIX = "chatterbox"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        self.name = name
        self.help = help_text
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> List[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{self.name}_bucket{{le="{bound:g}"}} {count}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                  f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Dict[Tuple[str, str, int], int] = {}
        self.outcomes: Dict[str, int] = {}
        self.ttfa = Histogram(f"{PREFIX}_time_to_first_audio_seconds",
                              "Seconds from the start of a synthesis to its first encoded bytes.",
                              (0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30))
        self.rtf = Histogram(f"{PREFIX}_real_time_factor",
                             "Seconds taken per second of audio, per finished request.",
                             (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10))

    def count_request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe(self, summary: JobSummary) -> None:
        """A finished synthesis: its outcome, and its timings when it ran to the end."""
        with self._lock:
            self.outcomes[summary.outcome] = self.outcomes.get(summary.outcome, 0) + 1
            if summary.outcome != "ok" or not summary.audio_s:
                return
            if summary.ttfa_s is not None:
                self.ttfa.observe(summary.ttfa_s)
            self.rtf.observe(summary.total_s / summary.audio_s)

    def render(self, *, running: int, queued: int, batch: int) -> str:
        with self._lock:
            lines = [f"# HELP {PREFIX}_http_requests_total HTTP requests answered, by route "
                     f"and status.", f"# TYPE {PREFIX}_http_requests_total counter"]
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'{PREFIX}_http_requests_total{{method="{method}",route="{route}",'
                             f'status="{status}"}} {n}')
            lines += [f"# HELP {PREFIX}_syntheses_total Syntheses ended, by outcome.",
                      f"# TYPE {PREFIX}_syntheses_total counter"]
            for outcome, n in sorted(self.outcomes.items()):
                lines.append(f'{PREFIX}_syntheses_total{{outcome="{outcome}"}} {n}')
            for name, help_text, value in (
                    ("running_requests", "Requests holding a synthesis slot.", running),
                    ("queued_requests", "Requests waiting for a synthesis slot.", queued),
                    ("batch_size", "Requests in the engine's current decode step.", batch)):
                lines += [f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} gauge",
                          f"{PREFIX}_{name} {value}"]
            lines += self.ttfa.render() + self.rtf.render()
        return "\n".join(lines) + "\n"

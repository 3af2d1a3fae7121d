"""Server metrics in Prometheus' text exposition format (version 0.0.4), written out by hand: a few counters,
gauges read from the engine thread's snapshot, and two latency histograms.

    nanoseek_http_requests_total{path,status}       every HTTP request the server answered
    nanoseek_requests_finished_total{finish_reason} generation requests by outcome: stop, length, abort, error
    nanoseek_prompt_tokens_total                    prompt tokens of admitted requests (once per prompt)
    nanoseek_generation_tokens_total                tokens generated (all samples)
    nanoseek_requests_waiting / _running            queue depth and requests being decoded
    nanoseek_sequences_running                      samples in the running batch (n > 1 counts n)
    nanoseek_kv_cache_usage_ratio                   used / total latent-cache blocks (also _blocks_used, _blocks_total)
    nanoseek_engine_steps_total, nanoseek_preemptions_total, nanoseek_requests_aborted_total,
    nanoseek_engine_step_failures_total, nanoseek_engine_up
    nanoseek_time_to_first_token_seconds, nanoseek_request_latency_seconds   histograms
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from nanoseek.server.async_engine import EngineSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cum = [], 0
        for le, c in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            cum += c
            out.append(f'{name}_bucket{{le="{le}"}} {cum}')
        return out + [f"{name}_sum {self.sum}", f"{name}_count {cum}"]


class ServerMetrics:
    """Counters updated on the event loop (single-threaded, so no locks)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.http: dict[tuple[str, int], int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.latency = Histogram()

    def render(self, snap: EngineSnapshot, engine_up: bool) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]] | float) -> None:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            for labels, value in samples if isinstance(samples, list) else [("", samples)]:
                lines.append(f"{name}{labels} {value}")

        metric(
            "nanoseek_http_requests_total",
            "counter",
            "HTTP requests answered, by path and status.",
            [(f'{{path="{p}",status="{s}"}}', v) for (p, s), v in sorted(self.http.items())],
        )
        metric(
            "nanoseek_requests_finished_total",
            "counter",
            "Generation requests by outcome.",
            [(f'{{finish_reason="{r}"}}', v) for r, v in sorted(self.finished.items())],
        )
        metric("nanoseek_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens)
        metric("nanoseek_generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
        metric("nanoseek_requests_waiting", "gauge", "Requests queued, not yet decoding.", snap.waiting_requests)
        metric("nanoseek_requests_running", "gauge", "Requests being decoded.", snap.running_requests)
        metric("nanoseek_sequences_running", "gauge", "Samples in the running batch.", snap.running_sequences)
        ratio = snap.cache_blocks_used / snap.cache_blocks_total if snap.cache_blocks_total else 0.0
        metric("nanoseek_kv_cache_usage_ratio", "gauge", "Fraction of latent-cache blocks in use.", ratio)
        metric("nanoseek_kv_cache_blocks_used", "gauge", "Latent-cache blocks in use.", snap.cache_blocks_used)
        metric("nanoseek_kv_cache_blocks_total", "gauge", "Latent-cache blocks.", snap.cache_blocks_total)
        metric("nanoseek_engine_steps_total", "counter", "Engine steps run.", snap.steps)
        metric("nanoseek_preemptions_total", "counter", "Sequences preempted for cache room.", snap.preemptions)
        metric(
            "nanoseek_prefix_cache_queries_total", "counter", "Prompt tokens prefilled or cached.", snap.prompt_tokens
        )
        metric(
            "nanoseek_prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache.",
            snap.cached_prompt_tokens,
        )
        hit_rate = snap.cached_prompt_tokens / snap.prompt_tokens if snap.prompt_tokens else 0.0
        metric("nanoseek_prefix_cache_hit_rate", "gauge", "Share of prompt tokens found in the prefix cache.", hit_rate)
        metric("nanoseek_requests_aborted_total", "counter", "Requests dropped because the client left.", snap.aborted)
        metric("nanoseek_engine_step_failures_total", "counter", "Engine steps that raised.", snap.failed_steps)
        metric("nanoseek_engine_up", "gauge", "1 while the engine thread runs.", int(engine_up))
        for name, hist, help_ in [
            ("nanoseek_time_to_first_token_seconds", self.ttft, "Time to first token."),
            ("nanoseek_request_latency_seconds", self.latency, "Request latency, end to end."),
        ]:
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name)])
        return "\n".join(lines) + "\n"

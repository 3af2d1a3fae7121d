"""`nanoseek bench serve`: N concurrent streaming clients against an OpenAI-compatible server.

    nanoseek bench serve --model runs/tiny --clients 32 --requests 64 --max-tokens 128 --price-per-hour 0.10
    nanoseek bench serve --url http://127.0.0.1:8000 --api-key KEY

Each client sends streaming chat completions (`ignore_eos`, so every answer is --max-tokens long) one after
another until --requests have been sent in all. Reported per round, then as medians over rounds: aggregate
output tokens/s (completion tokens / wall time of the round), time to first token and inter-token latency
(per token: the requests ask for `logprobs`, so every token is announced even when its text is held back,
e.g. part of a UTF-8 character) at p50 and p99, and the cost of a million output tokens at --price-per-hour.
With --system-prompt-tokens N every request starts with the same system message of about N tokens and its
user message ends with the request's number (what prefix caching serves: a shared prefix, distinct tails);
the prompt tokens the server found cached (`usage.prompt_tokens_details.cached_tokens`) are reported.
--server-flags passes flags to the server started with --model (written with `=`, since its value starts with
a dash: `--server-flags=--no-prefix-caching`).

With --model the benchmark starts the server itself (on a free loopback port) and, interleaved with the
server rounds, runs the same requests on the engine in-process (`Engine.generate`, no HTTP): the ratio of
the two throughputs is what the serving layer costs. Clients and server share this machine's cores.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from nanoseek.engine.engine import Engine
from nanoseek.engine.sampling import SamplingParams


@dataclass
class BenchConfig:
    url: str | None = None
    model: str | None = None
    api_key: str | None = None
    clients: int = 32
    requests: int = 64
    max_tokens: int = 128
    prompt: str = "Tell me a story about a dragon and a knight."
    price_per_hour: float = 1.0
    rounds: int = 3
    max_batch_size: int = 32
    threads: int | None = None  # torch threads of the server and the in-process engine (default: torch's)
    system_prompt_tokens: int = 0  # a shared system message of about this many tokens (0: none)
    server_flags: str = ""  # more `nanoseek serve` flags for the server started with --model


@dataclass
class RoundResult:
    tokens: int
    wall_s: float
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


class ServerProcess:
    """`python -m nanoseek.cli serve --model DIR --port <free port> [flags]` as a child process."""

    def __init__(self, model: str | os.PathLike, *flags: str, log: Path | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = log.open("wb") if log else subprocess.DEVNULL
        root = str(Path(__file__).resolve().parents[2])  # the child imports this same nanoseek
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(model), "--port", str(self.port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 120) -> ServerProcess:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with status {self.proc.returncode}"
                    + (f":\n{self.log.read_text()}" if self.log else "")
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


async def _one_request(http: httpx.AsyncClient, body: dict, result: RoundResult) -> None:
    t0 = time.perf_counter()
    last = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the server answered {r.status_code}: {(await r.aread()).decode()[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"generation failed: {chunk['error']['message']}")
            if chunk.get("usage"):
                result.tokens += chunk["usage"]["completion_tokens"]
                result.prompt_tokens += chunk["usage"]["prompt_tokens"]
                details = chunk["usage"].get("prompt_tokens_details") or {}
                result.cached_tokens += details.get("cached_tokens") or 0
            n = sum(len((c.get("logprobs") or {}).get("content") or []) for c in chunk["choices"])
            if n:  # tokens in this chunk (logprobs name each one, even those whose text is held back)
                now = time.perf_counter()
                if last is None:
                    result.ttft_s.append(now - t0)
                    n -= 1
                else:
                    result.itl_s.extend([(now - last) / n] * n)
                last = now


def system_prompt(n_tokens: int) -> str:
    """About n_tokens tokens of text (digits are one token each in nanoseek's tokenizers)."""
    return " ".join(str(i * 7919 % 100000) for i in range(n_tokens // 6))


def _messages(cfg: BenchConfig, i: int) -> list[dict]:
    if not cfg.system_prompt_tokens:
        return [{"role": "user", "content": cfg.prompt}]
    return [
        {"role": "system", "content": system_prompt(cfg.system_prompt_tokens)},
        {"role": "user", "content": f"{cfg.prompt} (request {i})"},
    ]


async def _server_round(url: str, model: str, cfg: BenchConfig) -> RoundResult:
    body = {
        "model": model,
        "max_tokens": cfg.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
    }
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RoundResult(tokens=0, wall_s=0.0)
    left = cfg.requests

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await _one_request(http, {**body, "messages": _messages(cfg, left)}, result)

    limits = httpx.Limits(max_connections=cfg.clients + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(cfg.clients)))
        result.wall_s = time.perf_counter() - t0
    return result


def _engine_round(engine: Engine, cfg: BenchConfig) -> RoundResult:
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template(_messages(cfg, i))) for i in range(cfg.requests)]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    return RoundResult(tokens=sum(len(o.outputs[0].token_ids) for o in outs), wall_s=wall)


def run_bench(cfg: BenchConfig) -> dict:
    server = engine = None
    if cfg.model:
        print(f"starting `nanoseek serve --model {cfg.model}` on a free loopback port ...", flush=True)
        threads = ["--threads", str(cfg.threads)] if cfg.threads else []
        flags = shlex.split(cfg.server_flags)
        server = ServerProcess(
            cfg.model, "--max-batch-size", str(cfg.max_batch_size), "--log-level", "warning", *threads, *flags
        )
        server.wait_ready()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        engine = Engine(cfg.model, max_batch_size=cfg.max_batch_size)
    url = server.url if server else cfg.url.rstrip("/").removesuffix("/v1")
    try:
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
        print(
            f"{cfg.clients} streaming clients, {cfg.requests} requests x {cfg.max_tokens} tokens, model `{model}`"
            f" at {url}",
            flush=True,
        )
        asyncio.run(
            _server_round(url, model, BenchConfig(**{**cfg.__dict__, "requests": 2, "clients": 2, "max_tokens": 8}))
        )  # warm-up
        served, alone = [], []
        for k in range(cfg.rounds):
            served.append(asyncio.run(_server_round(url, model, cfg)))
            line = (
                f"round {k + 1}: server {served[-1].tokens_per_s:8.1f} tok/s, TTFT p50 "
                f"{percentile(served[-1].ttft_s, 50) * 1e3:.0f} ms, "
                f"ITL p50 {percentile(served[-1].itl_s, 50) * 1e3:.1f} ms, "
                f"{served[-1].cached_tokens} of {served[-1].prompt_tokens} prompt tokens cached"
            )
            if engine is not None:
                alone.append(_engine_round(engine, cfg))
                line += f" | engine in-process {alone[-1].tokens_per_s:8.1f} tok/s"
            print(line, flush=True)
    finally:
        if server:
            server.stop()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    tps = med([r.tokens_per_s for r in served])
    summary = {
        "output_tokens_per_s": tps,
        "ttft_p50_s": med([percentile(r.ttft_s, 50) for r in served]),
        "ttft_p99_s": med([percentile(r.ttft_s, 99) for r in served]),
        "itl_p50_s": med([percentile(r.itl_s, 50) for r in served]),
        "itl_p99_s": med([percentile(r.itl_s, 99) for r in served]),
        "usd_per_million_output_tokens": cfg.price_per_hour / 3600 / tps * 1e6,
        "cached_prompt_share": sum(r.cached_tokens for r in served) / max(1, sum(r.prompt_tokens for r in served)),
    }
    print(f"median of {cfg.rounds} rounds:")
    print(f"  output tokens/s            {tps:10.1f}")
    print(
        f"  time to first token        p50 {summary['ttft_p50_s'] * 1e3:8.1f} ms   "
        f"p99 {summary['ttft_p99_s'] * 1e3:8.1f} ms"
    )
    print(
        f"  inter-token latency        p50 {summary['itl_p50_s'] * 1e3:8.1f} ms   "
        f"p99 {summary['itl_p99_s'] * 1e3:8.1f} ms"
    )
    print(
        f"  cost per 1M output tokens  ${summary['usd_per_million_output_tokens']:.2f} "
        f"at ${cfg.price_per_hour:.2f}/hour"
    )
    if alone:
        engine_tps = med([r.tokens_per_s for r in alone])
        summary["engine_tokens_per_s"] = engine_tps
        print(f"  engine in-process          {engine_tps:10.1f} tok/s   server / engine = {tps / engine_tps:.2f}")
    return summary

"""`nanoseek serve`, `nanoseek chat` and `nanoseek bench serve`: the OpenAI-compatible server, the terminal
chat, and concurrent streaming clients against a server (see docs/server.md)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

import torch

from nanoseek.cli import chat
from nanoseek.cli.flags import add_allow_nonfinite_weights, add_engine_weights
from nanoseek.engine.sampling import SamplingParams
from nanoseek.errors import NanoseekError

try:  # the serve extra (fastapi, uvicorn, httpx) is optional: without it every other command still works
    import uvicorn

    from nanoseek.bench.serve import BenchConfig, run_bench
    from nanoseek.server.app import ServerConfig, create_app

    MISSING_SERVE_EXTRA = None
except ImportError as e:
    if e.name not in ("fastapi", "starlette", "pydantic", "uvicorn", "httpx"):
        raise
    MISSING_SERVE_EXTRA = e.name

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _check_model_dir(path: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise NanoseekError(f"{path} is not a checkpoint directory (no config.json)")
    if not (Path(path) / "tokenizer.json").is_file():
        raise NanoseekError(f"{path} has no tokenizer.json: serving and chat need the checkpoint's tokenizer")


def _is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _need_serve_extra(command: str) -> None:
    if MISSING_SERVE_EXTRA:
        raise NanoseekError(
            f'{command} needs the serve extra ({MISSING_SERVE_EXTRA} is missing): pip install -e ".[serve]"'
        )


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file (its first line) or NANOSEEK_API_KEY; the last two keep it out
    of the command line, which every user of the machine can read (`ps`)."""
    if args.api_key and args.api_key_file:
        raise NanoseekError("give --api-key or --api-key-file, not both")
    if args.api_key_file:
        try:
            key = next(iter(Path(args.api_key_file).read_text().strip().splitlines()), "").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise NanoseekError(f"cannot read --api-key-file: {e}") from None
        if not key:
            raise NanoseekError(f"{args.api_key_file} is empty: it should hold the API key")
        return key
    if args.api_key:
        print(
            "nanoseek serve: warning: --api-key is visible to every user of this machine (ps); "
            "prefer NANOSEEK_API_KEY or --api-key-file",
            file=sys.stderr,
        )
    return args.api_key or os.environ.get("NANOSEEK_API_KEY") or None


def cmd_serve(args: argparse.Namespace) -> None:
    _need_serve_extra("nanoseek serve")

    _check_model_dir(args.model)
    api_key = _api_key(args)
    try:
        cfg = ServerConfig(
            model=args.model,
            host=args.host,
            port=args.port,
            api_key=api_key,
            served_model_name=args.served_model_name,
            max_batch_size=args.max_batch_size,
            cache_tokens=args.cache_tokens,
            max_n=args.max_n,
            max_request_bytes=args.max_request_bytes,
            max_sequences=args.max_sequences,
            max_request_tokens=args.max_request_tokens,
            max_waiting_sequences=args.max_waiting_sequences,
            public_docs_and_metrics=args.public_docs_and_metrics,
            device=args.device,
            allow_nonfinite=args.allow_nonfinite_weights,
            weights=args.weights,
            compile=args.compile,
            prefix_caching=args.prefix_caching,
            max_num_batched_tokens=args.max_num_batched_tokens or None,
        )
    except ValueError as e:
        raise NanoseekError(f"nanoseek serve: {e}") from None
    if not _is_loopback(args.host) and not api_key:
        print(
            f"nanoseek serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
            "machine can use the model",
            file=sys.stderr,
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    # The server's own log lines (a client that left: 499; a failed step) beside uvicorn's, in its format.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))
    server_log = logging.getLogger("nanoseek.server")
    server_log.addHandler(handler)
    server_log.setLevel(args.log_level.upper())
    server_log.propagate = False
    app = create_app(cfg)
    print(
        f"nanoseek serve: model `{cfg.model_name}` at http://{args.host}:{args.port}/v1 "
        f"(auth {'on' if api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=5,
    )


def cmd_chat(args: argparse.Namespace) -> None:
    _check_model_dir(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        params.validate()
    except ValueError as e:
        raise NanoseekError(str(e)) from None
    chat.main(
        args.model,
        params,
        system=args.system,
        device=args.device,
        allow_nonfinite=args.allow_nonfinite_weights,
        weights=args.weights,
        compile=args.compile,
    )


def cmd_bench_serve(args: argparse.Namespace) -> None:
    _need_serve_extra("nanoseek bench serve")
    if bool(args.url) == bool(args.model):
        raise NanoseekError("give either --url of a running server or --model to start one")
    if args.model:
        _check_model_dir(args.model)
    run_bench(BenchConfig(**{k: getattr(args, k) for k in BenchConfig.__dataclass_fields__}))


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="OpenAI-compatible API server (FastAPI + uvicorn) on the engine")
    serve.add_argument("--model", required=True, help="checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every path but /health (visible in `ps`: prefer the "
        "NANOSEEK_API_KEY environment variable or --api-key-file)",
    )
    serve.add_argument("--api-key-file", help="read the API key from this file's first line")
    serve.add_argument(
        "--public-docs-and-metrics",
        action="store_true",
        help="with an API key, leave /metrics, /openapi.json and /docs open (default: they need the key)",
    )
    serve.add_argument("--served-model-name", help="the model name clients use (default: the directory name)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together")
    serve.add_argument("--cache-tokens", type=int, help="latent-cache capacity in tokens (default: the engine's)")
    serve.add_argument("--max-n", type=int, default=128, help="largest `n` (samples per request) accepted")
    serve.add_argument("--max-request-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    serve.add_argument(
        "--max-sequences", type=int, default=256, help="most sequences (prompts x n) in one request; more get 400"
    )
    serve.add_argument(
        "--max-request-tokens",
        type=int,
        default=1 << 20,
        help="most tokens one request may use (prompt tokens + max_tokens x sequences); more get 400",
    )
    serve.add_argument(
        "--max-waiting-sequences",
        type=int,
        default=1024,
        help="sequences that may wait for a batch slot, all requests together; beyond that, 429 + Retry-After",
    )
    serve.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="share the cached latents of common prompt prefixes between requests (default: on)",
    )
    serve.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=1024,
        help="chunked prefill: prompt tokens prefilled per engine step beside the decodes; 0 = whole prompts",
    )
    serve.add_argument("--device", default="cpu", help="cpu or cuda")
    add_allow_nonfinite_weights(serve)
    add_engine_weights(serve)
    serve.add_argument("--threads", type=int, help="torch threads for the engine (default: torch's choice)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="interactive terminal chat with a checkpoint (streams, shows reasoning)")
    chat.add_argument("--model", required=True, help="checkpoint directory")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=int, default=1024, help="longest answer (and the context bounds it)")
    chat.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (DeepSeek suggests 0.6 for R1)")
    chat.add_argument("--top-p", type=float, default=0.95)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--device", default="cpu")
    add_allow_nonfinite_weights(chat)
    add_engine_weights(chat, long_running=False)
    chat.set_defaults(func=cmd_chat)

    b = bench.add_parser("serve", help="N concurrent streaming clients against a server: tokens/s, TTFT, ITL, cost")
    b.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    b.add_argument("--model", help="checkpoint to serve for the run (started on a free loopback port)")
    b.add_argument("--api-key", help="bearer key for --url")
    b.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    b.add_argument("--requests", type=int, default=64, help="requests in all (spread over the clients)")
    b.add_argument("--max-tokens", type=int, default=128, help="tokens per response (EOS ignored)")
    b.add_argument("--prompt", default="Tell me a story about a dragon and a knight.", help="user message")
    b.add_argument("--price-per-hour", type=float, default=1.0, help="machine price in $/hour for the cost figure")
    b.add_argument("--rounds", type=int, default=3, help="rounds (server and in-process engine interleaved)")
    b.add_argument("--max-batch-size", type=int, default=32, help="with --model: the server's batch")
    b.add_argument("--threads", type=int, help="with --model: torch threads of the server and the in-process engine")
    b.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=0,
        help="prepend a system message of about this many tokens, the same for every request (prefix caching)",
    )
    b.add_argument(
        "--server-flags",
        default="",
        help="with --model: more `nanoseek serve` flags, given with '=': --server-flags='--no-prefix-caching'",
    )
    b.set_defaults(func=cmd_bench_serve)

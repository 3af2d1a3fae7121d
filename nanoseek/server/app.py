"""The OpenAI-compatible HTTP API: FastAPI routes over the engine thread (async_engine.py).

    app = create_app(ServerConfig(model="runs/tiny"))        # or create_app(config, engine=Engine(...))
    uvicorn.run(app, host="127.0.0.1", port=8000)           # what `nanoseek serve` does

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses (each
non-streaming or SSE), GET /health, GET /metrics. Every error is OpenAI's object
{"error": {"message", "type", "param", "code"}}: 400 for a request that cannot be served (a validation error
included: OpenAI answers 400, not 422; a request over the per-request limits on sequences and tokens; text that
is not valid Unicode; a field this server does not serve), 401 for a missing or wrong API key (checked before
the body is read; with a key, only /health is open unless `public_docs_and_metrics`), 404 for an unknown model
or path, 413 for a body over the limit, 429 with Retry-After when the server's queue is full, 500 when
generation fails, 503 while the engine is down.

The pieces: config.py (ServerConfig), errors.py (the error object and handlers), guard.py (auth, body limit,
counting), openapi.py (the schema), protocol.py and protocol_responses.py (the wire format), routes.py (the chat
and completions handlers), responses.py (the Responses API), thinking.py (the thinking switch), sample.py (one
choice's text), streams.py (merging request streams), prometheus.py (/metrics).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from nanoseek import __version__
from nanoseek.checkpoint.tokenizer import TokenizerError
from nanoseek.engine.compiled import warm_up
from nanoseek.engine.engine import Engine
from nanoseek.server import protocol as P
from nanoseek.server import protocol_responses as R
from nanoseek.server.async_engine import AsyncEngine
from nanoseek.server.config import ServerConfig
from nanoseek.server.errors import error_response, install_error_handlers
from nanoseek.server.guard import Guard
from nanoseek.server.openapi import install_openapi, sse_event
from nanoseek.server.prometheus import ServerMetrics
from nanoseek.server.responses import Responses
from nanoseek.server.routes import Api

__all__ = ["ServerConfig", "create_app"]

# Open without the API key when the server is started with public_docs_and_metrics (/health always is).
PUBLIC_WITH_FLAG = ("/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; the engine (loaded from config.model unless given) runs while the app is up."""
    if engine is None:
        engine = Engine(
            config.model,
            max_batch_size=config.max_batch_size,
            cache_tokens=config.cache_tokens,
            device=config.device,
            allow_nonfinite=config.allow_nonfinite,
            weights=config.weights,
            compile=config.compile,
            prefix_caching=config.prefix_caching,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
    if engine.tokenizer is None:
        raise TokenizerError(f"{config.model} has no tokenizer.json: the server needs one")
    if engine.compiled:  # before the server listens, so that no client waits for a compile
        logging.getLogger("nanoseek.server").info("compiled the decode step in %.1f s", warm_up(engine))
    aengine = AsyncEngine(engine)
    metrics = ServerMetrics(config.model_name)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        try:
            yield
        finally:
            aengine.stop()

    app = FastAPI(
        title="nanoseek",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible API over the nanoseek engine; reasoning is returned apart from `content`, "
        "as `reasoning_content` (DeepSeek's name) and `reasoning` (vLLM's), and as reasoning items in /v1/responses.",
    )
    app.state.aengine, app.state.metrics, app.state.config = aengine, metrics, config
    api = Api(config, aengine, metrics)
    responses_api = Responses(api)

    errors = {
        s: {"model": P.ErrorResponse, "description": d}
        for s, d in [
            (400, "The request cannot be served"),
            (404, "Unknown model"),
            (413, "Body too large"),
            (429, "The server's queue is full: retry after `Retry-After` seconds"),
            (500, "Generation failed"),
            (503, "The engine is not running"),
        ]
    }
    sse = "Server-sent events when `stream` is true: `data: <chunk JSON>` lines, then `data: [DONE]`."

    @app.get("/v1/models", response_model=P.ModelList, tags=["openai"])
    async def list_models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=config.model_name, created=started, max_model_len=engine.max_len)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, tags=["openai"], responses={404: errors[404]})
    async def get_model(model_id: str) -> P.ModelCard:
        api.check_model(model_id, param=None)
        return P.ModelCard(id=config.model_name, created=started, max_model_len=engine.max_len)

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletion,
        tags=["openai"],
        responses={
            **errors,
            200: {
                "content": {"text/event-stream": {"schema": sse_event("ChatCompletionChunk", "ErrorResponse")}},
                "description": f"A chat completion. {sse} Chunks are ChatCompletionChunk objects.",
            },
        },
    )
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    @app.post(
        "/v1/completions",
        response_model=P.Completion,
        tags=["openai"],
        responses={
            **errors,
            200: {
                "content": {"text/event-stream": {"schema": sse_event("Completion", "ErrorResponse")}},
                "description": f"A text completion. {sse} Chunks are Completion objects.",
            },
        },
    )
    async def completions(body: P.CompletionRequest, request: Request):
        return await api.complete(body, request)

    @app.post(
        "/v1/responses",
        response_model=R.Response,
        tags=["openai"],
        responses={
            **errors,
            200: {
                "content": {
                    "text/event-stream": {"schema": sse_event(*(e.__name__ for e in R.STREAM_EVENTS), done=False)}
                },
                "description": "A response (OpenAI's Responses API). When `stream` is true, server-sent events: "
                "`event: <type>` and `data: <event JSON>` lines, from response.created to response.completed "
                "(or response.incomplete, or error and response.failed); no [DONE].",
            },
        },
    )
    async def create_response(body: R.ResponsesRequest, request: Request):
        return await responses_api.create(body, request)

    @app.get("/health", response_model=P.Health, responses={503: errors[503]})
    async def health():
        if not aengine.alive:
            return error_response(503, "The engine thread is not running.", code="engine_down")
        return P.Health(status="ok")

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format 0.0.4",
            }
        },
    )
    async def prometheus_metrics():
        return PlainTextResponse(
            metrics.render(aengine.snapshot, aengine.alive), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    install_error_handlers(app)
    install_openapi(app, config, engine.max_len, engine.model.config.vocab_size)
    app.add_middleware(
        Guard,
        api_key=config.api_key,
        max_body=config.max_request_bytes,
        metrics=metrics,
        paths={r.path for r in app.routes},
        open_paths={"/health", *(PUBLIC_WITH_FLAG if config.public_docs_and_metrics else ())},
    )
    return app

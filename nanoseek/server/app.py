"""The OpenAI-compatible HTTP API: FastAPI routes over the engine thread (async_engine.py).

    app = create_app(ServerConfig(model="runs/tiny"))        # or create_app(config, engine=Engine(...))
    uvicorn.run(app, host="127.0.0.1", port=8000)           # what `nanoseek serve` does

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (each non-streaming or SSE),
GET /health, GET /metrics. Every error is OpenAI's object {"error": {"message", "type", "param", "code"}}:
400 for a request that cannot be served (a validation error included: OpenAI answers 400, not 422),
401 for a missing or wrong API key (checked before the body is read), 404 for an unknown model or path,
413 for a body over the limit, 500 when generation fails, 503 while the engine is down.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek import __version__
from nanoseek.engine.engine import Engine, TokenEvent
from nanoseek.engine.sampling import SamplingParams
from nanoseek.checkpoint.tokenizer import TokenizerError
from nanoseek.server import protocol as P
from nanoseek.server.async_engine import AsyncEngine, GenerationFailed, RequestRefused, RequestStream
from nanoseek.server.metrics import ServerMetrics
from nanoseek.engine.text import ReasoningSplitter, SampleText, TokenPieces

FINGERPRINT = f"fp_nanoseek_{__version__}"


@dataclass
class ServerConfig:
    model: str  # checkpoint directory (config.json, safetensors, tokenizer.json)
    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>`
    served_model_name: str | None = None  # the `model` clients send; default: the directory's name
    max_batch_size: int = 32
    cache_tokens: int | None = None  # latent-cache capacity (default: the engine's)
    max_n: int = P.MAX_N
    max_request_bytes: int = 8 << 20
    device: str = "cpu"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type_: str | None = None, headers: dict | None = None) -> JSONResponse:
    e = APIError(status, message, param, code, type_)
    body = P.ErrorResponse(error=P.ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---- auth, body limit, request counting: plain ASGI, ahead of FastAPI ----------------------------------
class Guard:
    """Answers 401 before reading a body when the API key is missing or wrong, 413 when a body is larger
    than the limit (by its Content-Length, or as it arrives), and counts responses for /metrics."""

    def __init__(self, app, api_key: str | None, max_body: int, metrics: ServerMetrics, paths: set[str]):
        self.app, self.max_body, self.metrics, self.paths = app, max_body, metrics, paths
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else "other"
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                self.metrics.http[(path, message["status"])] += 1
            await send(message)

        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1/"):
            auth = headers.get(b"authorization", b"")
            scheme, _, key = auth.partition(b" ")
            if not auth:
                return await error_response(
                    401, "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                    code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted_send)
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(), self.api_key):
                return await error_response(401, "Incorrect API key provided.", code="invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, counted_send)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await self._too_large(scope, receive, counted_send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, self._too_large_message())
            return message

        await self.app(scope, limited_receive, counted_send)

    def _too_large_message(self) -> str:
        return f"The request body is larger than this server accepts ({self.max_body} bytes)."

    async def _too_large(self, scope, receive, send):
        await error_response(413, self._too_large_message(), code="request_too_large",
                             headers={"Connection": "close"})(scope, receive, send)


# ---- the app -----------------------------------------------------------------------------------------
def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app; the engine (loaded from config.model unless given) runs while the app is up."""
    if engine is None:
        engine = Engine(config.model, max_batch_size=config.max_batch_size, cache_tokens=config.cache_tokens,
                        device=config.device)
    if engine.tokenizer is None:
        raise TokenizerError(f"{config.model} has no tokenizer.json: the server needs one")
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

    app = FastAPI(title="nanoseek", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over the nanoseek engine; reasoning is returned as "
                              "`reasoning_content` apart from `content`, as DeepSeek's API does.")
    app.state.aengine, app.state.metrics, app.state.config = aengine, metrics, config
    api = _Api(config, aengine, metrics)

    errors = {s: {"model": P.ErrorResponse, "description": d} for s, d in [
        (400, "The request cannot be served"), (404, "Unknown model"), (413, "Body too large"),
        (500, "Generation failed"), (503, "The engine is not running")]}
    sse = "Server-sent events when `stream` is true: `data: <chunk JSON>` lines, then `data: [DONE]`."

    @app.get("/v1/models", response_model=P.ModelList, tags=["openai"])
    async def list_models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=config.model_name, created=started, max_model_len=engine.max_len)])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, tags=["openai"], responses={404: errors[404]})
    async def get_model(model_id: str) -> P.ModelCard:
        api.check_model(model_id, param=None)
        return P.ModelCard(id=config.model_name, created=started, max_model_len=engine.max_len)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletion, tags=["openai"], responses={
        **errors, 200: {"content": {"text/event-stream": {"schema": _sse_event("ChatCompletionChunk")}},
                        "description": f"A chat completion. {sse} Chunks are ChatCompletionChunk objects."}})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await api.chat(body, request)

    @app.post("/v1/completions", response_model=P.Completion, tags=["openai"], responses={
        **errors, 200: {"content": {"text/event-stream": {"schema": _sse_event("Completion")}},
                        "description": f"A text completion. {sse} Chunks are Completion objects."}})
    async def completions(body: P.CompletionRequest, request: Request):
        return await api.complete(body, request)

    @app.get("/health", response_model=P.Health, responses={503: errors[503]})
    async def health():
        if not aengine.alive:
            return error_response(503, "The engine thread is not running.", code="engine_down")
        return P.Health(status="ok")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text format 0.0.4"}})
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(aengine.snapshot, aengine.alive),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    _install_error_handlers(app)
    _install_openapi(app, config, engine.max_len, engine.model.config.vocab_size)
    app.add_middleware(Guard, api_key=config.api_key, max_body=config.max_request_bytes, metrics=metrics,
                       paths={r.path for r in app.routes})
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request: "
                                  f"{first.get('ctx', {}).get('error', 'invalid JSON')}.", code="invalid_json")
        param = _param(first["loc"])
        same = list(dict.fromkeys(e["msg"] for e in errs if _param(e["loc"]) == param))  # a union's members
        message = "; or ".join(same)
        if param:
            message = f"{param}: {message}"
        others = sum(_param(e["loc"]) != param for e in errs)
        if others:
            message += f" (and {others} more error{'s' if others > 1 else ''})"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return error_response(500, f"Internal server error: {type(e).__name__}", code="internal_error")


def _sse_event(chunk: str) -> dict:
    """One server-sent event (OpenAPI 3.1: the schema of a text/event-stream describes each event): its data is
    a chunk as JSON, an error object, or the closing `[DONE]`."""
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"anyOf": [{"const": "[DONE]"}, {
            "type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [ref(chunk), ref("ErrorResponse")]}}]}}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc: tuple) -> str | None:
    """A validation error's location as OpenAI's `param` ("messages.0.content"): pydantic's own markers (the
    body, the member of a union it tried: "str", "list[TextContentPart]") are left out."""
    keep = [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (
        x in _TYPE_TAGS or "[" in x or "-" in x))]
    return ".".join(keep) or None


def _bound_integers(node, maximum: int) -> None:
    """Give every integer in a JSON schema an upper bound."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for v in node.values():
            _bound_integers(v, maximum)
    elif isinstance(node, list):
        for v in node:
            _bound_integers(v, maximum)


def _install_openapi(app: FastAPI, config: ServerConfig, max_len: int, vocab_size: int) -> None:
    """FastAPI documents a 422 for every body; this server answers 400 with OpenAI's error object instead.
    With an API key the /v1 operations also document the bearer scheme and their 401."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        # Streamed chunks are named by the event schemas only: add their models.
        for model in (P.ChatCompletionChunk, P.Completion, P.ErrorResponse):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            schemas.update(js.pop("$defs", {}))
            schemas.setdefault(model.__name__, js)
        # This server's own bounds: the one model it serves, its context, its largest n.
        for name, prompt in (("ChatCompletionRequest", {"messages": [{"role": "user", "content": "What is 2+3?"}]}),
                             ("CompletionRequest", {"prompt": "The quick brown fox"})):
            props = schemas[name]["properties"]
            props["model"] = {"type": "string", "enum": [config.model_name], "title": "Model"}
            for field, bound in (("max_tokens", max_len - 1), ("max_completion_tokens", max_len - 1),
                                 ("n", config.max_n), ("best_of", config.max_n)):
                for branch in props.get(field, {}).get("anyOf", []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = min(bound, branch.get("maximum", bound))
            schemas[name]["examples"] = [{"model": config.model_name, **prompt, "max_tokens": 16}]
        _bound_integers(schemas["CompletionRequest"]["properties"]["prompt"], vocab_size - 1)  # token ids
        if config.api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            for op in ops.values():
                op["responses"].pop("422", None)
                if config.api_key and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
                    op["responses"]["401"] = {"description": "Missing or wrong API key", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
                if "requestBody" in op:
                    op["responses"]["413"] = {"description": "Body too large", "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# ---- request handling ------------------------------------------------------------------------------------
class _Sample:
    """One choice as its tokens arrive: text (stop strings applied), reasoning split, logprobs, counts."""

    def __init__(self, tokenizer, stop: list[str], template: str | None, pieces: TokenPieces | None):
        self.text = SampleText(tokenizer, stop)
        self.split = ReasoningSplitter(template) if template else None
        self.pieces = pieces
        self.n_tokens = self.reasoning_tokens = 0
        self.finish_reason: str | None = None
        self.reasoning = self.content = ""
        self.events: list[TokenEvent] = []
        self.logprobs: list[P.TokenLogprob] = []  # chat format
        self.logprob_sent = 0  # events whose legacy logprobs have been streamed

    def add(self, ev: TokenEvent) -> tuple[str, str, list[P.TokenLogprob]]:
        """(reasoning, content) increments and the logprob entries of this event's token."""
        self.n_tokens += 1
        self.events.append(ev)
        thinking = self.split is not None and self.split.state != "content"
        text = self.text.add(ev.token_id)
        reasoning, content = self.split.feed(text) if self.split else ("", text)
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason
            r, c = self._flush()
            reasoning, content = reasoning + r, content + c
        if thinking and self.split.has_reasoning:
            self.reasoning_tokens += 1
        self.reasoning += reasoning
        self.content += content
        entries = []
        if self.pieces is not None and ev.logprob is not None:
            entries = [self._entry(ev.token_id, ev.logprob, ev.top_logprobs or [])]
            self.logprobs += entries
        return reasoning, content, entries

    def end(self) -> tuple[str, str]:
        """The sample ended without a final event (dropped for lack of cache room): it was cut short."""
        self.finish_reason = self.finish_reason or "length"
        reasoning, content = self._flush()
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def _flush(self) -> tuple[str, str]:
        text = self.text.finish()
        if self.split is None:
            return "", text
        r1, c1 = self.split.feed(text)
        r2, c2 = self.split.finish()
        return r1 + r2, c1 + c2

    def _entry(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> P.TokenLogprob:
        b = self.pieces.bytes(token_id)
        return P.TokenLogprob(token=b.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(b),
                              top_logprobs=[P.TopLogprob(token=self.pieces.text(t), logprob=lp,
                                                         bytes=list(self.pieces.bytes(t))) for t, lp in top])


class _Api:
    def __init__(self, config: ServerConfig, aengine: AsyncEngine, metrics: ServerMetrics):
        self.config, self.aengine, self.metrics = config, aengine, metrics
        self.engine = aengine.engine
        self.tokenizer = self.engine.tokenizer
        self.pieces = TokenPieces(self.tokenizer)

    # ---- validation shared by both endpoints ----
    def check_model(self, model: str, param: str | None = "model") -> None:
        if model != self.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"`{self.config.model_name}`.", param=param, code="model_not_found")

    def params(self, body: P._Sampling, max_tokens: int | None, n_prompt: int, prompt_param: str,
               logprobs: bool, top_logprobs: int) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server (only 0).", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server.", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        n = body.n or 1
        if n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n} on this server.", param="n")
        max_len = self.engine.max_len
        if n_prompt >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, your "
                                f"prompt has {n_prompt} tokens, leaving no room for a completion.",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max_len - n_prompt
        elif n_prompt + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{max_tokens} for the completion).", param="max_tokens",
                           code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, n=n, stop=stop, seed=body.seed, top_k=body.top_k or 0,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs, top_logprobs=top_logprobs,
        )

    async def admit(self, prompts: list[list[int]], params: SamplingParams, rid: str) -> list[RequestStream]:
        streams = []
        try:
            for i, ids in enumerate(prompts):
                streams.append(await self.aengine.add_request(f"{rid}-{i}", ids, params))
        except RequestRefused as e:
            for s in streams:
                s.close()
            raise APIError(400, str(e), param="prompt" if len(prompts) > 1 else None) from None
        except GenerationFailed as e:
            raise APIError(503, str(e), code="engine_down") from None
        self.metrics.prompt_tokens += sum(map(len, prompts))
        return streams

    # ---- /v1/chat/completions ----
    async def chat(self, body: P.ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        self.check_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported by this server.", param="tools")
        if body.response_format is not None and body.response_format.type != "text":
            raise APIError(400, "Only response_format type `text` is supported.", param="response_format")
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true.", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            prompt = self.tokenizer.apply_chat_template(messages)
        except TokenizerError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = await run_in_threadpool(self.tokenizer.encode, prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = self.params(body, max_tokens, len(ids), "messages", bool(body.logprobs), body.top_logprobs or 0)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.admit([ids], params, rid)
        head = dict(id=rid, created=int(time.time()), model=self.config.model_name, system_fingerprint=FINGERPRINT)
        template = self.tokenizer.chat_template
        samples = [_Sample(self.tokenizer, params.stop, template, self.pieces if body.logprobs else None)
                   for _ in range(params.n)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._chat_chunks(streams, samples, head, len(ids), include_usage, t0), streams)
        await self._collect(streams, samples, request, t0)
        choices = []
        for i, s in enumerate(samples):
            reasoning = s.reasoning if s.split.has_reasoning else None
            choices.append(P.ChatCompletionChoice(
                index=i, message=P.ChatCompletionMessage(content=s.content, reasoning_content=reasoning),
                logprobs=P.ChoiceLogprobs(content=s.logprobs) if body.logprobs else None,
                finish_reason=s.finish_reason))
        return P.ChatCompletion(**head, choices=choices, usage=self._chat_usage(len(ids), samples))

    def _chat_usage(self, n_prompt: int, samples: list[_Sample]) -> P.ChatUsage:
        n_out = sum(s.n_tokens for s in samples)
        return P.ChatUsage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out,
                           completion_tokens_details=P.CompletionTokensDetails(
                               reasoning_tokens=sum(s.reasoning_tokens for s in samples)))

    async def _chat_chunks(self, streams, samples, head, n_prompt, include_usage, t0) -> AsyncIterator[str]:
        exclude = None if include_usage else {"usage"}

        def chunk(i: int, delta: P.DeltaMessage, finish=None, logprobs=None) -> str:
            c = P.ChatCompletionChunk(**head, choices=[P.ChatCompletionChunkChoice(
                index=i, delta=delta, logprobs=logprobs, finish_reason=finish)])
            return c.model_dump_json(exclude=exclude)

        for i in range(len(samples)):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""))
        async for i, r, c, lps, finished in self._events(streams, samples, t0):
            if r or c or lps:
                yield chunk(i, P.DeltaMessage(reasoning_content=r or None, content=c or None),
                            logprobs=P.ChoiceLogprobs(content=lps) if lps else None)
            if finished:
                yield chunk(i, P.DeltaMessage(), finish=samples[i].finish_reason)
        if include_usage:
            yield P.ChatCompletionChunk(**head, choices=[], usage=self._chat_usage(n_prompt, samples)).model_dump_json()

    # ---- /v1/completions ----
    async def complete(self, body: P.CompletionRequest, request: Request):
        t0 = time.perf_counter()
        self.check_model(body.model)
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server.", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(400, "best_of is only supported equal to n.", param="best_of")
        if body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported.", param="echo")
        p = body.prompt
        if isinstance(p, str):
            prompts = [await run_in_threadpool(self.tokenizer.encode, p)]
        elif isinstance(p[0], str):
            prompts = await run_in_threadpool(self.tokenizer.encode_batch, p)
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise APIError(400, f"Prompt token ids must be in [0, {vocab}).", param="prompt")
        if not all(prompts):
            raise APIError(400, "The prompt is empty.", param="prompt")
        longest = max(prompts, key=len)
        params = self.params(body, body.max_tokens or 16, len(longest), "prompt", body.logprobs is not None,
                             body.logprobs or 0)
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.admit(prompts, params, rid)
        head = dict(id=rid, created=int(time.time()), model=self.config.model_name, system_fingerprint=FINGERPRINT)
        samples = [_Sample(self.tokenizer, params.stop, None, None) for _ in range(len(prompts) * params.n)]
        echo = [self.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else "" for ids in prompts]
        n_prompt = sum(map(len, prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._completion_chunks(streams, samples, head, n_prompt, include_usage, echo,
                                                body.logprobs is not None, params.n, t0), streams)
        await self._collect(streams, samples, request, t0)
        choices = [P.CompletionChoice(index=i, text=echo[i // params.n] + s.content,
                                      logprobs=self._legacy_logprobs(s, s.events) if body.logprobs is not None
                                      else None, finish_reason=s.finish_reason)
                   for i, s in enumerate(samples)]
        n_out = sum(s.n_tokens for s in samples)
        return P.Completion(**head, choices=choices, usage=P.Usage(prompt_tokens=n_prompt, completion_tokens=n_out,
                                                                   total_tokens=n_prompt + n_out))

    def _legacy_logprobs(self, s: _Sample, events: list[TokenEvent], start: int = 0) -> P.CompletionLogprobs:
        """OpenAI's legacy completions logprobs for the tokens events[start:]."""
        evs = events[start:]
        offsets = s.text.offsets[start:start + len(evs)]
        return P.CompletionLogprobs(
            tokens=[self.pieces.text(e.token_id) for e in evs], token_logprobs=[e.logprob for e in evs],
            top_logprobs=[{self.pieces.text(t): lp for t, lp in (e.top_logprobs or [])} for e in evs],
            text_offset=[min(o, len(s.text.text)) for o in offsets])

    async def _completion_chunks(self, streams, samples, head, n_prompt, include_usage, echo, logprobs, n, t0):
        exclude = None if include_usage else {"usage"}

        def chunk(i: int, text: str, finish=None, lp=None) -> str:
            return P.Completion(**head, choices=[P.CompletionChoice(index=i, text=text, logprobs=lp,
                                                                    finish_reason=finish)]).model_dump_json(exclude=exclude)

        for i, s in enumerate(samples):
            if echo[i // n]:
                yield chunk(i, echo[i // n])
        async for i, _, text, _, finished in self._events(streams, samples, t0):
            s = samples[i]
            lp = None
            if logprobs:
                start = s.logprob_sent
                lp, s.logprob_sent = self._legacy_logprobs(s, s.events, start), len(s.events)
            if text or (lp and lp.tokens) or finished:
                yield chunk(i, text, s.finish_reason if finished else None, lp)
        if include_usage:
            n_out = sum(s.n_tokens for s in samples)
            yield P.Completion(**head, choices=[], usage=P.Usage(
                prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)).model_dump_json()

    # ---- driving the streams ----
    async def _events(self, streams: list[RequestStream], samples: list[_Sample], t0: float):
        """Yield (choice index, reasoning, content, logprob entries, finished) as tokens arrive from every
        prompt's stream; choice index = prompt index * n + sample index."""
        n = len(samples) // len(streams)
        first = True
        try:
            async for k, events in _merge(streams):
                if first:
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                    first = False
                for ev in events:
                    i = k * n + ev.index
                    r, c, lps = samples[i].add(ev)
                    self.metrics.generation_tokens += 1
                    yield i, r, c, lps, ev.finish_reason is not None
            for i, s in enumerate(samples):
                if s.finish_reason is None:  # finished without a final event
                    r, c = s.end()
                    yield i, r, c, [], True
        except GenerationFailed:
            self.metrics.finished["error"] += 1
            raise
        for s in samples:
            self.metrics.finished[s.finish_reason] += 1
        self.metrics.latency.observe(time.perf_counter() - t0)

    async def _collect(self, streams, samples, request: Request, t0: float) -> None:
        """Run a non-streaming request to the end, or abort it if the client disconnects first."""

        async def consume():
            async for _ in self._events(streams, samples, t0):
                pass

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                for s in streams:
                    s.close()
                self.metrics.finished["abort"] += 1
        if work.cancelled():
            raise APIError(499, "The client closed the request.")  # nobody reads this
        try:
            work.result()
        except GenerationFailed as e:
            raise APIError(500, str(e), code="generation_failed") from None

    def _sse(self, chunks: AsyncIterator[str], streams: list[RequestStream]) -> StreamingResponse:
        """Server-sent events: `data: <json>` per chunk, `data: [DONE]` at the end; an error mid-stream is
        sent as `data: {"error": ...}` (the openai client raises it). A client that leaves aborts the requests."""

        async def body():
            try:
                async for c in chunks:
                    yield f"data: {c}\n\n"
            except GenerationFailed as e:
                err = P.ErrorDetail(message=str(e), type="server_error", code="generation_failed")
                yield f"data: {P.ErrorResponse(error=err).model_dump_json()}\n\n"
            finally:
                if not all(s.done for s in streams):
                    self.metrics.finished["abort"] += 1
                for s in streams:
                    s.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, list[TokenEvent]]]:
    """Events of several request streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for events in streams[0]:
            yield 0, events
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream):
        try:
            async for events in stream:
                q.put_nowait((k, events))
        except BaseException as e:
            q.put_nowait((k, e))
            return
        q.put_nowait((k, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, item = await q.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()



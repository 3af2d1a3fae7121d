"""The handlers behind /v1/chat/completions and /v1/completions: validation, admission to the engine thread,
and the answer, whole or as server-sent events (both from one event path, so both give the same text).
/v1/responses (responses.py) uses the same validation, admission and event path."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from nanoseek.checkpoint.tokenizer import TokenizerError
from nanoseek.engine.engine import TokenEvent
from nanoseek.engine.sampling import SamplingParams
from nanoseek.engine.text import TokenPieces
from nanoseek.server import protocol as P
from nanoseek.server.async_engine import AsyncEngine, GenerationFailed, RequestRefused, RequestStream
from nanoseek.server.config import FINGERPRINT, ServerConfig
from nanoseek.server.errors import APIError
from nanoseek.server.prometheus import ServerMetrics
from nanoseek.server.sample import Sample
from nanoseek.server.streams import disconnected, merge
from nanoseek.server.structured import plan
from nanoseek.server.thinking import Thinking
from nanoseek.server.tools import template_messages, template_tools

log = logging.getLogger("nanoseek.server")


class Api:
    """The two generation endpoints over one engine thread; create_app routes requests here."""

    def __init__(self, config: ServerConfig, aengine: AsyncEngine, metrics: ServerMetrics):
        self.config, self.aengine, self.metrics = config, aengine, metrics
        self.engine = aengine.engine
        self.tokenizer = self.engine.tokenizer
        self.pieces = TokenPieces(self.tokenizer)

    # ---- validation shared by both endpoints ----
    def check_model(self, model: str, param: str | None = "model") -> None:
        if model != self.config.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.config.model_name}`.",
                param=param,
                code="model_not_found",
            )

    def params(
        self,
        body: P._Sampling,
        max_tokens: int | None,
        n_prompt: int,
        prompt_param: str,
        logprobs: bool,
        top_logprobs: int,
    ) -> SamplingParams:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported by this server (only 0).", param=name)
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server.", param="logit_bias")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
        n = self.check_n(body)
        max_tokens = self.check_context(n_prompt, max_tokens, prompt_param, "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            n=n,
            stop=stop,
            seed=body.seed,
            top_k=body.top_k or 0,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            ignore_eos=bool(body.ignore_eos),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    def check_context(self, n_prompt: int, max_tokens: int | None, prompt_param: str, max_param: str) -> int:
        """The tokens to generate (default: the rest of the context), or a 400 when the prompt leaves no room."""
        max_len = self.engine.max_len
        if n_prompt >= max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"prompt has {n_prompt} tokens, leaving no room for a completion.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return max_len - n_prompt
        if n_prompt + max_tokens > max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                f"{max_tokens} for the completion).",
                param=max_param,
                code="context_length_exceeded",
            )
        return max_tokens

    def check_n(self, body: P._Sampling) -> int:
        n = body.n or 1
        if n > self.config.max_n:
            raise APIError(400, f"n must be at most {self.config.max_n} on this server.", param="n")
        return n

    def check_work(self, n_prompts: int, n: int, prompt_tokens: int, max_tokens: int, prompt_param: str) -> None:
        """The work one request may ask for: sequences (prompts x n) and tokens (prompt tokens + max_tokens for
        every sequence). Checked before tokenizing (with the prompt tokens known so far) and after."""
        c = self.config
        seqs = n_prompts * n
        if seqs > c.max_sequences:
            raise APIError(
                400,
                f"This request asks for {seqs} sequences ({n_prompts} prompt{'s' if n_prompts > 1 else ''} x n={n}); "
                f"this server accepts at most {c.max_sequences} per request (max_sequences).",
                param="n" if n > 1 else prompt_param,
                code="too_many_sequences",
            )
        total = prompt_tokens + max_tokens * seqs
        if total > c.max_request_tokens:
            raise APIError(
                400,
                f"This request may use {total} tokens ({prompt_tokens} in the prompt + max_tokens {max_tokens} x "
                f"{seqs} sequence{'s' if seqs > 1 else ''}); this server accepts at most {c.max_request_tokens} "
                "per request (max_request_tokens).",
                param=prompt_param if prompt_tokens > c.max_request_tokens else "max_tokens",
                code="too_many_tokens",
            )

    async def admit(self, prompts: list[list[int]], params: SamplingParams, rid: str) -> list[RequestStream]:
        """Hand the prompts to the engine thread, or answer 429 when the server's queue cannot take them."""
        total, busy = len(prompts) * params.n, self.aengine.outstanding
        room = self.engine.max_batch_size + self.config.max_waiting_sequences
        if busy + total > room:
            raise APIError(
                429,
                f"The server is busy: {busy} sequences are running or queued and this request adds {total} "
                f"(it holds {room}: max_batch_size + max_waiting_sequences). Please retry shortly.",
                code="queue_full",
                type_="rate_limit_error",
                headers={"Retry-After": "1"},
            )
        try:
            streams = await self.aengine.add_requests([(f"{rid}-{i}", ids, params) for i, ids in enumerate(prompts)])
        except RequestRefused as e:
            raise APIError(400, str(e), param="prompt" if len(prompts) > 1 else None) from None
        except GenerationFailed as e:
            raise APIError(503, str(e), code="engine_down") from None
        self.metrics.prompt_tokens += sum(map(len, prompts))
        return streams

    # ---- /v1/chat/completions ----
    async def chat(self, body: P.ChatCompletionRequest, request: Request):
        t0 = time.perf_counter()
        self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true.", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        self.check_work(1, self.check_n(body), 0, max_tokens or 1, "messages")
        thinking = Thinking.of_chat(body)
        messages = template_messages(body.messages)
        template = self.tokenizer.chat_template
        split = None if messages[-1]["role"] == "tool" else thinking.split(template)  # after tool outputs: no prompt
        vocab = self.engine.model.config.vocab_size
        structured = await run_in_threadpool(plan, body, self.tokenizer, vocab, split is True)  # grammar: ms
        ids = await self.render(messages, thinking, "messages", template_tools(body.tools))
        params = self.params(body, max_tokens, len(ids), "messages", bool(body.logprobs), body.top_logprobs or 0)
        params.constraint = structured.constraint
        self.check_work(1, params.n, len(ids), params.max_tokens, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.admit([ids], params, rid)
        head = dict(id=rid, created=int(time.time()), model=self.config.model_name, system_fingerprint=FINGERPRINT)
        samples = [
            Sample(
                self.tokenizer,
                params.stop,
                template,
                self.pieces if body.logprobs else None,
                split,
                structured.parser(),
            )
            for _ in range(params.n)
        ]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(self._chat_chunks(streams, samples, head, len(ids), include_usage, t0), streams)
        await self.collect(streams, samples, request, t0)
        choices = []
        for i, s in enumerate(samples):
            choices.append(
                P.ChatCompletionChoice(
                    index=i,
                    message=s.message(),
                    logprobs=P.ChoiceLogprobs(content=s.logprobs) if body.logprobs else None,
                    finish_reason=s.finish_reason,
                )
            )
        return P.ChatCompletion(**head, choices=choices, usage=self._chat_usage(len(ids), samples, streams))

    async def render(self, messages: list[dict], thinking: Thinking, param: str, tools=None) -> list[int]:
        """The prompt's token ids: messages (and tools) through the chat template, with the thinking switch."""
        thinking.check(self.tokenizer.chat_template)
        try:
            prompt = self.tokenizer.apply_chat_template(messages, thinking=thinking.on, tools=tools)
        except TokenizerError as e:
            raise APIError(400, str(e), param=param) from None
        return await run_in_threadpool(self.tokenizer.encode, prompt)

    def _chat_usage(self, n_prompt: int, samples: list[Sample], streams: list[RequestStream]) -> P.ChatUsage:
        n_out = sum(s.n_tokens for s in samples)
        return P.ChatUsage(
            prompt_tokens=n_prompt,
            completion_tokens=n_out,
            total_tokens=n_prompt + n_out,
            prompt_tokens_details=_cached(streams),
            completion_tokens_details=P.CompletionTokensDetails(
                reasoning_tokens=sum(s.reasoning_tokens for s in samples)
            ),
        )

    async def _chat_chunks(self, streams, samples, head, n_prompt, include_usage, t0) -> AsyncIterator[str]:
        exclude = None if include_usage else {"usage"}

        def chunk(i: int, delta: P.DeltaMessage, finish=None, logprobs=None) -> str:
            c = P.ChatCompletionChunk(
                **head,
                choices=[P.ChatCompletionChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish)],
            )
            return c.model_dump_json(exclude=exclude)

        for i in range(len(samples)):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""))
        async for i, r, c, lps, finished in self.events(streams, samples, t0):
            if r or c or lps:
                yield chunk(
                    i,
                    P.DeltaMessage(reasoning_content=r or None, reasoning=r or None, content=c or None),
                    logprobs=P.ChoiceLogprobs(content=lps) if lps else None,
                )
            if samples[i].call_deltas:
                yield chunk(i, P.DeltaMessage(tool_calls=samples[i].take_call_deltas()))
            if finished:
                yield chunk(i, P.DeltaMessage(), finish=samples[i].finish_reason)
        if include_usage:
            usage = self._chat_usage(n_prompt, samples, streams)
            yield P.ChatCompletionChunk(**head, choices=[], usage=usage).model_dump_json()

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
        many = isinstance(p, list) and not isinstance(p[0], int)  # several prompts (texts or token lists)
        known = sum(len(x) for x in p if isinstance(x, list)) if many else (0 if isinstance(p, str) else len(p))
        self.check_work(len(p) if many else 1, self.check_n(body), known, body.max_tokens or 16, "prompt")
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
        params = self.params(
            body, body.max_tokens or 16, len(longest), "prompt", body.logprobs is not None, body.logprobs or 0
        )
        self.check_work(len(prompts), params.n, sum(map(len, prompts)), params.max_tokens, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self.admit(prompts, params, rid)
        head = dict(id=rid, created=int(time.time()), model=self.config.model_name, system_fingerprint=FINGERPRINT)
        samples = [Sample(self.tokenizer, params.stop, None, None) for _ in range(len(prompts) * params.n)]
        echo = [self.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else "" for ids in prompts]
        n_prompt = sum(map(len, prompts))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self._sse(
                self._completion_chunks(
                    streams, samples, head, n_prompt, include_usage, echo, body.logprobs is not None, params.n, t0
                ),
                streams,
            )
        await self.collect(streams, samples, request, t0)
        choices = [
            P.CompletionChoice(
                index=i,
                text=echo[i // params.n] + s.content,
                logprobs=self._legacy_logprobs(s, s.events) if body.logprobs is not None else None,
                finish_reason=s.finish_reason,
            )
            for i, s in enumerate(samples)
        ]
        n_out = sum(s.n_tokens for s in samples)
        return P.Completion(
            **head,
            choices=choices,
            usage=P.Usage(
                prompt_tokens=n_prompt,
                completion_tokens=n_out,
                total_tokens=n_prompt + n_out,
                prompt_tokens_details=_cached(streams),
            ),
        )

    def _legacy_logprobs(self, s: Sample, events: list[TokenEvent], start: int = 0) -> P.CompletionLogprobs:
        """OpenAI's legacy completions logprobs for the tokens events[start:]."""
        evs = events[start:]
        offsets = s.text.offsets[start : start + len(evs)]
        return P.CompletionLogprobs(
            tokens=[self.pieces.text(e.token_id) for e in evs],
            token_logprobs=[e.logprob for e in evs],
            top_logprobs=[{self.pieces.text(t): lp for t, lp in (e.top_logprobs or [])} for e in evs],
            text_offset=[min(o, len(s.text.text)) for o in offsets],
        )

    async def _completion_chunks(self, streams, samples, head, n_prompt, include_usage, echo, logprobs, n, t0):
        exclude = None if include_usage else {"usage"}

        def chunk(i: int, text: str, finish=None, lp=None) -> str:
            return P.Completion(
                **head, choices=[P.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish)]
            ).model_dump_json(exclude=exclude)

        for i, s in enumerate(samples):
            if echo[i // n]:
                yield chunk(i, echo[i // n])
        async for i, _, text, _, finished in self.events(streams, samples, t0):
            s = samples[i]
            lp = None
            if logprobs:
                start = s.logprob_sent
                lp, s.logprob_sent = self._legacy_logprobs(s, s.events, start), len(s.events)
            if text or (lp and lp.tokens) or finished:
                yield chunk(i, text, s.finish_reason if finished else None, lp)
        if include_usage:
            n_out = sum(s.n_tokens for s in samples)
            yield P.Completion(
                **head,
                choices=[],
                usage=P.Usage(
                    prompt_tokens=n_prompt,
                    completion_tokens=n_out,
                    total_tokens=n_prompt + n_out,
                    prompt_tokens_details=_cached(streams),
                ),
            ).model_dump_json()

    # ---- driving the streams ----
    async def events(self, streams: list[RequestStream], samples: list[Sample], t0: float):
        """Yield (choice index, reasoning, content, logprob entries, finished) as tokens arrive from every
        prompt's stream; choice index = prompt index * n + sample index."""
        n = len(samples) // len(streams)
        first = True
        try:
            async for k, events in merge(streams):
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

    async def collect(self, streams, samples, request: Request, t0: float) -> None:
        """Run a non-streaming request to the end, or abort it if the client disconnects first."""

        async def consume():
            async for _ in self.events(streams, samples, t0):
                pass

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            left = not work.done()  # the client went first (or this handler was cancelled)
            if left:
                work.cancel()
                for s in streams:
                    s.close()
                self.metrics.finished["abort"] += 1
        if left:
            log.info("499: the client closed the connection before the response (%s aborted)", streams[0].request_id)
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
                self.release(streams)
            yield "data: [DONE]\n\n"

        return event_stream(body())

    def release(self, streams: list[RequestStream]) -> None:
        """A stream's end, or its client gone: requests not done yet are aborted (and counted)."""
        if not all(s.done for s in streams):
            self.metrics.finished["abort"] += 1
        for s in streams:
            s.close()


def event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _cached(streams: list[RequestStream]) -> P.PromptTokensDetails:
    """OpenAI's usage.prompt_tokens_details: the prompt tokens found in the prefix cache, all prompts."""
    return P.PromptTokensDetails(cached_tokens=sum(s.cached_tokens for s in streams))

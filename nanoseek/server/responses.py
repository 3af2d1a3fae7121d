"""POST /v1/responses: OpenAI's Responses API on the chat path (routes.py). `instructions` and `input` go through
the chat template; the one sample's reasoning becomes a `reasoning` item (its text whole, as `content`) and its
answer a `message` item with one `output_text` part. Non-streaming, or the Responses API's typed events:

    response.created, response.in_progress,
    response.output_item.added, response.content_part.added, response.reasoning_text.delta...,
    response.reasoning_text.done, response.content_part.done, response.output_item.done   (the reasoning item)
    the same with response.output_text.delta / .done                                      (the message item)
    response.completed, or response.incomplete (max_output_tokens or the context reached);
    on a failure mid-stream: error, then response.failed

A reasoning item is present when the model reasoned; a message item when it wrote an answer, or when there is
no reasoning item (then possibly empty). `reasoning.effort` is the thinking switch ("none" off, any other
effort on); what nanoseek cannot serve is a 400 naming the field (see `refuse`).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from nanoseek.engine.sampling import SamplingParams
from nanoseek.server import protocol_responses as R
from nanoseek.server.async_engine import GenerationFailed
from nanoseek.server.errors import APIError
from nanoseek.server.routes import Api, event_stream
from nanoseek.server.sample import Sample
from nanoseek.server.thinking import Thinking


def refuse(body: R.ResponsesRequest) -> None:
    """A 400 naming the first field this server cannot serve, rather than ignoring it."""
    no_store = "this server stores no responses: send the whole conversation in `input`"
    refused = [
        ("tools", bool(body.tools), "tools are not supported by this server"),
        (
            "tool_choice",
            body.tool_choice not in (None, "none", "auto"),
            "tool_choice needs tools, which are not supported",
        ),
        ("previous_response_id", body.previous_response_id is not None, f"previous_response_id: {no_store}"),
        ("conversation", body.conversation is not None, f"conversations are not supported: {no_store}"),
        ("store", bool(body.store), f"store must be false or absent: {no_store}"),
        ("background", bool(body.background), "background responses are not supported by this server"),
        ("prompt", body.prompt is not None, "stored prompts are not supported by this server"),
        ("include", bool(body.include), "include is not supported by this server (nothing extra can be included)"),
        ("truncation", body.truncation == "auto", "only truncation `disabled` is supported"),
        ("top_logprobs", bool(body.top_logprobs), "top_logprobs is not supported in /v1/responses"),
        (
            "text.format",
            body.text is not None and body.text.format is not None and body.text.format.type != "text",
            "only the text format is supported",
        ),
        ("stream_options", body.stream_options is not None and not body.stream, "stream_options needs stream: true"),
    ]
    for param, bad, message in refused:
        if bad:
            raise APIError(400, message[0].upper() + message[1:] + ".", param=param, code="unsupported_parameter")


def messages(body: R.ResponsesRequest) -> list[dict]:
    """instructions (a system message), then the input's messages; reasoning items are left out."""
    out = [] if body.instructions is None else [{"role": "system", "content": body.instructions}]
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, R.InputMessage):
            out.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
    if not any(m["role"] != "system" for m in out):
        raise APIError(400, "The input holds no user or assistant message.", param="input")
    return out


class Responses:
    """The /v1/responses handler, over the chat endpoints' Api (validation, admission, the event path)."""

    def __init__(self, api: Api):
        self.api = api

    async def create(self, body: R.ResponsesRequest, request: Request):
        t0 = time.perf_counter()
        api, tok = self.api, self.api.tokenizer
        api.check_model(body.model)
        refuse(body)
        api.check_work(1, 1, 0, body.max_output_tokens or 1, "input")
        thinking = Thinking.of_effort(body.reasoning.effort if body.reasoning else None, "reasoning.effort")
        ids = await api.render(messages(body), thinking, "input")
        max_tokens = api.check_context(len(ids), body.max_output_tokens, "input", "max_output_tokens")
        api.check_work(1, 1, len(ids), max_tokens, "input")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
        key = uuid.uuid4().hex
        streams = await api.admit([ids], params, f"resp_{key}")
        sample = Sample(tok, [], tok.chat_template, None, thinking.split(tok.chat_template))
        out = Output(key, body, temperature, top_p, len(ids), sample, streams)
        if body.stream:
            return event_stream(self._events(streams, out, t0))
        await api.collect(streams, [sample], request, t0)
        return out.response()

    async def _events(self, streams, out: Output, t0: float) -> AsyncIterator[str]:
        seq = itertools.count()

        def event(cls, fields: dict | None = None, **more) -> str:
            ev = cls(sequence_number=next(seq), **(fields or {}), **more)
            return f"event: {ev.type}\ndata: {ev.model_dump_json()}\n\n"

        s = out.sample
        try:
            yield event(R.ResponseCreatedEvent, response=out.response(status="in_progress"))
            yield event(R.ResponseInProgressEvent, response=out.response(status="in_progress"))
            async for _, r, c, _, _ in self.api.events(streams, [s], t0):
                if s.split.has_reasoning and out.opened is None and not out.items:
                    for e in out.open("reasoning"):
                        yield event(*e)
                if r:
                    yield event(R.ReasoningTextDeltaEvent, **out.where(), delta=r)
                if c:
                    if out.opened != "message":
                        for e in [*out.close(), *out.open("message")]:
                            yield event(*e)
                    yield event(R.OutputTextDeltaEvent, **out.where(), delta=c)
            if out.opened is None and out.wants_message():
                for e in out.open("message"):
                    yield event(*e)
            for e in out.close():
                yield event(*e)
            final = out.response()
            done = R.ResponseIncompleteEvent if final.status == "incomplete" else R.ResponseCompletedEvent
            yield event(done, response=final)
        except GenerationFailed as e:
            yield event(R.ErrorEvent, code="generation_failed", message=str(e))
            failed = R.ResponseError(code="server_error", message=str(e))
            yield event(R.ResponseFailedEvent, response=out.response(status="failed", error=failed))
        finally:
            self.api.release(streams)


class Output:
    """One response as it is built: its output items (opened and closed as the text streams) and the response
    object at any point."""

    def __init__(
        self, key: str, body: R.ResponsesRequest, temperature: float, top_p: float, n_prompt: int, sample, streams
    ):
        self.key, self.body, self.n_prompt, self.sample, self.streams = key, body, n_prompt, sample, streams
        self.temperature, self.top_p = temperature, top_p
        self.created = int(time.time())
        self.ids = {"reasoning": f"rs_{key}", "message": f"msg_{key}"}
        self.items: list = []  # closed items, in order
        self.opened: str | None = None  # "reasoning" or "message" while one is streaming

    # ---- the items ----
    def _cut(self) -> bool:
        return self.sample.finish_reason == "length"

    def wants_message(self) -> bool:
        return bool(self.sample.content) or not self.sample.split.has_reasoning

    def _item(self, kind: str, done: bool):
        """An item as it opens (`done` False: no content yet) or closes."""
        cut = self._cut() and (kind == "message" or self.sample.split.state == "reasoning")  # cut inside it
        status = "incomplete" if done and cut else "completed" if done else "in_progress"
        parts = [self._part(kind, True)] if done else []
        if kind == "reasoning":
            return R.ReasoningItem(id=self.ids[kind], content=parts, status=status)
        return R.OutputMessage(id=self.ids[kind], content=parts, status=status)

    def _part(self, kind: str, done: bool):
        text = (self.sample.reasoning if kind == "reasoning" else self.sample.content) if done else ""
        return R.ReasoningText(text=text) if kind == "reasoning" else R.OutputText(text=text)

    def where(self) -> dict:
        return dict(item_id=self.ids[self.opened], output_index=len(self.items), content_index=0)

    def open(self, kind: str) -> list[tuple]:
        """The events that open an item and its one content part."""
        self.opened = kind
        return [
            (R.OutputItemAddedEvent, dict(output_index=len(self.items), item=self._item(kind, False))),
            (R.ContentPartAddedEvent, dict(**self.where(), part=self._part(kind, False))),
        ]

    def close(self) -> list[tuple]:
        """The events that close the item being streamed (none if none is)."""
        kind = self.opened
        if kind is None:
            return []
        where, part = self.where(), self._part(kind, True)
        text_done = R.ReasoningTextDoneEvent if kind == "reasoning" else R.OutputTextDoneEvent
        item = self._item(kind, True)
        events = [
            (text_done, dict(**where, text=part.text)),
            (R.ContentPartDoneEvent, dict(**where, part=part)),
            (R.OutputItemDoneEvent, dict(output_index=len(self.items), item=item)),
        ]
        self.items.append(item)
        self.opened = None
        return events

    # ---- the response ----
    def response(self, status: str | None = None, error: R.ResponseError | None = None) -> R.Response:
        """In progress or failed (`status` given): the items so far, no usage. Done: every item, and the usage."""
        body, s = self.body, self.sample
        usage = output = None
        if status is None:
            status = "incomplete" if self._cut() else "completed"
            output = self.items or [
                *([self._item("reasoning", True)] if s.split.has_reasoning else []),
                *([self._item("message", True)] if self.wants_message() else []),
            ]
            usage = R.ResponseUsage(
                input_tokens=self.n_prompt,
                input_tokens_details=R.InputTokensDetails(cached_tokens=sum(x.cached_tokens for x in self.streams)),
                output_tokens=s.n_tokens,
                output_tokens_details=R.OutputTokensDetails(reasoning_tokens=s.reasoning_tokens),
                total_tokens=self.n_prompt + s.n_tokens,
            )
        return R.Response(
            id=f"resp_{self.key}",
            created_at=self.created,
            completed_at=int(time.time()) if status == "completed" else None,
            status=status,
            error=error,
            incomplete_details=R.IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            model=body.model,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            output=self.items if output is None else output,
            parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            reasoning=R.ReasoningEcho(**(body.reasoning.model_dump() if body.reasoning else {})),
            temperature=self.temperature,
            top_p=self.top_p,
            tool_choice=body.tool_choice or "auto",
            metadata=body.metadata or {},
            user=body.user,
            usage=usage,
        )

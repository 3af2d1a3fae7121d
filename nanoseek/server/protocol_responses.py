"""OpenAI's Responses API (POST /v1/responses) as pydantic models: the request, the response object with its
reasoning and message items, and the streamed events (names and fields as the openai SDK's
`openai.types.responses` spells them).

The request validates as strictly as the chat request (protocol.py). Fields nanoseek cannot serve are declared
so that the schema tells the truth and refused by the handler (responses.py) with a 400 naming them: tools,
`previous_response_id`, `conversation`, `store: true`, `background: true`, `include`, `prompt`, `truncation:
"auto"`, `top_logprobs`, a `text.format` other than text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, model_serializer

from nanoseek.server.protocol import ReasoningEffort, Text, _Request

ItemStatus = Literal["in_progress", "completed", "incomplete"]


# ---- the request ----------------------------------------------------------------------------------
class InputText(_Request):
    type: Literal["input_text"]
    text: Text


class InputOutputText(_Request):
    """An earlier answer passed back as input (`output_text`, as `response.output` holds it)."""

    type: Literal["output_text"]
    text: Text
    annotations: list[dict[str, Any]] | None = None  # accepted, not used


def _tagged(default: str | None, what: str, **members: type) -> Any:
    """A union told apart by its `type` field (absent: `default`). The tags carry a dash, which error params leave
    out (errors.py), so a bad field is named by its path alone (`input.0.content.0.text`)."""

    def kind(value: Any) -> str | None:
        t = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
        t = default if t is None else t  # absent or null
        return f"{what}-{t}" if isinstance(t, str) and t in members else None

    only = f"this server accepts only {what}s of type " + " or ".join(f"`{t}`" for t in members)
    return Annotated[
        Union[tuple(Annotated[m, Tag(f"{what}-{t}")] for t, m in members.items())],  # noqa: UP007
        Discriminator(kind, custom_error_type="invalid_type", custom_error_message=only),
    ]


ContentPart = _tagged(None, "part", input_text=InputText, output_text=InputOutputText)


class InputMessage(_Request):
    """A message of the conversation: OpenAI's easy form (`{"role", "content"}`) or a `message` item."""

    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]  # developer and system are system messages
    content: Text | list[ContentPart]
    id: Text | None = None  # accepted, not used
    status: ItemStatus | None = None  # accepted, not used

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class InputReasoning(_Request):
    """An earlier answer's reasoning item passed back: accepted and left out of the prompt (the chat template
    drops earlier reasoning, as DeepSeek's API asks)."""

    type: Literal["reasoning"]
    id: Text | None = None
    summary: list[dict[str, Any]] | None = None
    content: list[dict[str, Any]] | None = None
    encrypted_content: Text | None = None
    status: ItemStatus | None = None


InputItem = _tagged("message", "item", message=InputMessage, reasoning=InputReasoning)


class ReasoningParam(_Request):
    effort: ReasoningEffort | None = None  # "none" switches thinking off, any other effort on (no budget)
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted: the full reasoning text is returned


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]  # only "text" is served


class TextParam(_Request):
    format: TextFormat | None = None


class ResponsesStreamOptions(_Request):
    include_obfuscation: bool | None = None  # accepted: no obfuscation is added


class ResponsesRequest(_Request):
    model: Text
    input: Text | Annotated[list[InputItem], Field(min_length=1)]
    instructions: Text | None = None  # a system message before the input
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None  # reasoning included; default: the context
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    reasoning: ReasoningParam | None = None
    stream: bool | None = None
    stream_options: ResponsesStreamOptions | None = None
    metadata: Annotated[dict[Text, Text], Field(max_length=16)] | None = None  # returned as given
    user: Text | None = None  # accepted, not used
    safety_identifier: Text | None = None  # accepted, not used
    prompt_cache_key: Text | None = None  # accepted, not used
    parallel_tool_calls: bool | None = None  # accepted (there are no tools)
    max_tool_calls: Annotated[int, Field(ge=0)] | None = None  # accepted (there are no tools)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None  # only "none" / "auto"
    tools: list[dict[str, Any]] | None = None  # not served: must be absent or empty
    text: TextParam | None = None  # only the text format
    truncation: Literal["auto", "disabled"] | None = None  # only "disabled"
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None  # only 0
    include: list[Text] | None = None  # not served: must be absent or empty
    store: bool | None = None  # nothing is stored: must not be true
    background: bool | None = None  # must not be true
    previous_response_id: Text | None = None  # not served (nothing is stored)
    conversation: Text | dict[str, Any] | None = None  # not served
    prompt: dict[str, Any] | None = None  # stored prompts: not served


# ---- the response ---------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = []
    logprobs: list[dict[str, Any]] = []


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItem(BaseModel):
    """The text the model wrote inside <think>...</think>, whole, as `content` (open models' form); no summary."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[SummaryText] = []
    content: list[ReasoningText]
    status: ItemStatus


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]
    status: ItemStatus


OutputItem = Annotated[ReasoningItem | OutputMessage, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # input tokens found in the prefix cache (not prefilled)
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int  # tokens up to and including `</think>`


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]  # max_output_tokens or the end of the context


class ResponseError(BaseModel):
    code: Literal["server_error"]
    message: str


class ReasoningEcho(BaseModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextEcho(BaseModel):
    format: dict[str, str] = {"type": "text"}


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    instructions: str | None
    max_output_tokens: int | None
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: ReasoningEcho
    store: Literal[False] = False
    temperature: float
    top_p: float
    text: TextEcho = TextEcho()
    tool_choice: Literal["none", "auto"]
    tools: list[dict[str, Any]] = []
    truncation: Literal["disabled"] = "disabled"
    background: Literal[False] = False
    metadata: dict[str, str]
    user: str | None = None
    usage: ResponseUsage | None = None  # null until the response is done


# ---- streamed events (`event: <type>` and `data: <event JSON>`; no [DONE]) --------------------------
class _Event(BaseModel):
    sequence_number: int

    @model_serializer(mode="wrap")
    def _type_first(self, handler):
        out = handler(self)
        return {"type": out.pop("type"), **out}


class _ResponseEvent(_Event):
    response: Response


class ResponseCreatedEvent(_ResponseEvent):
    type: Literal["response.created"] = "response.created"


class ResponseInProgressEvent(_ResponseEvent):
    type: Literal["response.in_progress"] = "response.in_progress"


class ResponseCompletedEvent(_ResponseEvent):
    type: Literal["response.completed"] = "response.completed"


class ResponseIncompleteEvent(_ResponseEvent):
    type: Literal["response.incomplete"] = "response.incomplete"


class ResponseFailedEvent(_ResponseEvent):
    type: Literal["response.failed"] = "response.failed"


class _ItemEvent(_Event):
    output_index: int
    item: OutputItem


class OutputItemAddedEvent(_ItemEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"


class OutputItemDoneEvent(_ItemEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"


class _PartEvent(_Event):
    item_id: str
    output_index: int
    content_index: int


class ContentPartAddedEvent(_PartEvent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class ContentPartDoneEvent(_PartEvent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: Annotated[OutputText | ReasoningText, Field(discriminator="type")]


class OutputTextDeltaEvent(_PartEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str
    logprobs: list[dict[str, Any]] = []


class OutputTextDoneEvent(_PartEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str
    logprobs: list[dict[str, Any]] = []


class ReasoningTextDeltaEvent(_PartEvent):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    delta: str


class ReasoningTextDoneEvent(_PartEvent):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    text: str


class ErrorEvent(_Event):
    """Generation failed mid-stream; `response.failed` follows."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None = None


STREAM_EVENTS = (
    ResponseCreatedEvent,
    ResponseInProgressEvent,
    OutputItemAddedEvent,
    ContentPartAddedEvent,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ContentPartDoneEvent,
    OutputItemDoneEvent,
    ResponseCompletedEvent,
    ResponseIncompleteEvent,
    ErrorEvent,
    ResponseFailedEvent,
)

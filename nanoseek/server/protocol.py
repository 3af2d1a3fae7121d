"""OpenAI's wire format as pydantic models: what the server accepts and returns, and what /openapi.json says.

Requests validate strictly, as JSON Schema reads them (a string is not an integer, 1 is not a boolean, NaN is
not a number); fields a client may send that nanoseek ignores (`user`, `name`) or rejects unless neutral
(penalties, `logit_bias`, `tools`) are declared so the schema tells the truth. `top_k` and `ignore_eos` are
vLLM's extensions. The thinking switch comes in three spellings (server/thinking.py): DeepSeek's `thinking`,
vLLM's `chat_template_kwargs`, OpenAI's `reasoning_effort`. Responses carry the reasoning beside `content` under
both names clients read: DeepSeek's `reasoning_content` and vLLM's `reasoning`. The Responses API's models are
in protocol_responses.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

MAX_N = 128  # OpenAI's bound; a server may set a lower one (ServerConfig.max_n)
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20

FinishReason = Literal["stop", "length"]
# OpenAI's reasoning efforts (as the openai SDK spells them); nanoseek has no reasoning budget: "none" switches
# thinking off, every other effort switches it on
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
TokenId = Annotated[int, Field(ge=0)]  # the server's schema adds the vocabulary's bound


NOT_UNICODE = "the text is not valid Unicode"


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer or UTF-8 response can hold: a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{NOT_UNICODE} (it holds a lone surrogate such as \\ud800)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every string of a request: valid Unicode


# ---- errors ---------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str  # "invalid_request_error", "authentication_error", "server_error", ...
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- requests -------------------------------------------------------------------------------------
class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class TextContentPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]  # developer = OpenAI's newer name for system
    content: Text | list[TextContentPart]
    name: Text | None = None  # accepted, not used
    reasoning_content: Text | None = None  # an earlier answer's reasoning: accepted, left out of the prompt
    reasoning: Text | None = None  # the same under vLLM's name

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool | None = None


class _Sampling(_Request):
    """The fields /v1/chat/completions and /v1/completions share."""

    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None  # only 0 is served
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None  # only 0 is served
    logit_bias: dict[Text, float] | None = None  # only an empty map is served
    user: Text | None = None  # accepted, not used
    top_k: Annotated[int, Field(ge=0)] | None = None  # extension: 0 = off
    ignore_eos: bool | None = None  # extension: keep generating past the end-of-sentence token


class ThinkingConfig(_Request):
    """DeepSeek's thinking switch: `{"type": "enabled"}` or `{"type": "disabled"}`."""

    type: Literal["enabled", "disabled"]


class ChatTemplateKwargs(_Request):
    """vLLM's and SGLang's variables for the chat template: the thinking switch, under either name (`thinking`
    wins over `enable_thinking`); other keys are accepted and unused (no template here reads them)."""

    thinking: bool | None = None
    enable_thinking: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None  # only "text" is served
    tools: list[dict] | None = None  # not served: must be absent or empty
    thinking: ThinkingConfig | None = None  # DeepSeek's switch
    chat_template_kwargs: ChatTemplateKwargs | None = None  # vLLM's switch (wins over the others)
    reasoning_effort: ReasoningEffort | None = None  # OpenAI's: "none" = off, any other = on


class CompletionRequest(_Sampling):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # legacy: the number of top tokens
    echo: bool | None = None
    suffix: Text | None = None  # not served: must be absent
    best_of: Annotated[int, Field(ge=1, le=MAX_N)] | None = None  # served only when equal to n


# ---- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int  # tokens up to and including `</think>`


class ChatUsage(Usage):
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None  # the text inside <think>...</think>; null when the model did not think
    reasoning: str | None  # the same, under vLLM's name


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: ChatUsage
    system_fingerprint: str


class DeltaMessage(BaseModel):
    """A streamed piece of a message: only the keys that carry something are sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text as reasoning_content (vLLM's name)

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed chat completion. With stream_options.include_usage every chunk has
    `usage: null` and one last chunk has no choices and the usage of the whole request."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    system_fingerprint: str
    usage: ChatUsage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A text completion; a streamed one is a sequence of these (text increments) on `data:` lines."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    max_model_len: int  # extension (vLLM's name): the context length in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]

"""OpenAI's wire format as pydantic models: what the server accepts and returns, and what /openapi.json says.

Requests validate strictly, as JSON Schema reads them (a string is not an integer, 1 is not a boolean, NaN is
not a number); fields a client may send that nanoseek ignores (`user`, `name`) or rejects unless neutral
(penalties, `logit_bias`) are declared so the schema tells the truth. Messages are a union on `role`
(system/developer, user, assistant with optional `tool_calls`, tool with `tool_call_id`); `tools`,
`tool_choice` and `response_format` are OpenAI's shapes, enforced by grammars (server/structured.py).
`top_k` and `ignore_eos` are vLLM's extensions. The thinking switch comes in three spellings
(server/thinking.py): DeepSeek's `thinking`, vLLM's `chat_template_kwargs`, OpenAI's `reasoning_effort`.
Responses carry the reasoning beside `content` under both names clients read: DeepSeek's `reasoning_content`
and vLLM's `reasoning`. The Responses API's models are in protocol_responses.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

MAX_N = 128  # OpenAI's bound; a server may set a lower one (ServerConfig.max_n)
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: the answer is calls to the request's tools
ToolName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names
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


class _Message(_Request):
    content: Text | list[TextContentPart]
    name: Text | None = None  # accepted, not used

    def text(self) -> str | None:
        c = self.content
        return c if c is None or isinstance(c, str) else "".join(p.text for p in c)


class SystemMessage(_Message):
    role: Literal["system", "developer"]  # developer = OpenAI's newer name for system


class UserMessage(_Message):
    role: Literal["user"]


class FunctionCall(_Request):
    name: ToolName
    arguments: Text  # JSON, as the model wrote it


class MessageToolCall(_Request):
    """A call an earlier assistant turn made (as this server returned it), sent back in the history."""

    id: Text
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Text | list[TextContentPart] | None = None  # null only beside tool_calls
    reasoning_content: Text | None = None  # an earlier answer's reasoning: accepted, left out of the prompt
    reasoning: Text | None = None  # the same under vLLM's name
    tool_calls: list[MessageToolCall] | None = None


class ToolMessage(_Message):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    tool_call_id: Text


ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})  # the tags in a validation error's loc


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


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Text | None = None
    schema_: dict | None = Field(None, alias="schema")  # a JSON schema (None: any JSON object)
    strict: bool | None = None  # accepted: the schema is always enforced (grammar-constrained decoding)


class ResponseFormat(_Request):
    """`json_object`: the answer is a JSON object; `json_schema`: JSON valid against `json_schema.schema`.
    Both are enforced while decoding, by a grammar (nanoseek/engine/constrain.py)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required with type json_schema


class FunctionDefinition(_Request):
    name: ToolName
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema for the arguments object (None: any object)
    strict: bool | None = None  # accepted: the arguments are always enforced when a call is required


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: ToolName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    # none: no call; auto (the default with tools): the model decides; required / named: enforced calls
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call
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
class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose latents were found in the prefix cache (not prefilled)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCall(BaseModel):
    id: str  # call_...
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null only when the answer is tool calls and nothing else
    reasoning_content: str | None  # the text inside <think>...</think>; null when the model did not think
    reasoning: str | None  # the same, under vLLM's name
    tool_calls: list[ToolCall] | None = None  # sent only when the model called tools

    @model_serializer(mode="wrap")
    def _drop_no_calls(self, handler):
        return {k: v for k, v in handler(self).items() if k != "tool_calls" or v is not None}


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: ChatFinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: ChatUsage
    system_fingerprint: str


class FunctionDelta(BaseModel):
    name: str | None = None  # in a call's first delta
    arguments: str | None = None  # "" in the first delta, then pieces of the JSON text

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first has the call's id, type and name, the later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaMessage(BaseModel):
    """A streamed piece of a message: only the keys that carry something are sent."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text as reasoning_content (vLLM's name)
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None


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

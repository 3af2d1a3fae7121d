"""What a chat request's `response_format`, `tools` and `tool_choice` ask of its output: the grammar the engine
enforces (nanoseek/engine/constrain.py) and whether the answer is parsed for tool calls (tools.py).

| request | grammar | tool calls parsed |
|---|---|---|
| `response_format` json_object / json_schema, no tools (or tool_choice `none`) | the JSON | no |
| tools, tool_choice `auto` (their default), no response_format | none: the model decides | yes, checked |
| tools, `auto`, with a JSON response_format | calls in DeepSeek's format, or the JSON | yes |
| tools, `required` | one or more calls, each NAME one of the tools, each arguments valid against its parameters | yes |
| tools, `{"type": "function", "function": {"name": N}}` | the same, N only | yes |

`parallel_tool_calls: false` allows one call. When the output begins with reasoning (the prompt opened
`<think>`, or the r1_zero template, which always thinks), the grammar starts after `</think>`; r1_zero's JSON
sits inside its `<answer> … </answer>` (the content the server returns is the answer's text). Bad input is a
400 naming the field: a schema the grammar compiler refuses (`response_format.json_schema.schema`,
`tools.N.function.parameters`), tool_choice without tools or naming an unknown function (`tool_choice`), two
tools of one name (`tools.N.function.name`), tools for a template without a tool format (`tools`).
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.checkpoint.tokenizer import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, TOOL_TEMPLATES
from nanoseek.engine.constrain import Constraint, ConstraintError, grammars
from nanoseek.server import protocol as P
from nanoseek.server.errors import APIError
from nanoseek.server.tools import ToolCallParser

ANY = object()  # no JSON asked for (a response_format schema may be None: any object)


@dataclass(frozen=True)
class Structured:
    constraint: Constraint | None  # the grammar every choice follows (None: free)
    tool_names: frozenset[str] | None  # tools whose calls are parsed out of the answer (None: no parsing)
    enforced: bool = False  # the grammar guarantees well-formed calls (required / named)

    def parser(self) -> ToolCallParser | None:
        return None if self.tool_names is None else ToolCallParser(self.tool_names, self.enforced)


def plan(body: P.ChatCompletionRequest, tokenizer, vocab_size: int, reasoning: bool) -> Structured:
    """The request's grammar and tool parsing; `reasoning`: the output begins inside `<think>`."""
    g = grammars(tokenizer, vocab_size)
    tools, choice = body.tools or [], body.tool_choice
    if choice is not None and not tools:
        raise APIError(400, "tool_choice is only allowed when tools are given.", param="tool_choice")
    if tools and tokenizer.chat_template not in TOOL_TEMPLATES:
        raise APIError(
            400,
            f"This model's chat template ({tokenizer.chat_template}) has no tool format.",
            param="tools",
            code="unsupported_parameter",
        )
    params: dict[str, dict | None] = {}
    for i, t in enumerate(tools):
        if t.function.name in params:
            raise APIError(400, f"Two tools are named {t.function.name!r}.", param=f"tools.{i}.function.name")
        params[t.function.name] = t.function.parameters
        _compiles(lambda: g.json(t.function.parameters), f"tools.{i}.function.parameters")
    if isinstance(choice, P.NamedToolChoice) and choice.function.name not in params:
        raise APIError(
            400, f"tool_choice names {choice.function.name!r}, which is not among the tools.", param="tool_choice"
        )
    schema = _response_schema(body.response_format)
    if schema is not ANY:
        _compiles(lambda: g.json(schema), "response_format.json_schema.schema")
    mode = "none" if not tools else "named" if isinstance(choice, P.NamedToolChoice) else choice or "auto"
    max_calls = 1 if body.parallel_tool_calls is False else None
    if mode == "named":
        c = g.tool_calls({choice.function.name: params[choice.function.name]}, max_calls)
    elif mode == "required" or (mode == "auto" and schema is not ANY):
        c = g.tool_calls(params, max_calls, json_alt=False if mode == "required" else schema)
    elif schema is not ANY:
        r1 = tokenizer.chat_template == "r1_zero"  # JSON inside <answer> … </answer>
        c = g.json(schema, ([" ", ANSWER_OPEN, " "], [" ", ANSWER_CLOSE]) if r1 else ([], []))
    else:
        c = None
    if c is not None and (reasoning or tokenizer.chat_template == "r1_zero"):
        c = c.starting_after(tokenizer.token_to_id(THINK_CLOSE))
    names = None if mode == "none" else frozenset(params)
    return Structured(c, names, enforced=mode in ("required", "named"))


def _response_schema(rf: P.ResponseFormat | None):
    if rf is None or rf.type == "text":
        return ANY
    if rf.type == "json_object":
        return None
    if rf.json_schema is None:
        raise APIError(
            400, "response_format of type json_schema needs json_schema.", param="response_format.json_schema"
        )
    return rf.json_schema.schema_


def _compiles(compile_, param: str) -> None:
    try:
        compile_()
    except ConstraintError as e:
        raise APIError(400, f"The schema cannot be enforced: {str(e)[:500]}", param=param) from None

"""The thinking switch: the spellings clients send, resolved to the one `thinking` variable the chat template
renders (checkpoint/tokenizer.py), and what the reasoning split then expects of the output.

Highest precedence first (the first one present decides; the others are still validated):

    chat_template_kwargs.thinking, then .enable_thinking   vLLM, SGLang: the template's own variable
    thinking.type: "enabled" | "disabled"                  DeepSeek's API
    reasoning_effort (chat), reasoning.effort (responses)  OpenAI's: "none" is off, any other effort is on

None present: the template's default (deepseek: the assistant turn opens bare and the model decides; r1_zero:
it always thinks). A template that cannot switch thinking off (r1_zero) answers a request for off with a 400
naming the field that asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanoseek.checkpoint.tokenizer import THINKING_TEMPLATES
from nanoseek.server import protocol as P
from nanoseek.server.errors import APIError


@dataclass(frozen=True)
class Thinking:
    on: bool | None = None  # None: not asked, the template's default
    param: str | None = None  # the request field that decided it

    @classmethod
    def of_chat(cls, body: P.ChatCompletionRequest) -> Thinking:
        kw = body.chat_template_kwargs
        if kw is not None and kw.thinking is not None:
            return cls(kw.thinking, "chat_template_kwargs.thinking")
        if kw is not None and kw.enable_thinking is not None:
            return cls(kw.enable_thinking, "chat_template_kwargs.enable_thinking")
        if body.thinking is not None:
            return cls(body.thinking.type == "enabled", "thinking.type")
        return cls.of_effort(body.reasoning_effort, "reasoning_effort")

    @classmethod
    def of_effort(cls, effort: str | None, param: str) -> Thinking:
        return cls() if effort is None else cls(effort != "none", param)

    def check(self, template: str) -> None:
        """A 400 when the template cannot do what was asked (only switching off can fail)."""
        if self.on is False and template not in THINKING_TEMPLATES:
            raise APIError(
                400,
                f"This model's chat template ({template}) always thinks: its instruction asks the model to reason "
                f"inside <think> first, so thinking cannot be switched off ({self.param}).",
                param=self.param,
                code="unsupported_value",
            )

    def split(self, template: str) -> bool | None:
        """What the reasoning split expects: the prompt opened `<think>` (True), closed it (False), or neither."""
        return self.on if template in THINKING_TEMPLATES else None

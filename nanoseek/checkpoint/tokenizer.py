"""Tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, DeepSeek's special tokens, chat templates.

    tok = train_tokenizer(texts, vocab_size=2048)         # or Tokenizer.from_pretrained("ckpt/")
    ids = tok.encode("What is 12 + 30?")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.save_pretrained("ckpt/")                          # tokenizer.json + tokenizer_config.json

Digits are split one per token before BPE, so numbers are read digit by digit (what the arithmetic and
Countdown tasks need, and what DeepSeek's own pre-tokenizer approximates with 1-3 digit groups).
`<think>`, `</think>`, `<answer>`, `</answer>` are single added tokens that survive
`skip_special_tokens`; the begin/end-of-sentence, role and pad tokens are special.

Two chat templates, each stored as Jinja in tokenizer_config.json (so `transformers.AutoTokenizer`
renders exactly what `apply_chat_template` here renders; a test holds them equal):
- "deepseek": DeepSeek-R1's layout,
  `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜>`.
  Reasoning of earlier assistant turns is dropped from the history, as DeepSeek's API asks.
  A `thinking` variable (as `chat_template_kwargs` pass it) switches reasoning the way DeepSeek-V3.1's template
  does: true opens the assistant turn with `<think>` (the model reasons first), false with `</think>` (it
  answers at once); unset, the turn opens bare and the model decides, as before.
  Tools as DeepSeek-V3.1's template has them: a `tools` variable (OpenAI's function definitions) is described
  after the system prompt with the call format, an assistant's `tool_calls` are written
  `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`
  before its end of sentence, a `tool` message as `<｜tool▁output▁begin｜>…<｜tool▁output▁end｜>`, and the
  assistant's next turn continues right after the tool outputs (no new `<｜Assistant｜>`, no generation prompt).
  The markers are text: nanoseek's tokenizers do not have them as tokens (the grammar that enforces the
  format, nanoseek/engine/constrain.py, works over text either way).
- "r1_zero": the DeepSeek-R1-Zero template (R1 paper, Table 1): the plain-text preamble, "User: {prompt}.
  Assistant:", which is what `nanoseek zero` trains on, so serving its checkpoint uses the same prompt.
  It always thinks (its preamble asks for `<think>` first): `thinking` true changes nothing, false is an
  error (`raise_exception` in Jinja, TokenizerError here). It has no tool format: tools, tool calls and tool
  messages are errors too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanoseek.checkpoint.trust import checked_file, read_json
from nanoseek.errors import NanoseekError
from nanoseek.fileio import atomic_write, atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]  # ids 0..4: bos 0, eos 1, as DeepSeek-V3's config
# The R1 response tags: ordinary text (not special tokens), one token each. Tasks, the reasoning split of
# the server and chat, and the chat templates all take them from here.
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
THINK_TOKENS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE]

R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>."
)

# Templates that render the `thinking` switch (the assistant turn opens with `<think>` or `</think>`); the others
# ignore it, and r1_zero refuses `thinking` false.
THINKING_TEMPLATES = frozenset({"deepseek"})
R1_ZERO_ALWAYS_THINKS = "the r1_zero template always thinks: its instruction asks for <think> first"
# Templates with DeepSeek-V3.1's tool format; r1_zero refuses tools.
TOOL_TEMPLATES = frozenset({"deepseek"})
R1_ZERO_NO_TOOLS = "the r1_zero template has no tool format"
# DeepSeek-V3.1's tool markers (text, not tokens, in nanoseek's tokenizers) and its instructions for them.
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOLS_HEADER = "\n\n## Tools\nYou have access to the following tools:\n"
TOOLS_FORMAT = (
    "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_call_name{TOOL_SEP}tool_call_arguments{TOOL_CALL_END}"
    "{{additional_tool_calls}}" + TOOL_CALLS_END + "\n\nWhere:\n\n"
    "- `tool_call_name` must be an exact match to one of the available tools\n"
    "- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n"
    "- For multiple tool calls, chain them directly without separators or spaces\n"
)


def _jinja_str(text: str) -> str:
    """A Jinja string literal holding `text` as it is (braces included: a literal is not parsed)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# Jinja sources, written to tokenizer_config.json. `apply_chat_template` below renders the same strings.
CHAT_TEMPLATES = {
    "deepseek": (
        "{{ bos_token }}"
        "{%- for m in messages if m['role'] == 'system' %}{{ m['content'] }}{%- endfor %}"
        "{%- if tools %}{{ " + _jinja_str(TOOLS_HEADER) + " }}"
        "{%- for t in tools %}{{ '\\n### ' + t['function']['name'] + '\\nDescription: ' + "
        "(t['function']['description'] or '') + '\\n\\nParameters: ' + (t['function']['parameters'] or {}) | tojson "
        "+ '\\n' }}{%- endfor %}"
        "{{ " + _jinja_str(TOOLS_FORMAT) + " }}"
        "{%- endif %}"
        "{%- set ns = namespace(tool=false) %}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{%- set ns.tool = false %}"
        "{%- elif m['role'] == 'assistant' %}"
        "{%- if not ns.tool %}{{ '<｜Assistant｜>' }}{%- endif %}"
        "{{ (m['content'] or '').split('</think>')[-1] | trim }}"
        "{%- if m['tool_calls'] %}{{ '" + TOOL_CALLS_BEGIN + "' }}"
        "{%- for c in m['tool_calls'] %}{{ '" + TOOL_CALL_BEGIN + "' + c['function']['name'] + '" + TOOL_SEP + "' + "
        "c['function']['arguments'] + '" + TOOL_CALL_END + "' }}{%- endfor %}"
        "{{ '" + TOOL_CALLS_END + "' }}{%- endif %}"
        "{{ eos_token }}{%- set ns.tool = false %}"
        "{%- elif m['role'] == 'tool' %}"
        "{{ '" + TOOL_OUTPUT_BEGIN + "' + m['content'] + '" + TOOL_OUTPUT_END + "' }}{%- set ns.tool = true %}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and not ns.tool %}{{ '<｜Assistant｜>' }}"
        "{%- if thinking is true %}{{ '<think>' }}{%- elif thinking is false %}{{ '</think>' }}{%- endif %}"
        "{%- endif %}"
    ),
    "r1_zero": (
        "{%- if thinking is false %}{{ raise_exception('" + R1_ZERO_ALWAYS_THINKS + "') }}{%- endif %}"
        "{%- if tools or messages | selectattr('role', 'equalto', 'tool') | list %}"
        "{{ raise_exception('" + R1_ZERO_NO_TOOLS + "') }}{%- endif %}"
        "{{ bos_token }}"
        "{%- set ns = namespace(system='" + R1_ZERO_PREAMBLE + "') %}"
        "{%- for m in messages if m['role'] == 'system' %}{%- set ns.system = m['content'] %}{%- endfor %}"
        "{{ ns.system }}"
        "{%- for m in messages %}"
        "{%- if m['role'] == 'user' %}{{ ' User: ' + m['content'] }}"
        "{%- elif m['role'] == 'assistant' %}{{ ' Assistant: ' + (m['content'] | trim) + eos_token }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ ' Assistant:' }}{%- endif %}"
    ),
}


class TokenizerError(NanoseekError):
    """A tokenizer directory that cannot be loaded, or a chat message that cannot be rendered."""


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids and chat template nanoseek needs."""

    def __init__(self, tokenizer: HFTokenizer, chat_template: str = "deepseek"):
        if chat_template not in CHAT_TEMPLATES:
            raise TokenizerError(f"unknown chat template {chat_template!r}; known: {', '.join(CHAT_TEMPLATES)}")
        self.tk = tokenizer
        self.chat_template = chat_template
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + THINK_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"the tokenizer lacks nanoseek's tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.special_ids = {ids[t] for t in SPECIAL_TOKENS}

    # ---- ids <-> text --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def decode_stream(self, skip_special_tokens: bool = True) -> decoders.DecodeStream:
        """Incremental detokenizer: `.step(tk, id)` returns the new text, or None while a character's
        bytes are incomplete (what streaming needs: byte-level BPE splits UTF-8 characters)."""
        return decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        template: str | None = None,
        thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        """Render messages with this tokenizer's template (or another by name); see `render_chat`."""
        return render_chat(messages, template or self.chat_template, add_generation_prompt, thinking, tools)

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json, as `transformers.AutoTokenizer` reads them."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(root / "tokenizer.json", lambda tmp: self.tk.save(str(tmp)))
        added = {
            str(self.tk.token_to_id(t)): {
                "content": t,
                "special": t in SPECIAL_TOKENS,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t in SPECIAL_TOKENS + THINK_TOKENS
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATES[self.chat_template],
            "nanoseek_chat_template": self.chat_template,
        }
        atomic_write_text(root / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        root = Path(path)
        if not (root / "tokenizer.json").exists():
            raise TokenizerError(f"no tokenizer.json in {root}")
        # a checkpoint from anyone: a regular file inside the directory (a FIFO would block the read)
        tokenizer_json = checked_file(root, "tokenizer.json")
        try:
            tk = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"{root / 'tokenizer.json'} cannot be read ({e})") from None
        name = "deepseek"
        if os.path.lexists(root / "tokenizer_config.json"):
            cfg = read_json(root, "tokenizer_config.json")
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{root / 'tokenizer_config.json'} is not a JSON object")
            name = cfg.get("nanoseek_chat_template", name)
        return cls(tk, chat_template=name)

    def with_chat_template(self, name: str) -> "Tokenizer":
        return Tokenizer(self.tk, chat_template=name)


def render_chat(
    messages: list[dict],
    template: str = "deepseek",
    add_generation_prompt: bool = True,
    thinking: bool | None = None,
    tools: list[dict] | None = None,
) -> str:
    """Messages ({"role": system|user|assistant|tool, "content": str}, an assistant's optionally with OpenAI's
    `tool_calls` and null content) as prompt text, exactly as the Jinja source CHAT_TEMPLATES[template] renders
    them (with `thinking` and `tools`, OpenAI's function definitions, as its template variables; None = unset).
    Needs no trained tokenizer (corpus building uses it first)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise TokenizerError(f"message {i} must have a role of system, user, assistant or tool")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if not isinstance(m.get("content"), str) and not (calls and m.get("content") is None):
            raise TokenizerError(f"message {i} must have string content")
    if template == "deepseek":
        out = BOS + "".join(m["content"] for m in messages if m["role"] == "system") + _tools_text(tools)
        after_tool = False  # an assistant turn right after tool outputs continues them (V3.1): no <｜Assistant｜>
        for m in messages:
            if m["role"] == "user":
                out += USER + m["content"]
            elif m["role"] == "assistant":
                out += ("" if after_tool else ASSISTANT) + (m["content"] or "").split("</think>")[-1].strip()
                out += _calls_text(m.get("tool_calls")) + EOS
            elif m["role"] == "tool":
                out += TOOL_OUTPUT_BEGIN + m["content"] + TOOL_OUTPUT_END
            after_tool = m["role"] == "tool" or (after_tool and m["role"] == "system")
        if not add_generation_prompt or after_tool:
            return out
        return out + ASSISTANT + (THINK_OPEN if thinking is True else THINK_CLOSE if thinking is False else "")
    if template == "r1_zero":
        if thinking is False:
            raise TokenizerError(R1_ZERO_ALWAYS_THINKS)
        if tools or any(m["role"] == "tool" for m in messages):
            raise TokenizerError(R1_ZERO_NO_TOOLS)
        systems = [m["content"] for m in messages if m["role"] == "system"]
        out = BOS + (systems[-1] if systems else R1_ZERO_PREAMBLE)
        for m in messages:
            if m["role"] == "user":
                out += " User: " + m["content"]
            elif m["role"] == "assistant":
                out += " Assistant: " + m["content"].strip() + EOS
        return out + (" Assistant:" if add_generation_prompt else "")
    raise TokenizerError(f"unknown chat template {template!r}; known: {', '.join(CHAT_TEMPLATES)}")


def _tools_text(tools: list[dict] | None) -> str:
    """The system prompt's tool section (DeepSeek-V3.1's): each function's name, description and parameters
    (JSON as transformers' `tojson` writes it), then the call format."""
    if not tools:
        return ""
    out = TOOLS_HEADER
    for t in tools:
        fn = t["function"]
        params = json.dumps(fn.get("parameters") or {}, ensure_ascii=False)
        out += f"\n### {fn['name']}\nDescription: {fn.get('description') or ''}\n\nParameters: {params}\n"
    return out + TOOLS_FORMAT


def _calls_text(calls: list[dict] | None) -> str:
    if not calls:
        return ""
    body = "".join(
        TOOL_CALL_BEGIN + c["function"]["name"] + TOOL_SEP + c["function"]["arguments"] + TOOL_CALL_END for c in calls
    )
    return TOOL_CALLS_BEGIN + body + TOOL_CALLS_END


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, chat_template: str = "deepseek"
) -> Tokenizer:
    """Train byte-level BPE on texts; the vocabulary (special tokens included) has at most vocab_size ids."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),  # one token per digit
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    # Added after training so BPE never merges across them; not special, so decoding keeps them.
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return Tokenizer(tk, chat_template=chat_template)

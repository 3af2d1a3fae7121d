"""Grammar-constrained decoding: JSON schemas and DeepSeek's tool-call format as per-row token masks.

    g = grammars(tokenizer, vocab_size)        # one per tokenizer and vocabulary; compiled grammars are cached
    c = g.json({"type": "object", ...})        # or g.json(None) (any object), g.tool_calls({...}), g.lark(src)
    engine.add_request(ids, SamplingParams(constraint=c))

A `Constraint` is compiled once (llguidance: a Lark grammar, JSON schemas embedded with `%json`) and shared by
every request that asks for the same grammar; the engine gives each sequence its own `Matcher` (a copy of the
compiled one), asks it for the tokens it allows before sampling (`token_masks`, one bit per token, unpacked
into a (B, V) bool mask the sampler applies: nanoseek/engine/sampling.py) and feeds it every token the
sequence appends. The grammar decides the end: EOS is allowed only where the grammar is complete, and once
nothing but EOS may follow, the sequence finishes ("stop") without spending a step on it.

Speculative decoding checks a draft against the grammar (`Matcher.fill_after`: the mask after the draft, or
none where the grammar forbids it, so verification rejects it). Preemption needs nothing: a sequence is
recomputed from its tokens, and its matcher has already seen every one of them.

`starting_after` lets a sequence reason freely first: the grammar starts after that token (`</think>`), and EOS is
masked until it does. Why llguidance (and not xgrammar or outlines-core): docs/server.md, measured.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import torch

from nanoseek.checkpoint.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

# JSON as json.dumps writes it ("a": 1, "b": 2) and no other whitespace: a random model cannot wander into
# endless whitespace, and every schema has one spelling.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 64  # compiled grammars kept per tokenizer (least recently used dropped)


class ConstraintError(ValueError):
    """A schema or grammar that cannot be compiled (unsupported, unsatisfiable or malformed)."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A compiled grammar for one tokenizer and vocabulary; immutable, shared by the requests that use it."""

    source: str  # the Lark grammar
    vocab_size: int
    eos_id: int
    _compiled: llguidance.LLMatcher  # never advanced: each sequence gets a copy
    start_after: int | None = None  # a token id: free text (no EOS) until it is generated, then the grammar

    def starting_after(self, token_id: int | None) -> Constraint:
        """The same grammar, applied only after `token_id` (e.g. `</think>`: reasoning stays free)."""
        return Constraint(self.source, self.vocab_size, self.eos_id, self._compiled, token_id)

    def matcher(self, vocab_size: int) -> Matcher:
        if vocab_size != self.vocab_size:
            raise ValueError(f"the constraint was compiled for {self.vocab_size} tokens; this model has {vocab_size}")
        return Matcher(self)


class Matcher:
    """One sequence's place in its grammar. Masks are cached per position: the engine asks for the same one
    twice when it drafts and then verifies (MTP)."""

    def __init__(self, constraint: Constraint):
        self.constraint = constraint
        self.m = constraint._compiled.deep_copy()
        self.free = constraint.start_after is not None  # before the grammar starts: any token but EOS
        self.words = (constraint.vocab_size + 31) // 32
        self.n = 0  # tokens advanced over
        self._cache: tuple[int, torch.Tensor] | None = None

    def advance(self, token: int) -> bool:
        """Take the token the sequence appended; True when the grammar is complete (nothing but EOS may follow)."""
        self.n += 1
        if self.free:
            self.free = token != self.constraint.start_after
            return False
        if token == self.constraint.eos_id:
            return True
        self.m.consume_token(token)  # a token the mask forbade (never sampled) leaves it in its error state: EOS only
        return self.m.is_stopped()

    def fill(self, row: torch.Tensor) -> None:
        """Write the tokens allowed now as bits into `row` ((words,) int32, on the CPU)."""
        if self._cache is not None and self._cache[0] == self.n:
            row.copy_(self._cache[1])
            return
        if self.free:
            self._fill_free(row)
        else:
            self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        self._cache = (self.n, row.clone())

    def fill_after(self, token: int, row: torch.Tensor) -> bool:
        """The tokens allowed after `token` (a draft) into `row`; False, row untouched, if the grammar forbids it."""
        if token == self.constraint.eos_id:
            return False  # EOS ends the sequence: nothing comes after it
        if self.free:
            if token == self.constraint.start_after:
                self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
            else:
                self._fill_free(row)
            return True
        if self.m.validate_tokens([token]) != 1:
            return False
        self.m.consume_token(token)
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), self.words * 4)
        self.m.rollback(1)
        return True

    def _fill_free(self, row: torch.Tensor) -> None:
        row.fill_(-1)
        word, bit = divmod(self.constraint.eos_id, 32)
        row[word] &= ~(1 << bit) if bit < 31 else 0x7FFFFFFF  # int32: bit 31 is the sign


_SHIFTS = torch.arange(32, dtype=torch.int32)


def token_masks(
    matchers: list[Matcher | None], device: torch.device | str, after: list[int] | None = None
) -> torch.Tensor | None:
    """(B, V) bool: the tokens each row's grammar allows (all of them for rows without one); None when no row
    has a grammar. With `after` (each row's draft), the tokens allowed after it; rows whose draft the grammar
    forbids allow everything (their verification rejects the draft, and this row of the mask goes unused)."""
    live = [(i, m) for i, m in enumerate(matchers) if m is not None]
    if not live:
        return None
    vocab = live[0][1].constraint.vocab_size
    bits = torch.full((len(matchers), live[0][1].words), -1, dtype=torch.int32)
    for i, m in live:
        if after is None:
            m.fill(bits[i])
        elif not m.fill_after(after[i], bits[i]):
            bits[i] = -1
    allowed = ((bits[:, :, None] >> _SHIFTS) & 1).view(len(matchers), -1)[:, :vocab].bool()  # (B, V)
    return allowed.to(device, non_blocking=True)


class Grammars:
    """Compiles grammars for one tokenizer and vocabulary; the last CACHE_SIZE are kept, keyed by source."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size, self.eos_id = vocab_size, tokenizer.eos_id
        self.ll = llguidance.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)
        self.added = {t.content: i for i, t in tokenizer.tk.get_added_tokens_decoder().items()}
        self._cache: OrderedDict[str, Constraint] = OrderedDict()
        self._lock = threading.Lock()

    def lark(self, source: str) -> Constraint:
        """A grammar in llguidance's Lark dialect (`%json {schema}` embeds a JSON schema)."""
        with self._lock:
            if source in self._cache:
                self._cache.move_to_end(source)
                return self._cache[source]
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(source)
            compiled = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        except Exception as e:  # text Rust cannot take (a lone surrogate), an API-level refusal
            raise ConstraintError(f"{type(e).__name__}: {e}") from None
        if compiled.is_error():
            raise ConstraintError(compiled.get_error())
        c = Constraint(source, self.vocab_size, self.eos_id, compiled)
        with self._lock:
            self._cache[source] = c
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return c

    def json(self, schema: dict | None, wrap: tuple[list[str], list[str]] = ([], [])) -> Constraint:
        """JSON valid against `schema` (None: any JSON object), optionally between two runs of literals."""
        before, after = (" ".join(self.text(t) for t in part) for part in wrap)
        return self.lark(f"start: {before} {json_rule(schema)} {after}")

    def tool_calls(self, tools: dict[str, dict | None], max_calls: int | None = None, json_alt=False) -> Constraint:
        """One or more calls (at most `max_calls`) in DeepSeek's format, each naming one of `tools` with
        arguments valid against its parameters schema (None: any object). `json_alt` (a schema, None for any
        object): a JSON answer is the alternative to calling."""
        fns = [
            f"fn{i}: {self.text(name)} {self.text(TOOL_SEP)} {json_rule(params)}"
            for i, (name, params) in enumerate(tools.items())
        ]
        repeat = "+" if max_calls is None else ("" if max_calls == 1 else f"{{1,{max_calls}}}")
        start = "calls" if json_alt is False else f"calls | {json_rule(json_alt)}"
        return self.lark(
            "\n".join(
                [
                    f"start: {start}",
                    f"calls: {self.text(TOOL_CALLS_BEGIN)} call{repeat} {self.text(TOOL_CALLS_END)}",
                    f"call: {self.text(TOOL_CALL_BEGIN)} ({' | '.join(f'fn{i}' for i in range(len(fns)))}) "
                    + self.text(TOOL_CALL_END),
                    *fns,
                ]
            )
        )

    def text(self, s: str) -> str:
        """A literal as Lark reads it: the token itself where the text is one added token (`<think>`, a special
        tool marker in a tokenizer that has them), else the text (matched by whichever tokens spell it)."""
        if not s:
            return ""
        return f"<[{self.added[s]}]>" if s in self.added else json.dumps(s, ensure_ascii=False)


def json_rule(schema: dict | None) -> str:
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise ConstraintError("a JSON schema must be an object")
    try:
        return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ConstraintError(f"the schema is not JSON: {e}") from None


_GRAMMARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GRAMMARS_LOCK = threading.Lock()


def grammars(tokenizer, vocab_size: int) -> Grammars:
    """The `Grammars` of a tokenizer for a model's vocabulary (made once: the token trie costs 3 ms at 2K
    tokens and 0.8 s at 128K)."""
    with _GRAMMARS_LOCK:
        per_tok = _GRAMMARS.setdefault(tokenizer, {})
        if vocab_size not in per_tok:
            per_tok[vocab_size] = Grammars(tokenizer, vocab_size)
        return per_tok[vocab_size]

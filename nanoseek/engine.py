"""The inference engine: the one generation path of nanoseek (eval, RL rollouts, server, chat).

    engine = Engine("runs/tiny")                       # or Engine(model, tokenizer)
    outs = engine.generate(["What is 2+3?"], SamplingParams(max_tokens=32, temperature=0))
    for event in engine.stream("Hello", SamplingParams()): print(event.text, end="")

- Prefill runs MLA in the expanded form; decode runs it absorbed, attending over the cached latent
  c_kv and rotated k_pe only (see MLA in model.py).
- The latents live in a paged block cache (kv_cache.py). Requests join and leave between decode steps
  (continuous batching); a request whose next block cannot be had preempts the youngest running
  sequence, which is recomputed later from its tokens, so its output does not change.
- n samples of one prompt share one prefill: the prompt's latents are copied to each sample's blocks.
- With MTP modules and `use_mtp=True`, greedy requests decode speculatively: the MTP head drafts one
  token, one main-model forward over two tokens verifies it (DeepSeek-V3 §5.4.3).

The engine works on token ids; a tokenizer, when given, turns text prompts into ids and ids into text.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kv_cache import CacheFull, PagedLatentCache
from .model import Transformer
from .sampling import SamplingParams, make_generator, sample


@dataclass
class Completion:
    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop" (EOS, stop string or id) or "length" (max_tokens or context)
    logprobs: list[float] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
    error: str | None = None  # set when the request was refused; the others are served regardless


@dataclass
class TokenEvent:
    """One decoded token of one sample, as `step()` reports it (what streaming is built from)."""

    request_id: str
    index: int
    token_id: int
    finish_reason: str | None
    logprob: float | None = None  # with params.logprobs or params.top_logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first


@dataclass
class _Sequence:
    request_id: str
    index: int
    tokens: list[int]  # prompt + generated
    n_prompt: int
    params: SamplingParams
    generator: torch.Generator
    arrival: int
    blocks: list[int] = field(default_factory=list)
    n_cached: int = 0  # tokens whose latents are in the cache
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    stop_text_end: int | None = None  # where a stop string cut the text

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.n_prompt :]


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


class Engine:
    def __init__(self, model: Transformer | str | Path, tokenizer=None, *, max_batch_size: int = 32,
                 block_size: int = 16, cache_tokens: int | None = None, use_mtp: bool = False,
                 device: str | torch.device | None = None):
        if isinstance(model, (str, Path)):
            from .checkpoint import from_pretrained

            path = Path(model)
            model = from_pretrained(path, device=device or "cpu")
            if tokenizer is None and (path / "tokenizer.json").exists():
                from .tokenizer import Tokenizer

                tokenizer = Tokenizer.from_pretrained(path)
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_len = cfg.max_position_embeddings
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.max_batch_size = max_batch_size
        self.use_mtp = use_mtp and len(model.mtp) > 0
        cache_tokens = cache_tokens or min(max_batch_size * self.max_len, 1 << 16)
        p = next(model.parameters())
        self.cache = PagedLatentCache(
            n_layers=cfg.num_hidden_layers + len(model.mtp), n_blocks=-(-cache_tokens // block_size),
            block_size=block_size, kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
            dtype=p.dtype, device=p.device,
        )
        self.device = p.device
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []
        self.requests: dict[str, list[_Sequence]] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    # ---- requests ---------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine one")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; raises ValueError (and queues nothing) if it cannot be served."""
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len}, "
                             "leaving no room to generate")
        if self.cache.blocks_for(len(ids) + 1) > self.cache.n_blocks:
            raise ValueError(f"the prompt has {len(ids)} tokens; the KV cache holds "
                             f"{self.cache.n_blocks * self.cache.block_size}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        arrival = next(self._arrivals)
        seqs = [_Sequence(rid, i, list(ids), len(ids), params, make_generator(params.seed, i), arrival)
                for i in range(params.n)]
        self.requests[rid] = seqs
        self.waiting.extend(seqs)
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away): its sequences stop and free their blocks now."""
        for seq in self.requests.pop(request_id, []):
            self._free(seq)
            if seq in self.running:
                self.running.remove(seq)
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def is_finished(self, request_id: str) -> bool:
        return all(s.finish_reason for s in self.requests.get(request_id, []))

    def output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        return RequestOutput(request_id, seqs[0].tokens[: seqs[0].n_prompt],
                             [self._completion(s) for s in seqs])

    def pop_output(self, request_id: str) -> RequestOutput:
        out = self.output(request_id)
        del self.requests[request_id]
        return out

    # ---- high-level entry points --------------------------------------------------------------
    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run prompts to completion; a refused prompt gets `error` set while the others are served."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids: list[str | RequestOutput] = []
        for prompt, p in zip(prompts, plist):
            try:
                ids.append(self.add_request(prompt, p))
            except ValueError as e:
                ids.append(RequestOutput(f"req-{next(self._ids)}", [], error=str(e)))
        while self.has_unfinished():
            self.step()
        return [r if isinstance(r, RequestOutput) else self.pop_output(r) for r in ids]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[TokenEvent]:
        """Yield each token of one request as it is decoded (other queued requests progress too)."""
        rid = self.add_request(prompt, params)
        try:
            while not self.is_finished(rid):
                for event in self.step():
                    if event.request_id == rid:
                        yield event
        finally:
            if not self.is_finished(rid):
                self.abort(rid)

    # ---- one scheduling iteration ------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Admit waiting sequences (prefill), then decode one token (or a verified draft) for the rest."""
        events: list[TokenEvent] = []
        decoding = list(self.running)
        events += self._admit()
        decoding = [s for s in decoding if s in self.running and not s.finish_reason]
        if decoding:
            events += self._decode(decoding)
        self.running = [s for s in self.running if not s.finish_reason]
        return events

    def _admit(self) -> list[TokenEvent]:
        events = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            siblings = [s for s in self.waiting if s.request_id == seq.request_id and s.tokens == seq.tokens]
            siblings = siblings[: self.max_batch_size - len(self.running)]
            per_seq = self.cache.blocks_for(len(seq.tokens) + 1)
            if len(siblings) * per_seq > self.cache.n_free:
                siblings = siblings[:1]  # no room to share the prefill: admit one at a time
            if per_seq > self.cache.n_free:
                if self.running:
                    break  # wait for running sequences to free blocks
                # Alone with the whole cache and still no room: it has grown as long as the cache allows.
                self.waiting.popleft()
                seq.finish_reason = "length"
                continue
            for s in siblings:
                self.waiting.remove(s)
            events += self._prefill(siblings)
        return events

    def _prefill(self, group: list[_Sequence]) -> list[TokenEvent]:
        """Prefill the shared prefix once, copy its latents to every sample, sample each first token."""
        lead = group[0]
        T = len(lead.tokens)
        self.cache.grow(lead.blocks, T)
        self.cache.prepare([lead.blocks], [0], T, absorb=False)
        ids = torch.tensor([lead.tokens], device=self.device)
        h = self.model.hidden_states(ids, torch.arange(T, device=self.device)[None], self.cache)
        logits = self.model.lm_head(h[0, -1]).float()
        self.stats.prompt_tokens += T
        for s in group[1:]:
            self.cache.grow(s.blocks, T)
            self.cache.copy_prefix(lead.blocks, s.blocks, T)
        events = []
        for s in group:
            s.n_cached = T
            self.running.append(s)
            events.append(self._append(s, logits))
        return events

    def _decode(self, seqs: list[_Sequence]) -> list[TokenEvent]:
        seqs = self._reserve(seqs, lambda s: len(s.tokens))
        if not seqs:
            return []
        starts = [s.n_cached for s in seqs]
        self.cache.prepare([s.blocks for s in seqs], starts, 1, absorb=True)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
        pos = torch.tensor(starts, device=self.device)[:, None]
        logits = self.model(ids, pos, self.cache)[:, -1]
        events = []
        for s, row in zip(seqs, logits):
            s.n_cached += 1
            events.append(self._append(s, row))
        return events

    def _reserve(self, seqs: list[_Sequence], need_tokens) -> list[_Sequence]:
        """Give each sequence the blocks its next step writes to, preempting the youngest when full."""
        ready = []
        for s in sorted(seqs, key=lambda s: (s.arrival, s.index)):
            while s in self.running:  # an earlier iteration may have preempted it
                try:
                    self.cache.grow(s.blocks, need_tokens(s))
                    ready.append(s)
                    break
                except CacheFull:
                    victim = max((r for r in self.running if r.blocks), key=lambda r: (r.arrival, r.index))
                    self._preempt(victim)
                    if victim in ready:
                        ready.remove(victim)
        return ready

    def _preempt(self, seq: _Sequence) -> None:
        """Free a sequence's blocks and requeue it first; it is recomputed from its tokens later."""
        self._free(seq)
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _free(self, seq: _Sequence) -> None:
        self.cache.release(seq.blocks)
        seq.n_cached = 0

    # ---- tokens in, stop rules ----------------------------------------------------------------
    def _append(self, seq: _Sequence, logits: torch.Tensor) -> TokenEvent:
        token = sample(logits, seq.params, seq.generator)
        seq.tokens.append(token)
        self.stats.generated_tokens += 1
        logprob = top = None
        if seq.params.logprobs or seq.params.top_logprobs:
            logp = torch.log_softmax(logits.float(), -1)
            logprob = float(logp[token])
            if seq.params.logprobs:
                seq.logprobs.append(logprob)
            if seq.params.top_logprobs:
                values, ids = logp.topk(min(seq.params.top_logprobs, logp.shape[-1]))
                top = list(zip(ids.tolist(), values.tolist()))
        seq.finish_reason = self._finish_reason(seq, token)
        if seq.finish_reason:
            self._free(seq)
        return TokenEvent(seq.request_id, seq.index, token, seq.finish_reason, logprob, top)

    def _finish_reason(self, seq: _Sequence, token: int) -> str | None:
        p = seq.params
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop:
            text = self.tokenizer.decode(seq.output_ids)
            hits = [text.find(s) for s in p.stop if s and s in text]
            if hits:
                seq.stop_text_end = min(hits)
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or len(seq.tokens) >= self.max_len:
            return "length"
        return None

    def _completion(self, seq: _Sequence) -> Completion:
        ids = seq.output_ids
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if seq.stop_text_end is not None:
                text = text[: seq.stop_text_end]
        return Completion(seq.index, list(ids), text, seq.finish_reason,
                          list(seq.logprobs) if seq.params.logprobs else None)

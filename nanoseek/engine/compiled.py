"""The decode step under torch.compile: the model's blocks compiled once, reused by every layer and step.

A decode step runs each block on (B, 1) new tokens against the paged latent cache. Compiled naively it would
recompile for every layer (each reads its own pool), every batch size and every context length. Here:

- each layer gets its cache as a `LayerCache` (kv_cache.py) holding that layer's pool, so the layers differ
  only in tensors, which are graph inputs: one graph serves them all (the weights are inputs too, so a
  policy updated by RL needs no recompile);
- the batch and key dimensions are symbolic (`dynamic=True`, no duck shaping, at least two blocks of keys):
  a new batch size or a longer context reuses the graph. The variants left are batch 1 (torch specializes
  size 1), two tokens a row (MTP verify), the few-token expert path vs the sorted one (moe.py), and dense
  vs MoE blocks; `tests/test_compiled.py` counts dynamo's graphs over 100
  steps of changing batch sizes;
- the expert loops, which read the routing on the host, are custom ops (`nanoseek::experts_few` in moe.py,
  `quant_experts_few` and `quant_experts_sorted` in quant.py): the graph calls them without a break. Only
  the fp32 sorted path of many tokens (`_grouped_mm`, traced for bf16 only) still runs eagerly, one break.

Compiled graphs persist in torch inductor's on-disk cache, so a second process compiles faster (measured
in docs/engine.md); `compile_seconds` is what this process spent.
"""

from __future__ import annotations

import contextlib
import copy
import time

import torch

from nanoseek.engine.kv_cache import PagedLatentCache
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.transformer import Transformer


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (a new one means the call that made it paid to compile)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class CompiledDecode:
    """`forward(ids, positions)` -> final hidden states (B, 1, D) of one decode step over `cache`'s prepared
    layout, through compiled blocks."""

    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model = model
        n = len(model.layers)
        self.blocks = [torch.compile(layer, dynamic=True) for layer in model.layers]
        self.layer_caches = [cache.layer(i) for i in range(n)]
        self.mtp_block = torch.compile(model.mtp[0], dynamic=True) if len(model.mtp) else None
        self.mtp_cache = cache.layer(n) if len(model.mtp) else None
        self.compile_seconds = 0.0

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions (B, T): T is 1 for a plain step, 2 for an MTP verify step (T 1 and 2 are variants)."""
        m = self.model
        h = m.embed_tokens(ids)
        cos, sin = m.rotary(positions)
        with self._timed():
            for block, layer_cache in zip(self.blocks, self.layer_caches):
                h = block(h, cos, sin, None, layer_cache)
        return m.norm(h)

    def mtp(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """MTP depth 1's hidden states (B, T, D) over the prepared layout (see Engine._mtp_hidden)."""
        with self._timed():
            return self.mtp_block(h, emb, cos, sin, None, self.mtp_cache)

    @contextlib.contextmanager
    def _timed(self):
        """Adds the call's time to compile_seconds when it compiled a graph. A block has a few graph variants
        (see the module docstring) and each weight format its own modules; several engines in one process (a
        benchmark) add theirs, hence the raised per-function limit of dynamo."""
        graphs, t0 = compiled_graphs(), time.perf_counter()
        # No duck shaping: a batch of 2 over 2 blocks must not tie the two sizes into one symbol (a recompile
        # as soon as they differ).
        with torch._dynamo.config.patch(recompile_limit=64), torch.fx.experimental._config.patch(use_duck_shape=False):
            yield
        if compiled_graphs() != graphs:
            self.compile_seconds += time.perf_counter() - t0


def warm_up(engine) -> float:
    """Compile an engine's decode-step variants now, with throwaway greedy requests at batch 1, 2 and its
    largest batch, so that no client waits for a compile (a server calls this before it listens). Returns
    the seconds spent compiling; the engine's counters are left as they were."""
    if not engine.compiled:
        return 0.0
    stats = copy.copy(engine.stats)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for n in sorted({1, min(2, engine.max_batch_size), engine.max_batch_size}):
        engine.generate([[1 + i % 7, 2, 3] for i in range(n)], params)
    engine.stats = stats
    return engine.compile_seconds

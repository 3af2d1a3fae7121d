"""The inference engine, the one generation path (eval, RL rollouts, server, chat): scheduling with
continuous batching and absorbed-MLA decoding (`engine.py`), the compiled decode step (`compiled.py`), the paged
latent cache (`kv_cache.py`), batched sampling (`sampling.py`), grammar-constrained decoding (`constrain.py`: JSON
schemas and tool calls as per-row token masks, with llguidance), and the text side (`text.py`: detokenizing, stop
strings, the reasoning split).

Imports: `nanoseek.model`, `nanoseek.checkpoint`, `nanoseek.errors`.
"""

from nanoseek.engine.engine import Engine
from nanoseek.engine.requests import Completion, RequestOutput, TokenEvent
from nanoseek.engine.sampling import SamplingParams

__all__ = ["Completion", "Engine", "RequestOutput", "SamplingParams", "TokenEvent"]

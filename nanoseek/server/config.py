"""The server's settings (what `nanoseek serve`'s flags set) and the fingerprint its responses carry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nanoseek import __version__
from nanoseek.server import protocol as P

FINGERPRINT = f"fp_nanoseek_{__version__}"


@dataclass
class ServerConfig:
    model: str  # checkpoint directory (config.json, safetensors, tokenizer.json)
    host: str = "127.0.0.1"  # loopback: reachable from this machine only
    port: int = 8000
    api_key: str | None = None  # when set, all but /health need `Authorization: Bearer <api_key>`
    served_model_name: str | None = None  # the `model` clients send; default: the directory's name
    max_batch_size: int = 32
    cache_tokens: int | None = None  # latent-cache capacity (default: the engine's)
    max_n: int = P.MAX_N
    max_request_bytes: int = 8 << 20
    # Work one request may ask for: sequences = prompts x n; tokens = prompt tokens + max_tokens x sequences.
    max_sequences: int = 256
    max_request_tokens: int = 1 << 20
    # Sequences that may wait for a batch slot, all requests together: beyond max_batch_size + this, 429.
    max_waiting_sequences: int = 1024
    public_docs_and_metrics: bool = False  # with api_key: /metrics, /openapi.json and /docs need no key
    device: str = "cpu"
    allow_nonfinite: bool = False  # serve a checkpoint whose weights hold NaN/Inf (refused by default)
    weights: str = "fp32"  # in memory, as the Engine's `weights` (the engine checks it); the checkpoint is unchanged
    compile: bool | None = None  # torch.compile the decode step; None: where it is faster (the engine decides)
    prefix_caching: bool = True  # share the latent-cache blocks of common prompt prefixes between requests
    max_num_batched_tokens: int | None = 1024  # prefill chunk budget per engine step; None: whole prompts at once

    def __post_init__(self):
        for name in ("max_batch_size", "max_n", "max_request_bytes", "max_sequences", "max_request_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.max_waiting_sequences < 0:
            raise ValueError("max_waiting_sequences must not be negative")
        if self.max_sequences > self.max_batch_size + self.max_waiting_sequences:
            raise ValueError(
                f"max_sequences ({self.max_sequences}) is more than the server can hold "
                f"(max_batch_size + max_waiting_sequences = {self.max_batch_size + self.max_waiting_sequences})"
            )

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

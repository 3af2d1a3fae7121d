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
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <api_key>`
    served_model_name: str | None = None  # the `model` clients send; default: the directory's name
    max_batch_size: int = 32
    cache_tokens: int | None = None  # latent-cache capacity (default: the engine's)
    max_n: int = P.MAX_N
    max_request_bytes: int = 8 << 20
    device: str = "cpu"

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).resolve().name

"""nanoseek's OpenAI-compatible server: FastAPI + uvicorn over the continuous-batching engine.

    nanoseek serve --model runs/tiny [--host 127.0.0.1] [--port 8000] [--api-key KEY]

- app.py: routes, errors, auth; protocol.py: the wire format as pydantic models (also /openapi.json);
- async_engine.py: the thread that owns the engine; text.py: detokenizing, stop strings, reasoning;
- metrics.py: Prometheus text for /metrics; bench.py: `nanoseek bench serve`.
See docs/server.md.
"""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]

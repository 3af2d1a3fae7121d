"""nanoseek's OpenAI-compatible server: FastAPI + uvicorn over the continuous-batching engine.

    nanoseek serve --model runs/tiny [--host 127.0.0.1] [--port 8000] [--api-key KEY]

- app.py: routes, errors, auth; protocol.py: the wire format as pydantic models (also /openapi.json);
- async_engine.py: the thread that owns the engine; text.py: detokenizing, stop strings, reasoning;
- metrics.py: Prometheus text for /metrics; bench.py: `nanoseek bench serve`.
See docs/server.md.
"""

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):
    # Imported on first use, so `nanoseek chat` (which needs only text.py) runs without the `serve` extra.
    if name in __all__:
        from nanoseek.server import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

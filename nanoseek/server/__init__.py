"""nanoseek's OpenAI-compatible server: FastAPI + uvicorn over the continuous-batching engine.

    nanoseek serve --model runs/tiny [--host 127.0.0.1] [--port 8000] [--api-key-file PATH]
    from nanoseek.server.app import ServerConfig, create_app     # the app, for uvicorn or a test client

Owns the HTTP side of generation; the text a client sees (detokenizing, stop strings, the reasoning split)
is engine/text.py's, shared with `nanoseek chat`.
- app.py: create_app, the routes; config.py: ServerConfig; routes.py: the chat and completions handlers;
  responses.py: /v1/responses (OpenAI's Responses API); thinking.py: the thinking switch's spellings;
  structured.py: response_format, tools and tool_choice as the engine's grammar; tools.py: tool calls (messages
  for the template, calls parsed out of answers and streamed);
- errors.py: OpenAI's error object and the exception handlers; guard.py: API key, body limit, counting
  (the per-request and queue limits are routes.py's);
- openapi.py: the schema as served; protocol.py, protocol_responses.py: the wire format as pydantic models;
- sample.py: one choice's text, logprobs and counts; streams.py: merging request streams, disconnects;
- async_engine.py: the thread that owns the engine; prometheus.py: Prometheus text for /metrics.
This package needs the `serve` extra (fastapi, uvicorn): nothing here is imported by `import nanoseek`.
See docs/server.md.

Imports: `nanoseek` (its version), `nanoseek.errors`, `nanoseek.checkpoint` (the tokenizer), `nanoseek.engine`;
fastapi (with starlette and pydantic).
"""

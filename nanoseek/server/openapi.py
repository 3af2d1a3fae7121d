"""The OpenAPI schema as this server answers: OpenAI's error object instead of FastAPI's 422, the streamed
chunks as server-sent events, and this server's own bounds (its one model, its context, its largest n)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from nanoseek.server import protocol as P
from nanoseek.server import protocol_responses as R
from nanoseek.server.config import ServerConfig


def sse_event(*chunks: str, done: bool = True) -> dict:
    """One server-sent event (OpenAPI 3.1: the schema of a text/event-stream describes each event): its data is
    one of the named objects as JSON, or (`done`) the closing `[DONE]`."""
    ref = lambda name: {"$ref": f"#/components/schemas/{name}"}  # noqa: E731
    data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": list(map(ref, chunks))},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {"anyOf": [{"const": "[DONE]"}, data]} if done else data,
        },
    }


def _bound_integers(node, maximum: int) -> None:
    """Give every integer in a JSON schema an upper bound."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["maximum"] = maximum
        for v in node.values():
            _bound_integers(v, maximum)
    elif isinstance(node, list):
        for v in node:
            _bound_integers(v, maximum)


def install_openapi(app: FastAPI, config: ServerConfig, max_len: int, vocab_size: int) -> None:
    """FastAPI documents a 422 for every body; this server answers 400 with OpenAI's error object instead.
    With an API key the operations that need it (all but /health, and /metrics when it is public) also
    document the bearer scheme and their 401."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        # Streamed chunks are named by the event schemas only: add their models.
        for model in (P.ChatCompletionChunk, P.Completion, P.ErrorResponse, *R.STREAM_EVENTS):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
            schemas.update(js.pop("$defs", {}))
            schemas.setdefault(model.__name__, js)
        # This server's own bounds: the one model it serves, its context, its largest n.
        for name, prompt, max_field in (
            ("ChatCompletionRequest", {"messages": [{"role": "user", "content": "What is 2+3?"}]}, "max_tokens"),
            ("CompletionRequest", {"prompt": "The quick brown fox"}, "max_tokens"),
            ("ResponsesRequest", {"input": "What is 2+3?"}, "max_output_tokens"),
        ):
            props = schemas[name]["properties"]
            props["model"] = {"type": "string", "enum": [config.model_name], "title": "Model"}
            for field, bound in (
                (max_field, max_len - 1),
                ("max_completion_tokens", max_len - 1),
                ("n", config.max_n),
                ("best_of", config.max_n),
            ):
                for branch in props.get(field, {}).get("anyOf", []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = min(bound, branch.get("maximum", bound))
            schemas[name]["examples"] = [{"model": config.model_name, **prompt, max_field: 16}]
        _bound_integers(schemas["CompletionRequest"]["properties"]["prompt"], vocab_size - 1)  # token ids
        if config.api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema["paths"].items():
            for op in ops.values():
                op["responses"].pop("422", None)
                keyed = path != "/health" and not (path == "/metrics" and config.public_docs_and_metrics)
                if config.api_key and keyed:
                    op["security"] = [{"bearer": []}]
                    op["responses"]["401"] = {
                        "description": "Missing or wrong API key",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
                if "requestBody" in op:
                    op["responses"]["413"] = {
                        "description": "Body too large",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

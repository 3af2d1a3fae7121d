"""OpenAI's error object for every failure: `APIError` raised by the handlers, `error_response` to build one,
and the exception handlers that turn FastAPI's own errors (validation: 400, not 422; unknown paths: 404;
anything unexpected: 500) into it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.server import protocol as P


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict | None = None,
    ):
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type_ or ("server_error" if status >= 500 else "invalid_request_error")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    type_: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    e = APIError(status, _utf8(message), param and _utf8(param), code, type_)
    body = P.ErrorResponse(error=P.ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        errs = [_tag_field(e) for e in e.errors()]
        unicode = [e for e in errs if P.NOT_UNICODE in e.get("msg", "")]  # the real fault, whatever the union
        # else the deepest: of a union's members, the one that matched furthest says what is wrong
        deepest = sorted(errs, key=lambda e: -len((_param(e["loc"]) or "").split(".")))
        first = (unicode or deepest or [{"loc": (), "msg": "invalid request", "type": ""}])[0]
        if first.get("type") == "json_invalid":
            return error_response(
                400,
                "We could not parse the JSON body of your request: "
                f"{first.get('ctx', {}).get('error', 'invalid JSON')}.",
                code="invalid_json",
            )
        param = _param(first["loc"])
        same = list(dict.fromkeys(e["msg"] for e in errs if _param(e["loc"]) == param))  # a union's members
        message = "; or ".join(same)
        if param:
            message = f"{param}: {message}"
        others = sum(_param(e["loc"]) != param for e in errs)
        if others:
            message += f" (and {others} more error{'s' if others > 1 else ''})"
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return error_response(500, f"Internal server error: {type(e).__name__}", code="internal_error")


def _tag_field(err: dict) -> dict:
    """A union chosen by a field (messages by `role`) that has a bad or missing tag: the fault is that field."""
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        field = str(err.get("ctx", {}).get("discriminator", "")).strip("'")
        return {**err, "loc": (*err["loc"], field)} if field else err
    return err


def _utf8(text: str) -> str:
    """An error never fails to encode: text that is not valid UTF-8 (a lone surrogate) is replaced."""
    return text.encode("utf-8", "replace").decode("utf-8")


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}
# a union member that is a model is named by its class ("tool_choice.NamedToolChoice"): never a field's name
_MODELS = {n for n, v in vars(P).items() if isinstance(v, type) and issubclass(v, P.BaseModel)}


def _param(loc: tuple) -> str | None:
    """A validation error's location as OpenAI's `param` ("messages.0.content"): pydantic's own markers (the
    body, the member of a union it tried: "str", "list[TextContentPart]", "NamedToolChoice", a message's role
    after its index: "messages.0.tool.tool_call_id") are left out."""
    keep = [
        str(x)
        for i, x in enumerate(loc)
        if x != "body"
        and not (isinstance(x, str) and (x in _TYPE_TAGS or x in _MODELS or "[" in x or "-" in x))
        and not (x in P.ROLES and i > 0 and isinstance(loc[i - 1], int))
    ]
    return ".".join(keep) or None

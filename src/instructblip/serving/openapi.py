"""The server's OpenAPI document (/openapi.json): what each route takes and what its errors look like.

The API routes read their JSON bodies themselves (`protocol.parse_request`) rather than through FastAPI's body
parameters, so that a bad body is answered in OpenAI's error shape, not FastAPI's 422. FastAPI therefore cannot see
those bodies; `json_body(Model)` describes one from its pydantic model for the document, without changing how it is
parsed. A route with a body is documented by one argument:

    app.post("/v1/chat/completions", **json_body(ChatRequest), responses=error_responses(400, 404))(server.chat)

`document(app)` is the document, built once: FastAPI's, with the body models' nested schemas moved to
`components/schemas` where OpenAPI references point.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from instructblip.serving.protocol import ErrorResponse

_ERRORS = {
    400: "bad input: the message and `param` say what and where",
    401: "missing or wrong API key",
    404: "unknown model or path",
    408: "the body did not arrive within the body timeout",
    413: "the body is larger than the server's limit",
    500: "a failure inside the model",
    503: "the server is busy (queue full, or too many requests or connections at once); retry after Retry-After",
    504: "the request ran past the request timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that may answer these statuses, each with OpenAI's error body (JSON, whatever the
    route's own media type)."""
    content = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
    return {status: {"description": _ERRORS[status], "content": content} for status in statuses}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """Keyword arguments for `app.post`: the request body, described by `model`, that the route reads itself."""
    schema = model.model_json_schema(ref_template=_REF)
    return {"openapi_extra": {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}}


# a route that streams with `stream: true` (its JSON answer is FastAPI's default 200)
STREAMED = {200: {"description": "the answer as JSON, or as server-sent events with `stream: true`",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}

_REF = "#/components/schemas/{model}"


def document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of `app` (assign `app.openapi = lambda: document(app)`)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        _add(ErrorResponse.model_json_schema(ref_template=_REF), schemas)
        for operations in doc["paths"].values():
            for operation in operations.values():
                # FastAPI documents a 422 for routes with path parameters; these are plain strings that always
                # validate, so the server never answers 422
                operation.get("responses", {}).pop("422", None)
                content = operation.get("requestBody", {}).get("content", {}).get("application/json")
                if content is not None and "title" in content["schema"]:
                    content["schema"] = _add(content["schema"], schemas)
        app.openapi_schema = doc
    return app.openapi_schema


def _add(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, str]:
    """Put a model's schema and the schemas it nests into `schemas` (components); a reference to it."""
    schema = dict(schema)
    schemas.update(schema.pop("$defs", {}))
    schemas[schema["title"]] = schema
    return {"$ref": _REF.format(model=schema["title"])}

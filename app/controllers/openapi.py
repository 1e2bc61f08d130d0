"""What the OpenAPI schema says about responses that Litestar cannot infer: errors, and non-JSON bodies."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation

from app.domain.openai import ChatCompletionChunk, OpenAIErrorBody
from app.domain.schemas import ErrorBody, StreamDone, StreamError

_DESCRIPTIONS = {
    400: "Malformed input; `field` names it",
    404: "No such conversation, message, model or voice",
    409: "Conflict: a reply is already being generated here",
    413: "Too large: the body, a text, a recording or the conversation is over its limit",
    415: "Unsupported media type",
    429: "Too many requests: the client's rate limit (CHIPI_RATE_LIMIT) or the model's waiting queue is full; "
    "see Retry-After",
    503: "Unavailable: the model or speech models are loading, the model is busy, or the database is down; "
    "see Retry-After",
}
# Any API route may answer these: 429 when CHIPI_RATE_LIMIT is set (app/controllers/rate_limit.py), 503 while a
# part it needs is loading or the database is down.
ALWAYS = (429, 503)


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """Chipi's JSON error body for each status, and for 429 and 503."""
    return {
        status: ResponseSpec(data_container=ErrorBody, description=_DESCRIPTIONS.get(status, "Error"))
        for status in sorted({*statuses, *ALWAYS})
    }


def openai_error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAI's error body for each status (the `/v1` routes), and for 429 and 503."""
    return {
        status: ResponseSpec(data_container=OpenAIErrorBody, description=_DESCRIPTIONS.get(status, "Error"))
        for status in sorted({*statuses, *ALWAYS})
    }


JsonSchema = dict[str, Any]

TEXT: JsonSchema = {"type": "string"}
BINARY: JsonSchema = {"type": "string", "format": "binary"}


def inline_schema(struct: type) -> JsonSchema:
    """The JSON schema of a msgspec Struct with every reference resolved in place (for schemas written by hand here,
    outside the components Litestar collects)."""
    (schema,), definitions = msgspec.json.schema_components([struct], ref_template="{name}")

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"$ref"}:
                return resolve(definitions[node["$ref"]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


def _json_data(struct: type, description: str) -> JsonSchema:
    return {
        "type": "string",
        "description": description,
        "contentMediaType": "application/json",
        "contentSchema": inline_schema(struct),
    }


_EVENT_ID: JsonSchema = {"type": "string", "description": "REPLY_ID:SEQ; send it back as Last-Event-ID to resume"}

# One event of GET /api/conversations/{session_id}/stream (in Open API 3.1, an event stream's schema describes each
# event): unnamed text deltas, then `done` or `error`.
CHAT_STREAM_EVENT: JsonSchema = {
    "oneOf": [
        {
            "type": "object",
            "required": ["data", "id"],
            "properties": {
                "event": {"const": "message"},
                "data": {"type": "string", "description": "A text delta; `<think>` and `</think>` around reasoning"},
                "id": _EVENT_ID,
            },
        },
        {
            "type": "object",
            "required": ["event", "data", "id"],
            "properties": {
                "event": {"const": "done"},
                "data": _json_data(StreamDone, "The stored message ids, usage and finish_reason"),
                "id": _EVENT_ID,
            },
        },
        {
            "type": "object",
            "required": ["event", "data", "id"],
            "properties": {
                "event": {"const": "error"},
                "data": _json_data(StreamError, "Why the reply ended without finishing"),
                "id": _EVENT_ID,
            },
        },
    ]
}

# One event of a streamed POST /v1/chat/completions: a chunk, an error, or the final `[DONE]`.
COMPLETION_STREAM_EVENT: JsonSchema = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"const": "message"},
        "data": {
            "oneOf": [
                {"const": "[DONE]"},
                _json_data(ChatCompletionChunk, "A chat.completion.chunk"),
                _json_data(OpenAIErrorBody, "An error that ended the stream"),
            ]
        },
    },
}


def success_content(*alternatives: tuple[str, JsonSchema], keep_inferred: bool = False) -> type[Operation]:
    """An operation class whose 200 response documents these media types (with `keep_inferred`, next to the
    JSON body Litestar inferred from the handler's return type): for handlers that answer a stream, text or
    audio instead of (or as well as) JSON."""

    class OperationWithContent(Operation):
        def to_schema(self) -> dict[str, Any]:
            schema = super().to_schema()
            response = schema.get("responses", {}).get("200")
            if response is not None:
                inferred = response.get("content", {}) if keep_inferred else {}
                response["content"] = {**inferred, **{media: {"schema": item} for media, item in alternatives}}
            return schema

    return OperationWithContent

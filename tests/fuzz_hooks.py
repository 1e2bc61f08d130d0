"""Schemathesis hooks for tests/test_fuzz.py (loaded by the `st` process through SCHEMATHESIS_HOOKS).

They mix real conversation and message ids (CHIPI_FUZZ_SESSION_IDS, CHIPI_FUZZ_MESSAGE_IDS: comma-separated) into the
generated path parameters, and the served model's name (CHIPI_FUZZ_MODEL) into `/v1/chat/completions` bodies, so
that generated cases reach past the 404s into the handlers.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

SESSION_IDS = [value for value in os.environ.get("CHIPI_FUZZ_SESSION_IDS", "").split(",") if value]
MESSAGE_IDS = [value for value in os.environ.get("CHIPI_FUZZ_MESSAGE_IDS", "").split(",") if value]
MODEL = os.environ.get("CHIPI_FUZZ_MODEL", "")


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """The generated parameters, or the same with a real conversation id (and message id)."""
    if not path_parameters or "session_id" not in path_parameters or not SESSION_IDS:
        return st.just(path_parameters)
    real = {"session_id": st.sampled_from(SESSION_IDS)}
    if "message_id" in path_parameters and MESSAGE_IDS:
        real["message_id"] = st.sampled_from(MESSAGE_IDS)
    return st.one_of(st.just(path_parameters), st.fixed_dictionaries(real).map(lambda ids: {**path_parameters, **ids}))


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> Any:
    """A chat completion request as generated, or the same naming the served model."""
    operation = context.operation
    if operation is None or operation.path != "/v1/chat/completions" or not isinstance(body, dict) or not MODEL:
        return st.just(body)
    return st.sampled_from([body, {**body, "model": MODEL}])

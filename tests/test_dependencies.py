"""A handler's dependencies are resolved one after another (app/controllers/dependencies.py), with the values,
clean-ups and errors Litestar's own concurrent resolution gives them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from unittest.mock import patch

from litestar import Litestar, get
from litestar._kwargs import kwargs_model
from litestar.di import Provide
from litestar.exceptions import ValidationException
from litestar.testing import TestClient

from app.controllers.dependencies import resolve_dependencies_in_turn
from app.factory import create_app
from app.settings import Settings


def test_the_app_resolves_dependencies_in_turn() -> None:
    create_app(Settings.from_env())
    assert getattr(kwargs_model.KwargsModel.resolve_dependencies, "in_turn", False)


def test_dependencies_get_their_values_and_clean_ups_without_a_task_group() -> None:
    assert resolve_dependencies_in_turn()
    events: list[str] = []

    def number() -> int:
        events.append("number")
        return 1

    async def session() -> AsyncIterator[int]:
        events.append("session")
        yield 2
        events.append("session closed")

    def doubled(number: int) -> int:  # depends on another: a batch of its own, after them
        return 2 * number

    def checked(value: str) -> str:
        if value == "bad":
            raise ValidationException("value is malformed")
        return value

    @get("/{value:str}", sync_to_thread=False)
    def handler(number: int, session: int, doubled: int, checked: str) -> dict[str, object]:
        return {"sum": number + session + doubled, "checked": checked}

    app = Litestar(
        [handler],
        dependencies={
            "number": Provide(number, sync_to_thread=False),
            "session": Provide(session),
            "doubled": Provide(doubled, sync_to_thread=False),
            "checked": Provide(checked, sync_to_thread=False),
        },
    )
    # Litestar's own resolution opens an anyio task group for every batch of two or more
    with (
        patch.object(kwargs_model, "create_task_group", side_effect=AssertionError("a task group")),
        TestClient(app) as client,
    ):
        answer = client.get("/fine")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"sum": 5, "checked": "fine"}
        assert events == ["number", "session", "session closed"]
        refusal = client.get("/bad")
    assert refusal.status_code == 400
    assert refusal.json()["detail"] == "value is malformed"

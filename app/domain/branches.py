"""Pure rules for the message tree: a conversation's branches and which one is active.

Messages form a tree through `parent_id`; regenerating a reply adds a sibling, editing a user message starts a
new branch. The active branch is the path from the root to the conversation's active leaf; the model always
sees exactly that path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar
from uuid import UUID


class Node(Protocol):
    @property
    def id(self) -> UUID: ...

    @property
    def parent_id(self) -> UUID | None: ...


N = TypeVar("N", bound=Node)


def path_to(messages_by_id: dict[UUID, N], leaf: N | None) -> list[N]:
    """The messages from the root down to `leaf`, inclusive."""
    path: list[N] = []
    while leaf is not None:
        path.append(leaf)
        leaf = messages_by_id.get(leaf.parent_id) if leaf.parent_id else None
    path.reverse()
    return path


def newest_leaf_under(messages: Sequence[N], start: N) -> N:
    """Follow the newest child from `start` down to a leaf (messages are oldest first)."""
    newest_child: dict[UUID, N] = {}
    for message in messages:
        if message.parent_id is not None:
            newest_child[message.parent_id] = message
    while start.id in newest_child:
        start = newest_child[start.id]
    return start


def active_path(messages: Sequence[N], active_id: UUID | None) -> list[N]:
    """The active branch: the path to the active leaf, or to the newest message when none is set."""
    if not messages:
        return []
    by_id = {message.id: message for message in messages}
    leaf = by_id.get(active_id) if active_id else None
    return path_to(by_id, leaf if leaf is not None else messages[-1])

"""Litestar's dependencies resolved one after another instead of concurrently.

Litestar (2.x) resolves a handler's dependencies in batches, those of a batch depending on none of the others, and
runs each batch of two or more in an anyio task group, a task per dependency (litestar-org/litestar#4563). Nearly
every Chipi handler takes two or three independent ones (`owner`, the path's parsed id, a service), all plain
functions that return at once, so the task group was pure overhead: about a tenth of the event loop's time on a
conversation list or get under load. One after another, in the order of their names, the same dependencies get the
same values and clean-ups; only their concurrency goes, which none of them needs (FastAPI resolves its own in turn).
Two servers side by side on PostgreSQL (AMD EPYC, Zen 3), alternating, in three runs: the server's CPU per request
1.23-1.26 -> 1.00-1.13 ms for the list and 1.90-2.19 -> 1.74-1.96 ms for a 100-message conversation (requests/s
up 7-26% and 4-18%).
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def resolve_dependencies_in_turn() -> bool:
    """Make Litestar resolve each batch of a handler's dependencies in turn; False (and Litestar's own concurrent
    resolution kept, with a warning) where its internals are not the ones this was written for."""
    try:
        from litestar._kwargs.cleanup import DependencyCleanupGroup
        from litestar._kwargs.dependencies import DependencyContainer, resolve_dependency
        from litestar._kwargs.kwargs_model import KwargsModel
    except ImportError as exc:
        logger.warning("Litestar resolves dependencies concurrently (its internals moved: %s)", exc)
        return False
    if "dependency_batches" not in getattr(KwargsModel, "__slots__", ()):
        logger.warning("Litestar resolves dependencies concurrently (its KwargsModel has no dependency_batches)")
        return False
    if getattr(KwargsModel.resolve_dependencies, "in_turn", False):
        return True

    def key(dependency: DependencyContainer) -> str:
        return dependency.key

    async def resolve_dependencies(
        self: KwargsModel, connection: Any, kwargs: dict[str, Any]
    ) -> DependencyCleanupGroup:
        cleanup_group = DependencyCleanupGroup()
        for batch in self.dependency_batches:
            for dependency in sorted(batch, key=key) if len(batch) > 1 else batch:
                await resolve_dependency(dependency, connection, kwargs, cleanup_group)
        return cleanup_group

    resolve_dependencies.in_turn = True  # type: ignore[attr-defined]
    KwargsModel.resolve_dependencies = resolve_dependencies  # type: ignore[method-assign]
    return True

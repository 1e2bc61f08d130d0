"""Queries over API keys."""

from __future__ import annotations

from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import select

from app.domain.models import ApiKey


class ApiKeyRepository(SQLAlchemyAsyncRepository[ApiKey]):
    model_type = ApiKey

    async def any_exists(self) -> bool:
        """True once any key was ever created (a revoked one too)."""
        return bool(await self.session.scalar(select(select(ApiKey.id).exists())))

    async def find_by_hash(self, key_hash: str) -> ApiKey | None:
        return await self.get_one_or_none(key_hash=key_hash)

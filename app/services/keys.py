"""API keys: created, listed and revoked from the CLI (ApiKeyService), checked on each request (Authenticator).

The one rule for who a request acts for lives in `Authenticator.authenticate`:
- `CHIPI_AUTH=off`: everyone is the local owner, keys or not;
- `CHIPI_AUTH=on`: a valid key is required, even before the first one is created (every request is then refused);
- `CHIPI_AUTH=auto` (the default): no key is needed, and any key sent is ignored (OpenAI's clients always send
  one), until the first key is created; from then on a valid key is required. A revoked key still counts, so
  revoking every key never opens the server again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from advanced_alchemy.config import SQLAlchemyAsyncConfig
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService

from app.domain.auth import (
    LOCAL_CALLER,
    SHOWN_PREFIX_CHARS,
    Caller,
    clean_key_name,
    clean_owner,
    hash_api_key,
    new_api_key,
)
from app.domain.errors import NotFoundError, UnauthorizedError
from app.domain.models import ApiKey
from app.repositories.keys import ApiKeyRepository

NO_KEYS_RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class CreatedKey:
    """A new key's row and the key itself: the only time the plain key exists outside its owner's hands."""

    record: ApiKey
    key: str


class ApiKeyService(SQLAlchemyAsyncRepositoryService[ApiKey, ApiKeyRepository]):
    repository_type = ApiKeyRepository

    async def create_key(self, owner: str, name: str | None = None) -> CreatedKey:
        """A new random key for `owner`; only its hash is stored."""
        key = new_api_key()
        record = await self.create(
            ApiKey(
                owner=clean_owner(owner),
                name=clean_key_name(name),
                key_hash=hash_api_key(key),
                prefix=key[:SHOWN_PREFIX_CHARS],
            ),
            auto_commit=True,
        )
        return CreatedKey(record, key)

    async def list_keys(self) -> Sequence[ApiKey]:
        """Every key, revoked ones included, oldest first."""
        return await self.list(order_by=[(ApiKey.created_at, False), (ApiKey.id, False)])

    async def revoke(self, key_id: UUID) -> ApiKey:
        """Refuse the key from now on (the next request that sends it gets 401); revoking twice changes nothing."""
        record = await self.get_one_or_none(id=key_id)
        if record is None:
            raise NotFoundError(f"no key has the id {key_id}", field="id")
        if record.revoked_at is None:
            record.revoked_at = datetime.now(UTC)
            record = await self.update(record, auto_commit=True)
        return record

    async def owner_of(self, key: str) -> Caller | None:
        """Who a presented key acts for; None for an unknown or revoked key."""
        record = await self.repository.find_by_hash(hash_api_key(key))
        if record is None or record.revoked_at is not None:
            return None
        return Caller(record.owner, record.id)

    async def any_key_exists(self) -> bool:
        return await self.repository.any_exists()


class Authenticator:
    """Decides who each request acts for, from the key it presents (see the module's docstring).

    A presented key is looked up in the database on every request, so a revoked key is refused from the next
    request on. While no key exists (`auto`), whether one does is asked at most once every NO_KEYS_RECHECK_SECONDS:
    the single local user's requests cost no extra query, and a first key made with the CLI takes effect within
    that second."""

    def __init__(self, mode: str, db_config: SQLAlchemyAsyncConfig) -> None:
        self._mode = mode
        self._db_config = db_config
        self._keys_seen = False  # once a key exists it stays (revoked keys are kept), so this never turns back
        self._no_keys_checked_at = -math.inf

    async def authenticate(self, key: str | None) -> Caller:
        """The caller a request acts for; UnauthorizedError when a key is required and none valid was presented."""
        if self._mode == "off" or not await self._required():
            return LOCAL_CALLER
        if not key:
            raise UnauthorizedError(
                "an API key is required: send `Authorization: Bearer KEY` (or `?api_key=KEY` where headers "
                "cannot be set); `chipi keys create` makes one"
            )
        async with ApiKeyService.new(config=self._db_config) as keys:
            caller = await keys.owner_of(key)
        if caller is None:
            raise UnauthorizedError("the API key is not valid (unknown or revoked)")
        return caller

    async def _required(self) -> bool:
        if self._mode == "on" or self._keys_seen:
            return True
        now = time.monotonic()
        if now - self._no_keys_checked_at < NO_KEYS_RECHECK_SECONDS:
            return False
        async with ApiKeyService.new(config=self._db_config) as keys:
            self._keys_seen = await keys.any_key_exists()
        self._no_keys_checked_at = now
        return self._keys_seen

"""Owners and API keys: who a request acts for, and the pure rules for keys (format, hash, owner names).

A key is `chipi_` followed by 43 URL-safe base64 characters (256 random bits). Only its SHA-256 hash is stored: a
key of that entropy needs no salt or slow hash, since nobody can guess one to test against a leaked hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from uuid import UUID

from app.domain.errors import InvalidInputError

LOCAL_OWNER = "local"  # everyone is this owner while authentication is off; conversations from before keys too
KEY_PREFIX = "chipi_"
SHOWN_PREFIX_CHARS = len(KEY_PREFIX) + 6  # how much of a key `chipi keys list` shows, to tell keys apart
MAX_OWNER_CHARS = 64
MAX_KEY_NAME_CHARS = 100
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")


@dataclass(frozen=True)
class Caller:
    """Who a request acts for: an owner, and the key it presented (None while authentication is off)."""

    owner: str
    key_id: UUID | None = None


LOCAL_CALLER = Caller(LOCAL_OWNER)


def new_api_key() -> str:
    """A fresh random key, shown to its owner once."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of a key: its SHA-256, in hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def clean_owner(name: str) -> str:
    """An owner name: 1 to 64 letters, digits and `._@+-`, starting with a letter or digit."""
    name = name.strip()
    if not name or len(name) > MAX_OWNER_CHARS or not _OWNER.match(name):
        raise InvalidInputError(
            f"an owner is 1 to {MAX_OWNER_CHARS} letters, digits and ._@+- starting with a letter or digit, "
            f"got {name!r}",
            field="owner",
        )
    return name


def clean_key_name(name: str | None) -> str | None:
    """A key's optional label (where it is used, e.g. `laptop`): one line of at most 100 characters."""
    if name is None or not name.strip():
        return None
    name = name.strip()
    if len(name) > MAX_KEY_NAME_CHARS or not name.isprintable():
        raise InvalidInputError(f"a key's name is one line of at most {MAX_KEY_NAME_CHARS} characters", field="name")
    return name

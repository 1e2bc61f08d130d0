"""Names of models and voices: plain names that can only ever mean a file or folder inside Chipi's own folders."""

from __future__ import annotations

import re

# A file or folder name: letters, digits, `.`, `_`, `-`, starting with a letter or digit (so never `.` or `..`),
# and no path separator.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def is_plain_name(name: str) -> bool:
    """True when `name` is one path component that stays inside the folder it is looked up in."""
    return _PLAIN_NAME.fullmatch(name) is not None and ".." not in name


def is_repo_id(name: str) -> bool:
    """True for a Hugging Face repo id `owner/name` whose two parts are plain names."""
    owner, slash, repo = name.partition("/")
    return bool(slash) and is_plain_name(owner) and is_plain_name(repo)

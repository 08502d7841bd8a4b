"""Validation of bucket, table, column and object-key names.

Object keys never become file-system paths (objects live in blobs named by random ids and
are found through the metadata database), but keys that look like path tricks are refused
anyway, so that no consumer that maps keys to paths is ever surprised.
"""

from __future__ import annotations

import re

from l4proxy.wire import ErrorCode

from ._errors import ServiceError

__all__ = ["check_bucket", "check_column", "check_key", "check_table"]

_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_RESERVED_TABLE_PREFIXES = ("sqlite_", "_chunkd")
MAX_KEY_BYTES = 1024


def _bad(message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_ARGUMENT, message)


def check_bucket(name: str) -> str:
    if not _BUCKET.fullmatch(name) or ".." in name:
        raise _bad(f"invalid bucket name {name[:80]!r}: use 1-63 of [a-z0-9._-], "
                   "starting with a letter or digit")
    return name


def check_table(name: str) -> str:
    if not _TABLE.fullmatch(name):
        raise _bad(f"invalid table name {name[:80]!r}: use [A-Za-z_][A-Za-z0-9_]{{0,62}}")
    if name.lower().startswith(_RESERVED_TABLE_PREFIXES):
        raise _bad(f"table name {name!r} is reserved")
    return name


def check_column(name: str) -> str:
    if not _TABLE.fullmatch(name):
        raise _bad(f"invalid column name {name[:80]!r}: use [A-Za-z_][A-Za-z0-9_]{{0,62}}")
    return name


def check_key(key: str) -> str:
    """Refuse keys that are empty, too long, or look like path tricks."""
    if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise _bad(f"object key must be 1..{MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise _bad("object key contains control characters")
    if "\\" in key:
        raise _bad("object key contains a backslash")
    if key.startswith("/"):
        raise _bad("object key must not start with '/'")
    for segment in key.split("/"):
        if segment in (".", ".."):
            raise _bad("object key contains a '.' or '..' segment")
    if "//" in key:
        raise _bad("object key contains an empty segment")
    return key

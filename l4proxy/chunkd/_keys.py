"""API keys of the reference service and their scopes.

Theory of operation: ``--api-key-file`` holds one all-powerful key; ``--api-keys`` is a
TOML file of named keys, each limited to bucket and table name globs and access classes
(read, write, admin). Keys are kept only as SHA-256 digests in memory and compared in
constant time against every configured key, so neither timing nor a crash dump tells
which key nearly matched. A key file readable by group or others is refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from l4proxy.wire import Access, ErrorCode, ResourceKind, ResourceUse, Scope

from ._errors import ChunkdConfigError, ServiceError

__all__ = ["ApiKey", "KeyRing", "load_key_file", "load_keys_toml"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    """One configured key: a name (for logs), its digest and its scope."""

    name: str
    digest: bytes
    scope: Scope

    def allows(self, use: ResourceUse) -> bool:
        """True if this key may use ``use.name`` with ``use.access``."""
        if use.access not in self.scope.access:
            return False
        globs = self.scope.buckets if use.kind is ResourceKind.BUCKET else self.scope.tables
        return any(fnmatch.fnmatchcase(use.name, g) for g in globs)

    def check(self, uses: tuple[ResourceUse, ...]) -> None:
        """Raise FORBIDDEN unless every use is within scope."""
        for use in uses:
            if not self.allows(use):
                raise ServiceError(ErrorCode.FORBIDDEN,
                                   f"this API key may not {use.access} {use.kind} {use.name!r}")


FULL_SCOPE = Scope(buckets=("*",), tables=("*",), access=(Access.READ, Access.WRITE, Access.ADMIN))


class KeyRing:
    """The set of valid keys."""

    def __init__(self, keys: list[ApiKey]) -> None:
        if not keys:
            raise ChunkdConfigError("no API keys configured")
        self._keys = tuple(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, presented: str) -> ApiKey | None:
        """Return the key matching ``presented`` (constant time over all keys), or None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


def _check_private(path: Path) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise ChunkdConfigError(f"{path}: cannot read key file ({exc.strerror})") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ChunkdConfigError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise ChunkdConfigError(
            f"{path}: key file is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            " run chmod 600"
        )


def load_key_file(path: str | os.PathLike[str]) -> KeyRing:
    """Load ``--api-key-file``: one key, all access.

    Raises:
        ChunkdConfigError: missing, empty, or group/world-accessible file.
    """
    p = Path(path)
    _check_private(p)
    try:
        secret = p.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ChunkdConfigError(f"{p}: cannot read key file") from exc
    if not secret:
        raise ChunkdConfigError(f"{p}: key file is empty")
    return KeyRing([ApiKey(name="default", digest=hashlib.sha256(secret.encode()).digest(),
                           scope=FULL_SCOPE)])


_KEY_FIELDS = {"name", "key", "key_sha256", "buckets", "tables", "access"}


def load_keys_toml(path: str | os.PathLike[str]) -> KeyRing:
    """Load ``--api-keys``: several named, scoped keys.

    The file holds ``[[keys]]`` tables with ``name``, exactly one of ``key`` (the secret)
    or ``key_sha256`` (its hex SHA-256, so the file needs to hold no secret), and
    ``buckets`` / ``tables`` (name globs, default none) and ``access`` (a list of
    ``read``, ``write``, ``admin``).

    Raises:
        ChunkdConfigError: with a ``keys[i].field: problem`` message.
    """
    p = Path(path)
    _check_private(p)
    try:
        doc = tomllib.loads(p.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ChunkdConfigError(f"{p}: not valid TOML ({type(exc).__name__})") from None
    unknown = set(doc) - {"keys"}
    if unknown:
        raise ChunkdConfigError(f"{p}: {sorted(unknown)[0]}: unknown key")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise ChunkdConfigError(f"{p}: keys: at least one [[keys]] table is required")
    keys: list[ApiKey] = []
    names: set[str] = set()
    digests: set[bytes] = set()
    for i, entry in enumerate(entries):
        where = f"{p}: keys[{i}]"
        if not isinstance(entry, dict):
            raise ChunkdConfigError(f"{where}: must be a table")
        extra = set(entry) - _KEY_FIELDS
        if extra:
            raise ChunkdConfigError(f"{where}.{sorted(extra)[0]}: unknown key")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ChunkdConfigError(f"{where}.name: a non-empty string is required")
        if name in names:
            raise ChunkdConfigError(f"{where}.name: duplicate name {name!r}")
        names.add(name)
        if ("key" in entry) == ("key_sha256" in entry):
            raise ChunkdConfigError(f"{where}: exactly one of key or key_sha256 is required")
        if "key" in entry:
            secret = entry["key"]
            if not isinstance(secret, str) or not secret.strip():
                raise ChunkdConfigError(f"{where}.key: a non-empty string is required")
            digest = hashlib.sha256(secret.strip().encode()).digest()
        else:
            hexd = entry["key_sha256"]
            try:
                digest = bytes.fromhex(hexd) if isinstance(hexd, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ChunkdConfigError(f"{where}.key_sha256: 64 hex digits are required")
        if digest in digests:
            raise ChunkdConfigError(f"{where}: the same key is configured twice")
        digests.add(digest)
        scope_parts: dict[str, tuple[str, ...]] = {}
        for field in ("buckets", "tables"):
            globs = entry.get(field, [])
            if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
                raise ChunkdConfigError(f"{where}.{field}: a list of name globs is required")
            scope_parts[field] = tuple(globs)
        access = entry.get("access")
        valid = {a.value for a in Access}
        if not isinstance(access, list) or not access or not all(a in valid for a in access):
            raise ChunkdConfigError(f"{where}.access: a non-empty list of {sorted(valid)} is required")
        keys.append(ApiKey(name=name, digest=digest, scope=Scope(
            buckets=scope_parts["buckets"], tables=scope_parts["tables"],
            access=tuple(Access(a) for a in dict.fromkeys(access)))))
    return KeyRing(keys)
